"""Positions, visibility and labels: the rules of docs/spec.md section 3 (V1-V5, P1-P4), shared by training and inference.

A request is a prompt plus a main thread (thread 0; the prompt is its first tokens) and async threads
1..k in promise order. Visibility is kept as *views*: a view is a list with one count per thread, and a token
sees token i of thread t iff i < view[t]; a token always sees its own thread up to and including itself.
Every view is a prefix of each thread, which is what makes this representation exact:
- async j sees main up to the last token of promise j, and every block main had joined by then, in full;
- main sees block j in full from the token that completes a `<sync/>` written after promise j.

`Layout` is incremental: the engine calls `append`, `fork` and `join` as it decodes, and `layout_segments`
replays an annotated answer through the same object to get the training/reference layout. Pure Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .render import CHUNK, CLOSE, OPEN, PROMISE, SYNC_KIND, TEXT, Segment, segments
from .tags import ASYNC_CLOSE, ASYNC_OPEN

IGNORE = -100  # label for tokens that are not trained to be predicted


LAYOUTS = ("reserve", "linear")


@dataclass(frozen=True)
class ReservePolicy:
    """Positions left for an async block after its promise: R = ceil(scale * N) + overhead; scale 0 means R = 0.

    overhead is the token length of `<async>` plus `</async>` in the model's tokenizer. `linear` is the layout
    stock vLLM can run (docs/spec.md section 3): nothing is reserved (scale 0), and a sync re-lays main's history
    in reading order at consecutive positions instead of letting main see the blocks where they were written."""

    scale: float = 1.0
    overhead: int = 0
    linear: bool = False

    def __post_init__(self):
        if self.scale < 0 or not math.isfinite(self.scale):
            raise ValueError(f"reserve scale must be a finite number >= 0, got {self.scale}")
        if self.overhead < 0:
            raise ValueError(f"reserve overhead must be >= 0, got {self.overhead}")
        if self.linear and self.scale != 0:
            raise ValueError(f"the linear layout reserves no positions: reserve scale must be 0, got {self.scale}")

    @classmethod
    def for_tokenizer(cls, tokenizer, scale: float = 1.0, layout: str = "reserve") -> "ReservePolicy":
        """The policy with the overhead of `<async>` + `</async>` in this tokenizer; `layout` 'linear' forces
        scale 0."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        n = sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in (ASYNC_OPEN, ASYNC_CLOSE))
        linear = layout == "linear"
        return cls(0.0 if linear else scale, n, linear)

    def reserve(self, tokens: int) -> int:
        """R for a promise of `tokens` tokens."""
        if self.scale == 0:
            return 0
        return math.ceil(self.scale * tokens) + self.overhead


@dataclass(frozen=True)
class Span:
    """A run of consecutive tokens of one column added together: their positions and the view they share.

    A column is a thread's run of cache slots: one per thread, except that in the linear layout main moves to a
    new column at each sync that re-lays its history."""

    thread: int  # the column (the thread id in the reserve layout)
    start: int  # index of the first token within its column
    positions: list[int]
    view: tuple[int, ...]  # visible prefix length of every thread (own entry unused)


@dataclass
class _Thread:
    view: list[int]
    next_pos: int
    count: int = 0
    last_pos: int = -1
    joined: bool = False


