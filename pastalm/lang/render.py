"""Render the serialized inline form into the answer a user reads, split it into segments, and validate it.

`render` replaces every promise by its chunk and drops every tag. In the inline form each block follows its
promise, so reading order is serialized order and rendering is the concatenation of the text events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .parser import AsyncClose, AsyncOpen, Event, Promise, Stray, Sync, Text, parse

# Segment kinds, in the vocabulary the layout uses.
TEXT, PROMISE, OPEN, CHUNK, CLOSE, SYNC_KIND = "text", "promise", "open", "chunk", "close", "sync"


@dataclass(frozen=True)
class Segment:
    """One piece of an annotated answer: main text, a tag, or a chunk's text. `tokens` is set for promises."""

    kind: str
    text: str
    tokens: int = 0


def render(annotated: str) -> str:
    """The user-visible answer: tags and stray tag fragments removed, each promise replaced by its chunk."""
    return "".join(e.raw for e in parse(annotated) if isinstance(e, Text))


def segments(annotated: str) -> list[Segment]:
    """Split the serialized form into main text, tags and chunk text, in serialized order."""
    out: list[Segment] = []
    in_block = False
    for e in parse(annotated):
        if isinstance(e, (Text, Stray)):  # a stray is tokens its thread wrote, like text (never trained on:
            kind = CHUNK if in_block else TEXT  # `validate` rejects it)
            if out and out[-1].kind == kind:
                out[-1] = Segment(kind, out[-1].text + e.raw)
            else:
                out.append(Segment(kind, e.raw))
        elif isinstance(e, Promise):
            out.append(Segment(PROMISE, e.raw, e.tokens))
        elif isinstance(e, AsyncOpen):
            in_block = True
            out.append(Segment(OPEN, e.raw))
        elif isinstance(e, AsyncClose):
            in_block = False
            out.append(Segment(CLOSE, e.raw))
        elif isinstance(e, Sync):
            out.append(Segment(SYNC_KIND, e.raw))
    return out


@dataclass
class Report:
    """What `validate` found: `ok` is True when `problems` is empty."""

    promises: int = 0
    syncs: int = 0
    problems: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # one short code per problem, for counting

    def add(self, reason: str, problem: str) -> None:
        self.reasons.append(reason)
        self.problems.append(problem)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(annotated: str, original: str | None = None, require_promise: bool = False) -> Report:
    """Check an annotation: every promise has a closed block right after it, the render is lossless, and
    (optionally) there is at least one promise. Looks for tag-like text that failed to parse, too."""
    events: list[Event] = parse(annotated)
    rep = Report()
    open_block = False
    for i, e in enumerate(events):
        if isinstance(e, Promise):
            rep.promises += 1
            if i + 1 >= len(events) or not isinstance(events[i + 1], AsyncOpen):
                rep.add("promise-without-block", f"promise {rep.promises} ({e.topic!r}) is not followed directly by <async>")
        elif isinstance(e, AsyncOpen):
            open_block = True
        elif isinstance(e, AsyncClose):
            open_block = False
        elif isinstance(e, Sync):
            rep.syncs += 1
        elif isinstance(e, Stray):
            rep.add("malformed-tag", f"a tag or tag fragment with no effect where it stands: {e.raw[:40]!r}")
        elif isinstance(e, Text) and not open_block:
            for frag in ("<promise", "<sync", "<async", "</async"):
                if frag in e.raw:
                    rep.add("malformed-tag", f"text outside a block contains a malformed tag starting {frag!r}")
                    break
    if open_block:
        rep.add("unclosed-block", "the last <async> block is never closed with </async>")
    if original is not None and render(annotated) != original:
        rep.add("not-lossless", "render(annotated) differs from the original answer (annotation must be lossless)")
    if require_promise and rep.promises == 0:
        rep.add("no-promise", "no promise: the annotation claims parallelism but marks none")
    return rep
