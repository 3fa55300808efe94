"""Streaming PASTA-LANG parser: text arrives in arbitrary pieces, events come out.

The parser never raises on input and never loses a character: every character fed in comes out in exactly
one event's `raw`, in order. What cannot be (or can no longer become) a complete tag in the current
context is text. Text that might still be the start of a tag is held back until it is decided.

Contexts (roles):
- "serialized": the canonical inline form. Main recognizes promises and `<sync/>`; `<async>` directly after a
  promise opens that promise's block; inside a block only `</async>` is a tag.
- "main": a main thread as the engine decodes it: promises and `<sync/>` only (blocks are separate threads).
  `expect_block()` lets the next `<async>` open an inline block (the engine's fallback past its thread limit).
- "async": an async thread after its forced `<async>`: only `</async>` is a tag; after it everything is text.

A tag (or the cut start of one) that has no effect where it stands is a `Stray` event: a promise inside a block,
`<async>` not right after a promise, `<sync/>` in a block, a malformed promise, `<sync>`, or a fragment such as
`<promise topic="x" tokens="5` left at the end by a limit. Strays are kept in the raw form and never rendered, so
no tag reaches the reader whatever the model writes or where a limit cuts it (docs/spec.md, "Stray tags").
"""

from __future__ import annotations

import os.path
import re
from dataclasses import dataclass

from .tags import ASYNC_CLOSE, ASYNC_OPEN, MAX_PROMISE_CHARS, SYNC, TAG_HEAD_RE, TAG_HEADS, parse_promise


@dataclass(frozen=True)
class Text:
    raw: str


@dataclass(frozen=True)
class Promise:
    topic: str
    tokens: int
    raw: str


@dataclass(frozen=True)
class AsyncOpen:
    raw: str = ASYNC_OPEN


@dataclass(frozen=True)
class AsyncClose:
    raw: str = ASYNC_CLOSE


@dataclass(frozen=True)
class Sync:
    raw: str = SYNC


@dataclass(frozen=True)
class Stray:
    """A tag or tag fragment with no effect in its context: kept in the raw form, never rendered."""

    raw: str


Event = Text | Promise | AsyncOpen | AsyncClose | Sync | Stray

# Parser states.
MAIN, AFTER_PROMISE, IN_BLOCK, CLOSED = range(4)
_COMPLETE, _PARTIAL, _NONE = range(3)
ROLES = ("serialized", "main", "async")