class Layout:
    """Incremental layout of one request: positions and views for every token as threads write them.

    Threads are numbered main 0, blocks 1, 2, ... in fork order; `append` takes a thread id. Slots live in
    columns (`threads` holds them): a block's column is its own; main's is column 0 until a linear-layout sync
    (`relay`) moves it to a new one."""

    def __init__(self, policy: ReservePolicy = ReservePolicy()):
        self.policy = policy
        self.threads: list[_Thread] = [_Thread(view=[0], next_pos=0)]  # columns
        self.column: list[int] = [0]  # thread id -> its column
        self.epoch: list[int] = []  # blocks forked since main's column began (the linear layout re-lays them)

    @property
    def num_threads(self) -> int:
        return len(self.column)

    @property
    def num_columns(self) -> int:
        return len(self.threads)

    def next_position(self, thread: int) -> int:
        """Position the thread's next token will get."""
        return self.threads[self.column[thread]].next_pos

    def append(self, thread: int, n: int) -> Span:
        """Add n tokens to a thread; return their span."""
        c = self.column[thread]
        t = self.threads[c]
        span = Span(c, t.count, list(range(t.next_pos, t.next_pos + n)), tuple(t.view))
        t.count += n
        t.next_pos += n
        if n:
            t.last_pos = t.next_pos - 1
        t.view[c] = t.count
        return span

    def _new_column(self, view: list[int], next_pos: int) -> int:
        c = len(self.threads)
        for t in self.threads:
            t.view.append(0)
        self.threads.append(_Thread(view=view + [0], next_pos=next_pos))
        return c

    def fork(self, promised_tokens: int) -> int:
        """Start an async thread right after main's last token (the end of a promise); return its id."""
        main = self.threads[self.column[0]]
        start = main.last_pos + 1
        self.column.append(self._new_column(list(main.view), start))  # it sees what main sees now
        main.next_pos += self.policy.reserve(promised_tokens)
        self.epoch.append(len(self.column) - 1)
        return len(self.column) - 1

    def join(self) -> list[int]:
        """Sync: main sees every forked block in full from its next token on; returns the ids joined now."""
        main = self.threads[self.column[0]]
        joined = []
        for j in range(1, len(self.column)):
            t = self.threads[self.column[j]]
            if not t.joined:
                t.joined = True
                main.view[self.column[j]] = t.count
                joined.append(j)
        return joined

    def after_join(self, joined: list[int]) -> None:
        """Main's token completing the sync has been added: continue past every joined block."""
        main = self.threads[self.column[0]]
        for j in joined:
            main.next_pos = max(main.next_pos, self.threads[self.column[j]].last_pos + 1)

    def relay_start(self) -> tuple[int, int]:
        """Linear layout, at a sync after `epoch` forks: (main's slots the re-laid history keeps: those the first
        block forked since main's column began saw of it, i.e. through its promise; the position of the first
        re-laid token)."""
        c = self.column[0]
        main = self.threads[c]
        shared = self.threads[self.column[self.epoch[0]]].view[c]
        return shared, main.next_pos - main.count + shared  # a linear column's positions are consecutive

    def relay(self) -> None:
        """Linear layout, at a sync after `epoch` forks: main moves to a new column that sees its current one up to
        `relay_start` (and what that one sees), at the positions right after. The interpreter then appends the
        re-laid history (blocks and main's later text, in reading order) and main's next tokens to it. Every block
        forked so far counts as joined."""
        shared, start = self.relay_start()
        view = list(self.threads[self.column[0]].view)
        view[self.column[0]] = shared
        for j in range(1, len(self.column)):
            self.threads[self.column[j]].joined = True
        self.column[0] = self._new_column(view, start)
        self.epoch = []


@dataclass
class SequenceLayout:
    """Layout of a whole serialized sequence (prompt + annotated answer), token by token in serialized order."""

    input_ids: list[int]
    thread: list[int] = field(default_factory=list)  # thread of each token
    index: list[int] = field(default_factory=list)  # index of each token within its thread
    positions: list[int] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)  # in serialized order; concatenated they cover every token
    labels: list[int] = field(default_factory=list)


