"""PASTA-LANG: tags, a streaming parser, rendering, validation and the shared layout rules (no torch here)."""

from .layout import IGNORE, Layout, ReservePolicy, SequenceLayout, Span, layout_segments, tokenize_segments
from .parser import AsyncClose, AsyncOpen, Event, Promise, Stray, StreamParser, Sync, Text, parse
from .render import Report, Segment, render, segments, validate
from .tags import ASYNC_CLOSE, ASYNC_OPEN, SYNC, parse_promise, promise_tag

__all__ = [
    "ASYNC_CLOSE", "ASYNC_OPEN", "SYNC", "IGNORE", "AsyncClose", "AsyncOpen", "Event", "Layout", "Promise",
    "Report", "ReservePolicy", "Segment", "SequenceLayout", "Span", "Stray", "StreamParser", "Sync", "Text",
    "layout_segments", "parse", "parse_promise", "promise_tag", "render", "segments", "tokenize_segments",
    "validate",
]