class StreamParser:
    """Incremental parser: `feed(text)` and `close()` return the events decided so far."""

    def __init__(self, role: str = "serialized"):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.state = IN_BLOCK if role == "async" else MAIN
        self._held = ""  # text that may still become a tag; always starts with "<"
        self._long = False  # inside a tag fragment cut at MAX_PROMISE_CHARS: the rest of it is a stray too

    @property
    def in_block(self) -> bool:
        """True while inside an `<async>` block (its text is chunk text)."""
        return self.state == IN_BLOCK

    @property
    def held(self) -> str:
        """Text held back because it may still become a tag (it starts with '<'), or ''."""
        return self._held

    def expect_block(self) -> None:
        """Let the next `<async>` open an inline block (main role, after a promise that was not forked)."""
        if self.state == MAIN:
            self.state = AFTER_PROMISE

    def feed(self, text: str) -> list[Event]:
        """Consume a piece of text; return the events it completes."""
        buf, self._held = self._held + text, ""
        out: list[Event] = []
        i, n = 0, len(buf)
        while i < n:
            if self._long:  # the rest of a too-long fragment, up to its end (L5): a stray, sent as it comes
                m = _FRAGMENT_END.search(buf, i)
                end = n if m is None else m.end() if m.group() == ">" else m.start()
                if end > i:
                    out.append(Stray(buf[i:end]))
                self._long = m is None
                i = end
                continue
            j = buf.find("<", i)
            if j < 0:
                self._text(out, buf[i:])
                break
            if j > i:
                self._text(out, buf[i:j])
            status, length, event = self._match(buf, j)
            if status == _COMPLETE:
                self._event(out, event)
                i = j + length
                # a fragment that reached the cap without its `>` goes on to its end as a stray: its tail
                # (`...long topic" tokens="5"/>`) must not be shown
                self._long = length == MAX_PROMISE_CHARS and not event.raw.endswith(">")
            elif status == _PARTIAL:
                self._held = buf[j:]
                break
            else:
                self._text(out, "<")
                i = j + 1
        return out

    def close(self) -> list[Event]:
        """End of input: a held-back tag start (`<`, `<p`, `<promise topic="a`) is a stray: a tag cut by the end of
        the thread. A lone `<` there counts too: shown, it could join the next piece in reading order (a block's
        first word, main's text after the block) into a tag head."""
        out: list[Event] = []
        if self._held:
            out.append(Stray(self._held))
            self._held = ""
        self._long = False
        return out

    # -- internals ---------------------------------------------------------------------------------------------

    def _text(self, out: list[Event], s: str) -> None:
        if self.state == AFTER_PROMISE:
            self.state = MAIN
        if out and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].raw + s)
        else:
            out.append(Text(s))

    def _event(self, out: list[Event], ev: Event) -> None:
        if isinstance(ev, Stray):
            out.append(ev)  # no effect on the state: a stray is as if it were not there
            return
        if isinstance(ev, Promise):
            self.state = AFTER_PROMISE if self.role == "serialized" else MAIN
        elif isinstance(ev, AsyncOpen):
            self.state = IN_BLOCK
        elif isinstance(ev, AsyncClose):
            self.state = CLOSED if self.role == "async" else MAIN
        elif self.state == AFTER_PROMISE:
            self.state = MAIN
        out.append(ev)

    def _fixed_tags(self) -> tuple[tuple[str, type], ...]:
        if self.state == IN_BLOCK:
            return ((ASYNC_CLOSE, AsyncClose),)
        if self.state == CLOSED:
            return ()
        if self.state == AFTER_PROMISE:
            return ((SYNC, Sync), (ASYNC_OPEN, AsyncOpen))
        return ((SYNC, Sync),)

    def _match(self, buf: str, j: int) -> tuple[int, int, Event | None]:
        """Classify buf[j:] (which starts with '<') as a complete tag or stray, a possible start of one, or
        neither."""
        s = buf[j : j + MAX_PROMISE_CHARS + 1]
        for tag, cls in self._fixed_tags():
            if s.startswith(tag):
                return _COMPLETE, len(tag), cls()
        head = TAG_HEAD_RE.match(s)
        if head is None:
            if any(h.startswith(s) for h in TAG_HEADS):
                return _PARTIAL, 0, None
            k = max(len(os.path.commonprefix([s, h])) for h in TAG_HEADS)
            if k >= 2 and s[k:k + 1] == "<":  # a tag start (`</`, `<prom`) cut off by the next tag
                return _COMPLETE, k, Stray(s[:k])
            if k == 1 and s[1:2] == "<":  # a run of `<` right before a tag or a stray (`<<promise .../>`,
                r = 1  # `<</<sync/>`) is a cut tag start too: shown, it would join the next piece into a tag head
                while s[r + 1:r + 2] == "<":
                    r += 1
                if r + 1 >= len(s):  # what follows the run has not arrived yet
                    return (_PARTIAL if len(s) <= MAX_PROMISE_CHARS else _NONE), 0, None
                status = self._match(s, r)[0]  # s[r + 1] is not '<': no deeper recursion
                if status == _COMPLETE:
                    return _COMPLETE, r, Stray(s[:r])
                if status == _PARTIAL:
                    return _PARTIAL, 0, None
            return _NONE, 0, None
        end = _fragment_end(s, head.end())
        if end is None:
            return _PARTIAL, 0, None
        frag = s[:end]
        if self.state in (MAIN, AFTER_PROMISE) and frag.startswith("<promise"):
            parsed = parse_promise(frag)
            if parsed is not None:
                return _COMPLETE, end, Promise(parsed[0], parsed[1], frag)
        return _COMPLETE, end, Stray(frag)


_FRAGMENT_END = re.compile(r"[<>\n]")


def _fragment_end(s: str, start: int) -> int | None:
    """End of the tag fragment that starts s (its head ends at `start`): after the first '>', before a '<' or a
    line break, or at MAX_PROMISE_CHARS; None while none of these has arrived yet."""
    m = _FRAGMENT_END.search(s, start, MAX_PROMISE_CHARS)
    if m is not None:
        return m.end() if m.group() == ">" else m.start()
    return MAX_PROMISE_CHARS if len(s) > MAX_PROMISE_CHARS else None


def parse(text: str, role: str = "serialized") -> list[Event]:
    """Parse a whole string at once."""
    p = StreamParser(role)
    return p.feed(text) + p.close()