def layout_segments(
    prompt_ids: list[int],
    segs: list[tuple[Segment, list[int]]],
    policy: ReservePolicy = ReservePolicy(),
    eos_id: int | None = None,
) -> SequenceLayout:
    """Layout of a prompt plus an annotated answer given as (segment, its token ids), tokenized segment by segment.

    Labels: each token predicts the next token of its own thread; the forced `<async>` tokens are never targets
    (so a promise's last token predicts main's next token after the block); a thread's last token predicts
    nothing, except main's, which predicts `eos_id` when given."""
    lay = Layout(policy)
    out = SequenceLayout(input_ids=[])
    forced: list[bool] = []

    def add(thread: int, ids: list[int], is_forced: bool = False) -> None:
        if not ids:
            return
        span = lay.append(thread, len(ids))
        out.spans.append(span)
        out.input_ids.extend(ids)
        out.thread.extend([thread] * len(ids))
        out.index.extend(range(span.start, span.start + len(ids)))
        out.positions.extend(span.positions)
        forced.extend([is_forced] * len(ids))

    add(0, list(prompt_ids))
    current = 0
    for seg, ids in segs:
        if seg.kind == TEXT:
            add(0, ids)
        elif seg.kind == PROMISE:
            add(0, ids)
            current = lay.fork(seg.tokens)
        elif seg.kind == OPEN:
            add(current, ids, is_forced=True)
        elif seg.kind in (CHUNK, CLOSE):
            add(current, ids)
            if seg.kind == CLOSE:
                current = 0
        elif seg.kind == SYNC_KIND:
            add(0, ids[:-1])
            joined = lay.join()
            add(0, ids[-1:])
            lay.after_join(joined)
        else:
            raise ValueError(f"unknown segment kind {seg.kind!r}")

    # Labels: the next token of the same thread, unless it is forced.
    n = len(out.input_ids)
    out.labels = [IGNORE] * n
    last_of: dict[int, int] = {}
    for i in range(n):
        t = out.thread[i]
        if t in last_of:
            out.labels[last_of[t]] = IGNORE if forced[i] else out.input_ids[i]
        last_of[t] = i
    if eos_id is not None and 0 in last_of and last_of[0] >= len(prompt_ids):
        out.labels[last_of[0]] = eos_id
    for i in range(len(prompt_ids) - 1):
        out.labels[i] = IGNORE
    return out


def layout_examples(
    prompt_ids: list[int],
    segs: list[tuple[Segment, list[int]]],
    policy: ReservePolicy = ReservePolicy(),
    eos_id: int | None = None,
) -> list[SequenceLayout]:
    """The training examples of one annotated answer in the policy's layout. The reserve layout gives one
    (`layout_segments`). The linear layout gives one per re-laid sync (docs/spec.md LL2) plus one for the rest: an
    example ends with a sync that joined blocks (its last token predicts nothing there), and the next one's prompt is
    everything so far in reading order, whose last token (the sync's) predicts main's next token, or EOS when the
    answer ends with that sync."""
    if not policy.linear:
        return [layout_segments(prompt_ids, segs, policy, eos_id)]
    out: list[SequenceLayout] = []
    prefix, piece, forked = list(prompt_ids), [], False
    for seg, ids in segs:
        piece.append((seg, ids))
        forked = forked or seg.kind == PROMISE
        if seg.kind == SYNC_KIND and forked:
            out.append(layout_segments(prefix, piece, policy, None))
            prefix = prefix + [i for _, part in piece for i in part]
            piece, forked = [], False
    last = layout_segments(prefix, piece, policy, eos_id)
    if not piece and eos_id is not None and out:
        last.labels[-1] = eos_id  # the answer ends with the sync
    out.append(last)
    return out


def tokenize_segments(tokenizer, annotated: str) -> list[tuple[Segment, list[int]]]:
    """Tokenize an annotated answer segment by segment (never across a tag boundary)."""
    return [(s, list(tokenizer.encode(s.text, add_special_tokens=False))) for s in segments(annotated)]


def trace_layout(trace: dict) -> SequenceLayout:
    """The training example of one decode, from `Trace.to_json()` (pastalm.engine.interpreter): the token ids the
    engine fed, in its columns, positions and views, each labelled with the token its logits chose (IGNORE where
    none was chosen: the prompt, forced tags, re-laid history). A full forward over it with `layout_mask` gives the
    logits the engine decoded with, so stage 2 scores exactly the answer that was sampled."""
    out = SequenceLayout(input_ids=[])
    targets = {(c, i): t for c, i, t in trace["targets"]}
    for (c, start, pos, n, view), ids in zip(trace["spans"], trace["ids"]):
        if len(ids) != n:
            raise ValueError(f"a trace span of {n} tokens has {len(ids)} ids")
        span = Span(c, start, list(range(pos, pos + n)), tuple(view))
        out.spans.append(span)
        out.input_ids.extend(ids)
        out.thread.extend([c] * n)
        out.index.extend(range(start, start + n))
        out.positions.extend(span.positions)
        out.labels.extend(targets.pop((c, start + i), IGNORE) for i in range(n))
    if targets:
        raise ValueError(f"{len(targets)} trace targets name slots the trace does not feed")
    return out
