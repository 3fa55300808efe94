"""PASTA-LANG v1 tag syntax: the tag strings, the promise regex, and serializers.

Pure Python; the rest of `pastalm.lang` builds on these constants so that the parser, the renderer,
the layout and the engine agree on one spelling of every tag.
"""

from __future__ import annotations

import re

ASYNC_OPEN = "<async>"
ASYNC_CLOSE = "</async>"
SYNC = "<sync/>"
PROMISE_HEAD = "<promise"

# A promise is `<promise` + attributes + `/>` on one line. Attribute values are double-quoted and hold no quote.
# Unknown attributes are ignored; `tokens` must be a positive integer. Anything else is not a promise.
_ATTR = r'[ \t]+[A-Za-z_][\w-]*="[^"<>\n]*"'
PROMISE_RE = re.compile(r"<promise((?:" + _ATTR + r")*)[ \t]*/>")
_ATTR_RE = re.compile(r'([A-Za-z_][\w-]*)="([^"<>\n]*)"')

# Tags as vocabulary entries (`pasta train sft --tag-tokens`): the promises of annotation v3 with the token counts
# its annotator writes (10 to 100, in steps of 10; a larger count is still written as plain text), and the other
# three tags. One token instead of 8 for a promise, 4 for `</async>`, on main's critical path
# (`bench/promise_length.py`). The text, and so the language, stays the same: only how it is cut into tokens.
TAG_TOKENS = [f'<promise tokens="{n}"/>' for n in range(10, 101, 10)] + [ASYNC_OPEN, ASYNC_CLOSE, SYNC]

# Longest tag the streaming parser will hold back while waiting for its `>`; a longer fragment is a stray up to its
# end (docs/spec.md L3, L5), sent as it comes.
MAX_PROMISE_CHARS = 256

# Tag heads: `<` or `</` and a tag name not followed by a name character. Text that starts with a head is a tag
# fragment up to its first `>` (inclusive), or up to a `<` or a line break (exclusive); past MAX_PROMISE_CHARS it is a
# stray whatever follows. A
# fragment that is not a tag legal where it stands is a *stray*: kept in the raw form, never rendered
# (docs/spec.md, "Stray tags"). So no tag, whole or cut, reaches the reader.
TAG_NAMES = ("promise", "async", "sync")
TAG_HEADS = tuple(f"<{slash}{name}" for name in TAG_NAMES for slash in ("", "/"))
TAG_HEAD_RE = re.compile(r"</?(?:" + "|".join(TAG_NAMES) + r")(?![\w-])")


def parse_promise(tag: str) -> tuple[str, int] | None:
    """Return (topic, tokens) for a complete promise tag, or None when it is not a valid promise."""
    m = PROMISE_RE.fullmatch(tag)
    if m is None:
        return None
    attrs = dict(_ATTR_RE.findall(m.group(1)))
    tokens = attrs.get("tokens", "")
    if not (tokens.isascii() and tokens.isdigit()) or int(tokens) <= 0:
        return None
    return attrs.get("topic", ""), int(tokens)


def promise_tag(topic: str | None, tokens: int) -> str:
    """Serialize a promise; an empty or None topic leaves the attribute out (`<promise tokens="N"/>`, scheme v3).
    Raises ValueError on a topic with a quote or a non-positive token count."""
    if topic and ('"' in topic or "<" in topic or ">" in topic):
        raise ValueError(f"promise topic {topic!r} may not contain '\"', '<' or '>'")
    if int(tokens) <= 0:
        raise ValueError(f"promise tokens must be a positive integer, got {tokens!r}")
    if not topic:
        return f'<promise tokens="{int(tokens)}"/>'
    return f'<promise topic="{topic}" tokens="{int(tokens)}"/>'
