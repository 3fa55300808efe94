"""The PASTA-LANG interpreter: a per-request state machine over threads, tags and limits. No tensors here.

Each step the engine asks `schedule()` for the tokens to feed (one span per thread, with positions and views
from the shared `Layout`), runs one forward pass, marks the feeds as `fed` (which says which threads want a
token) and hands each of those threads its next token (`write`). The interpreter detokenizes and parses each thread's text and acts on what it finds:
fork on a completed promise, pause main on a completed `<sync/>` until its blocks are done, end a block on
`</async>`, on its budget or on EOS, and finish when main is done and every block is done.

Every written token is fed to the cache (so main sees exactly the text a block wrote), except a stop token.
"""

from __future__ import annotations

import bisect
import re
import weakref
from dataclasses import dataclass, field
from enum import IntEnum

from ..lang.layout import Layout, ReservePolicy, Span
from ..lang.parser import AsyncClose, Promise, Stray, StreamParser, Sync, Text
from ..lang.tags import ASYNC_CLOSE, ASYNC_OPEN, TAG_HEAD_RE, TAG_TOKENS

_LIST_MARKER = re.compile(r"^\s*(?:#+|[-*+]|\d+[.)])\s+")
# A line that may be a list item's lead (`2. **Design**:`, `- Buy`, `**Tip**`, the `2` before its `.`, or only the
# indentation before one): while
# main's unfinished last line looks like this and is at most LEAD_HOLD characters, the stream holds it back, so
# that a lead a runaway guard refuses is never shown (docs/spec.md section 5).
_LEAD_LIKE = re.compile(r"^[ \t]*(?:\d{1,3}(?:[.)]|$)|[-*+#]|\*\*?|$)")
LEAD_HOLD = 80
_NOT_WORD = re.compile(r"[^\w\s]+")

STOP = -1  # what `scripted` returns once a thread's script is used up: the thread ends as on EOS
from .detok import Detokenizer


class Status(IntEnum):
    """Ordered: a thread at FINISHING or later writes nothing new; DONE needs nothing fed."""

    RUNNING = 0
    WAITING = 1  # main wrote a <sync/>; its last token waits to be fed until the blocks are done
    FINISHING = 2  # the thread ended; its last written tokens still go into the cache
    DONE = 3


@dataclass
class Limits:
    """Budgets of one request. `None` means no limit of that kind."""

    max_new_tokens: int = 512  # tokens chosen by all threads together (forced <async> tags not counted)
    async_factor: float = 2.0  # a block's chunk may take factor * promised tokens (+ its two tags) ...
    async_cap: int = 512  # ... but never more than this (+ its two tags)
    max_threads: int = 8  # live async threads; a promise past this is decoded inline by main
    max_promises: int | None = None  # runaway guard: main ends at a promise past this many in one answer
    repeat_guard: bool = True  # runaway guard: main ends at a promise whose topic (or lead) an earlier promise had
    block_guard: bool = True  # a block cannot choose a one-token promise (masked), and one that spells a promise
    # out (a stray: blocks cannot fork) ends there
    max_context: int | None = None  # cache slots (prompt, every written token, re-laid copies): a memory bound
    # (not the context a thread sees: that is bounded by max_positions; issue 26: the linear layout's copies of the
    # history counted against the model's positions and ended answers that fit them)
    max_positions: int | None = None  # rotary positions the model supports

    def __post_init__(self):
        for name in ("max_new_tokens", "async_cap"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.async_factor <= 0:
            raise ValueError(f"async_factor must be > 0, got {self.async_factor}")
        if self.max_threads < 0:
            raise ValueError(f"max_threads must be >= 0, got {self.max_threads}")
        if self.max_promises is not None and self.max_promises < 1:
            raise ValueError(f"max_promises must be a positive integer, got {self.max_promises}")
        for name in ("max_context", "max_positions"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v}")


@dataclass
class Thread:
    """One thread of a request: main (id 0, whose first tokens are the prompt) or an async block."""

    id: int
    parser: StreamParser
    detok: Detokenizer
    tokens: list[int] = field(default_factory=list)  # every token written (prompt and forced ones included)
    num_prompt: int = 0  # main: how many of `tokens` are the prompt
    num_fed: int = 0  # tokens already in the cache
    num_chosen: int = 0  # tokens chosen by the model (or its script), forced ones excluded
    status: Status = Status.RUNNING
    events: list = field(default_factory=list)  # parser events, in order
    forks: dict[int, int] = field(default_factory=dict)  # main: event index of a promise -> its thread id
    budget: int = 0  # async: max tokens it may write, its tags included
    text_budget: int = 0  # async: tokens it may choose besides its </async> (async_factor x promised, capped)
    closed: bool = False  # async: wrote </async>
    finish: str = ""  # why it ended: "eos", "close", "budget", "max_new_tokens", "context", "script"
    start_clock: int = 0  # critical-path clock when it started
    script: list[int] | None = None  # forced replay: the tokens to write instead of sampled ones
    pending_forks: list[tuple[int, int, int]] = field(default_factory=list)  # (event index, tokens, ordinal)
    inline_pending: bool = False  # main: a promise past the thread limit waits for its forced <async>
    forked_at: int = 0  # async: main's tokens (prompt included) when it forked
    relay: list[int] = field(default_factory=list)  # main, linear layout: re-laid history fed before its tokens
    slot: tuple[int, int] | None = None  # (column, index) of its last fed token: the query of its next token
    ends: list[int] = field(default_factory=list)  # end offset in the parsed text of each token the parser got
    infos: dict[int, tuple] = field(default_factory=dict)  # index in `ends` -> that token's logprob info, if asked

    @property
    def is_main(self) -> bool:
        return self.id == 0

    @property
    def num_generated(self) -> int:
        """Tokens written after the prompt, forced ones included."""
        return len(self.tokens) - self.num_prompt

    def pending(self) -> int:
        return len(self.tokens) - self.num_fed

    def text(self) -> str:
        """This thread's rendered text so far (a block's chunk; main without its blocks)."""
        return "".join(e.raw for e in self.events if isinstance(e, Text))


@dataclass
class Feed:
    """Tokens of one thread to feed in this step, with their layout span (`span.thread` is the column; after a
    linear-layout sync, main's first feed also carries the re-laid history before its own tokens)."""

    thread: int
    ids: list[int]
    span: Span
    last: int = -1  # index in the thread's `tokens` of the last token fed


@dataclass
class Trace:
    """What one request fed and chose, slot by slot: every feed's span and token ids, and for each fed slot whose
    logits chose a token, that token (`targets`, keyed by (column, index)). `trace_layout` turns it into the
    training example of exactly this decode: the sampled ids (merges, budget cuts and all), the positions and the
    masks the engine used (stage 2 trains on it, issue 15)."""

    spans: list[Span] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    targets: dict[tuple[int, int], int] = field(default_factory=dict)

    def to_json(self) -> dict:
        """A compact, JSON-able form: feeds of one column merged where nothing but their own column's count
        changed between them (a thread's text between forks and joins is one span, as in training)."""
        merged: list[list] = []  # [column, start, first position, count, view]
        ids_out: list[list[int]] = []
        for sp, ids in sorted(zip(self.spans, self.ids), key=lambda x: (x[0].thread, x[0].start)):
            if not ids:
                continue
            if merged:
                c, start, pos, k, v = merged[-1]
                if (c == sp.thread and start + k == sp.start and pos + k == sp.positions[0]
                        and _same_view(v, sp.view, c)):
                    merged[-1][3] += len(ids)
                    ids_out[-1] += ids
                    continue
            merged.append([sp.thread, sp.start, sp.positions[0], len(ids), list(sp.view)])
            ids_out.append(list(ids))
        return {"spans": merged, "ids": ids_out,
                "targets": sorted([c, i, t] for (c, i), t in self.targets.items())}


_TAG_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {token id: holds a tag head}
_ONE_TOKEN_TAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {tag: id} of its one-token tags


def tag_token_ids(tokenizer, prefix: str = "<") -> tuple[int, ...]:
    """The ids of the vocabulary entries that are a whole tag each (a tag-token tokenizer, docs/spec.md section 6;
    none on a plain one), of the tags that start with `prefix` (`"<promise"`: the promises only)."""
    try:
        found = _ONE_TOKEN_TAGS[tokenizer]
    except (KeyError, TypeError):
        vocab = tokenizer.get_vocab()
        found = {t: vocab[t] for t in TAG_TOKENS if t in vocab}
        try:
            _ONE_TOKEN_TAGS[tokenizer] = found
        except TypeError:  # a tokenizer that cannot be weakly referenced: no memo
            pass
    return tuple(sorted(i for t, i in found.items() if t.startswith(prefix)))


def promise_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids of the vocabulary entries that are a whole promise tag each (none on a plain tokenizer)."""
    return tag_token_ids(tokenizer, "<promise")


def _touches(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the characters [lo, hi) meet one of `spans` (sorted, disjoint [begin, end) ranges)."""
    k = bisect.bisect_left(spans, (hi,))  # the spans that begin before hi; the last of them ends last
    return k > 0 and spans[k - 1][1] > lo


def _same_view(a, b, own: int) -> bool:
    """Equal views but for column `own` (a column a view does not list yet counts 0)."""
    n = max(len(a), len(b))
    return all((a[j] if j < len(a) else 0) == (b[j] if j < len(b) else 0) for j in range(n) if j != own)


class Interpreter:
    """State of one request: threads, layout, limits and the measures of the result."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop_ids: set[int], policy: ReservePolicy,
                 limits: Limits = Limits(), sequential: bool = False, scripts: list[list[int]] | None = None,
                 open_block_scripts: bool = False, trace: bool = False):
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.limits = limits
        self.open_ids = list(tokenizer.encode(ASYNC_OPEN, add_special_tokens=False))
        self.close_ids = list(tokenizer.encode(ASYNC_CLOSE, add_special_tokens=False))
        self.linear = policy.linear
        self.policy = policy
        self.tag_overhead = policy.overhead  # tokens of <async> + </async>
        self.layout = Layout(policy)
        self.sequential = sequential
        self.scripts = scripts
        self.open_block_scripts = open_block_scripts  # a block's script is a forced prefix, then it decodes freely
        # what a block may not choose (`banned`), looked up once per request: the decode step asks for every token
        self.block_banned = promise_token_ids(tokenizer) if limits.block_guard and not sequential else ()
        self.limits_hit: list[str] = []
        self.num_promises = 0
        self.topics: set[str] = set()  # normalized topics of main's promises so far (the repeat guard)
        self.refused: int | None = None  # index in main.events of the promise a runaway guard refused
        self.num_slots = 0
        self.clock = 0  # critical-path length of main so far, in written tokens
        self.critical = 0  # longest finished path so far
        self.threads: list[Thread] = []
        self.trace = Trace() if trace else None  # what was fed and chosen, slot by slot (`Trace`)
        main = self._new_thread(0, "main")
        main.tokens = list(prompt_ids)
        main.num_prompt = len(prompt_ids)
        main.script = list(scripts[0]) if scripts else None

    # -- scheduling ---------------------------------------------------------------------------------------------

    def _new_thread(self, tid: int, role: str) -> Thread:
        t = Thread(tid, StreamParser(role), Detokenizer(self.tokenizer))
        self.threads.append(t)
        return t

    @property
    def main(self) -> Thread:
        return self.threads[0]

    @property
    def finished(self) -> bool:
        return all(t.status == Status.DONE for t in self.threads)

    def live_blocks(self) -> int:
        return sum(1 for t in self.threads[1:] if t.status < Status.DONE)

    def schedule(self, chunk: int | None = None) -> list[Feed]:
        """The spans to feed in the next forward pass (empty when the request is finished). `chunk` caps how many
        of main's pending tokens (a prompt, above all) go in at once: the rest follow in the next steps (chunked
        prefill), and main asks for a token only once all are in."""
        feeds: list[Feed] = []
        blocks = [t for t in self.threads[1:] if t.status < Status.DONE and t.pending()]
        main = self.main
        # a token that completes a promise and a <sync/> (a merge, an added token) forks that block first: main
        # joins only once every block forked so far, this one included, is done
        join = main.status == Status.WAITING and not main.pending_forks and all(
            t.status == Status.DONE or (t.status == Status.FINISHING and t in blocks) for t in self.threads[1:])
        relay = self._relay_tail() if join and self.linear and self.layout.epoch else None
        want = sum(t.pending() for t in blocks)
        main_end = None
        if main.status == Status.RUNNING or join:
            want += main.pending()
            main_end = self.layout.next_position(0) + main.pending() - 1
            if relay is not None:
                want += len(relay)
                main_end = self.layout.relay_start()[1] + len(relay) + main.pending() - 1
        want += len(self.open_ids) * len(main.pending_forks)
        if not self._fits(want, blocks, main_end):
            return []
        for t in blocks:
            feeds.append(self._feed(t))
        if join:
            if relay is not None:  # linear layout: main goes on from its history re-laid in reading order
                self.clock = max([self.clock] + [self._end_clock(self.threads[j]) for j in self.layout.epoch])
                self.layout.relay()
                main.relay = relay
                feeds.append(self._feed(main))
            else:
                joined = self.layout.join()
                self.clock = max([self.clock] + [self._end_clock(self.threads[j]) for j in joined])
                feeds.append(self._feed(main))
                self.layout.after_join(joined)
            main.status = Status.RUNNING
        elif main.status == Status.RUNNING and main.pending():
            feeds.append(self._feed(main, chunk))
        # main's tokens a block forked now sees: all of them, unless main waits at a <sync/> whose token also
        # completed this promise; that token is fed at the join, after the block (docs/spec.md E3)
        seen = feeds[-1].last + 1 if feeds and feeds[-1].thread == 0 else main.num_fed
        for event_index, promised, ordinal in main.pending_forks:
            tid = self.layout.fork(promised)
            t = self._new_thread(tid, "async")
            t.forked_at = seen
            t.text_budget = min(self.limits.async_cap, int(self.limits.async_factor * promised))
            t.budget = t.text_budget + self.tag_overhead
            if self.limits.max_positions is not None:  # the block ends at the last position, not past it
                t.budget = min(t.budget, self.limits.max_positions - self.layout.next_position(tid))
            t.start_clock = self.clock
            t.tokens = list(self.open_ids)
            for i in self.open_ids:
                t.detok.add(i)  # context for the chunk's first token; the tag itself is not parsed
            t.script = self._block_script(ordinal)
            main.forks[event_index] = tid
            feeds.append(self._feed(t))
        main.pending_forks.clear()
        return feeds

    def _fits(self, want: int, blocks: list[Thread], main_end: int | None) -> bool:
        """Check the context and position limits before writing `want` more slots (`main_end`: the position of
        main's last slot to feed, if main feeds); end the request if not."""
        lim = self.limits
        over = lim.max_context is not None and self.num_slots + want > lim.max_context
        if lim.max_positions is not None:
            ends = [self.layout.next_position(t.id) + t.pending() - 1 for t in blocks]
            if main_end is not None:
                ends.append(main_end)
            over = over or any(e >= lim.max_positions for e in ends)
        if over and want:
            self.stop("context")
            return False
        return True

    def _relay_tail(self) -> list[int]:
        """Linear layout, at a sync whose blocks are done: main's history after the first promise that forked since
        its column began (`Layout.relay_start`), re-laid in reading order: each block's tokens right after main's
        token that forked it (`</async>` added when it wrote none), and main's already fed tokens in between."""
        main, epoch = self.main, self.layout.epoch
        tail: list[int] = []
        for k, tid in enumerate(epoch):
            b = self.threads[tid]
            tail += b.tokens + ([] if b.closed else self.close_ids)
            end = self.threads[epoch[k + 1]].forked_at if k + 1 < len(epoch) else main.num_fed
            tail += main.tokens[b.forked_at:end]
        return tail

    def _feed(self, t: Thread, chunk: int | None = None) -> Feed:
        own = t.tokens[t.num_fed :]
        if chunk is not None and not t.relay:
            own = own[: max(1, chunk)]
        ids = t.relay + own
        t.relay = []
        span = self.layout.append(t.id, len(ids))
        self.num_slots += len(ids)
        if self.trace is not None:
            self.trace.spans.append(span)
            self.trace.ids.append(ids)
        return Feed(t.id, ids, span, t.num_fed + len(own) - 1)

    def _block_script(self, ordinal: int) -> list[int] | None:
        """Forced replay: the script of the block that keeps promise number `ordinal` (0-based)."""
        if self.scripts is None:
            return None
        return list(self.scripts[ordinal + 1]) if ordinal + 1 < len(self.scripts) else []

    # -- after the forward pass ----------------------------------------------------------------------------------

    def fed(self, feeds: list[Feed]) -> list[int]:
        """Mark the feeds as in the cache; return the ids of threads that now want a next token."""
        want = []
        for f in feeds:
            t = self.threads[f.thread]
            t.num_fed = f.last + 1
            if f.ids:
                t.slot = (f.span.thread, f.span.start + len(f.ids) - 1)
            if t.status == Status.FINISHING and not t.pending():
                self._done(t)
            elif t.status == Status.RUNNING and not t.pending():
                want.append(t.id)
        return want

    def scripted(self, tid: int) -> int | None:
        """Forced replay: the next token of the thread's script (a stop id once it runs out), or None.

        With `open_block_scripts`, a block whose script ran out returns None (it goes on decoding freely)."""
        t = self.threads[tid]
        if t.script is None:
            return None
        if t.num_chosen < len(t.script):
            return t.script[t.num_chosen]
        return None if self.open_block_scripts and not t.is_main else STOP

    def banned(self, tid: int) -> tuple[int, ...]:
        """Token ids thread `tid` may not choose: with the block guard, a block's one-token promises (only main
        forks; a block that wrote one would end there, mid-sentence, by the guard: issue 24)."""
        return () if self.threads[tid].is_main else self.block_banned

    def write(self, tid: int, token: int, info=None) -> None:
        """Thread `tid` chose `token`: record it and act on the text it completes. `info`: the token's log-probability
        and top alternatives, `(logprob, [(token id, logprob), ...])`, when the request asked for them."""
        t = self.threads[tid]
        if t.status != Status.RUNNING:  # ended by a limit earlier in this step
            return
        if token == STOP or token in self.stop_ids:
            t.finish = "script" if token == STOP else "eos"
            if token != STOP and self.trace is not None:
                self._target(t, token)
            self._done(t)
            return
        if not t.is_main and t.num_chosen >= t.text_budget and not self._continues_close(t, token):
            t.finish = "budget"  # its text budget is spent and this token does not close it: not written
            self._hit(f"async_budget(thread {t.id})")
            self._done(t)
            return
        t.tokens.append(token)
        t.num_chosen += 1
        if self.trace is not None:
            self._target(t, token)
        if t.is_main:
            self.clock += 1
        for ev in t.parser.feed(self._parsed(t, token, info)):
            self._on_event(t, ev)
        if t.inline_pending and t.status == Status.RUNNING:  # after every event of this token: text that came
            self._open_inline(t)  # with the promise's end precedes the block
        if not t.is_main and t.status == Status.RUNNING and self._over_budget(t):
            t.status, t.finish = Status.FINISHING, "budget"
            self._hit(f"async_budget(thread {t.id})")
        if self.num_chosen() >= self.limits.max_new_tokens:
            self.stop("max_new_tokens")

    @staticmethod
    def _parsed(t: Thread, token: int, info) -> str:
        """The text `token` adds to what the thread's parser reads, noting which token wrote which characters."""
        piece = t.detok.add(token)
        if info is not None:
            t.infos[len(t.ends)] = info
        t.ends.append((t.ends[-1] if t.ends else 0) + len(piece))
        return piece

    def _target(self, t: Thread, token: int) -> None:
        """Trace: the slot whose logits chose `token` (the thread's last fed one) gets it as its target."""
        if t.slot is not None:
            self.trace.targets[t.slot] = token

    def _on_event(self, t: Thread, ev) -> None:
        t.events.append(ev)  # its index in main.events is what a fork is filed under
        if not t.is_main:
            if isinstance(ev, AsyncClose):
                t.closed = True
                if t.status == Status.RUNNING:  # a guard that ended it earlier in this token keeps its reason,
                    t.status, t.finish = Status.FINISHING, "close"  # as `limits_hit` has it
            elif (isinstance(ev, Stray) and self.limits.block_guard and ev.raw.startswith("<promise")
                  and t.status == Status.RUNNING):
                t.status, t.finish = Status.FINISHING, "block_guard"
                self._hit(f"block_guard(thread {t.id})")
            return
        if t.status == Status.DONE:  # a guard ended main earlier in this token: the rest is kept, not acted on
            return
        if isinstance(ev, Promise) and not t.parser.in_block:
            if self._runaway(ev):
                return
            ordinal = self.num_promises
            self.num_promises += 1
            fits = self._fork_fits(ev.tokens)
            if not self.sequential and fits and self.live_blocks() + len(t.pending_forks) < self.limits.max_threads:
                t.pending_forks.append((len(t.events) - 1, ev.tokens, ordinal))
            else:
                if not self.sequential:
                    self._hit("max_threads" if fits else "max_positions")
                    script = self._block_script(ordinal)
                    if script is not None:  # replay: main writes this block's tokens itself
                        t.script[t.num_chosen : t.num_chosen] = script
                t.inline_pending = True  # decode this block inline, in main
        elif isinstance(ev, Sync):
            t.status = Status.WAITING

    def _over_budget(self, t: Thread) -> bool:
        """`budget` (tags included, clamped at the model's last position) is a block's hard end; past its
        `text_budget` a block may only write its `</async>` (`write`), so the close tag's allowance is never
        spent as text."""
        return t.num_generated >= t.budget or t.num_chosen >= t.text_budget + len(self.close_ids)

    def _continues_close(self, t: Thread, token: int) -> bool:
        """Whether `token` begins or continues the block's `</async>` (after what the parser holds back)."""
        piece = t.parser.held + self.tokenizer.decode([token])
        return ASYNC_CLOSE.startswith(piece) or piece.startswith(ASYNC_CLOSE)

    def _fork_fits(self, promised: int) -> bool:
        """Whether a block forked at this promise fits the model's positions: its forced `<async>` and at least
        one token of its own, and (reserve layout) main's next token after the reservation. If not, main decodes
        the block inline: a position limit ends only what it concerns, not the whole answer."""
        lim = self.limits.max_positions
        if lim is None:
            return True
        main = self.main
        start = self.layout.next_position(0) + main.pending()  # the block's first position: right after the promise
        reserved = sum(self.policy.reserve(p) for _, p, _ in main.pending_forks) + self.policy.reserve(promised)
        return start + len(self.open_ids) < lim and start + reserved < lim

    def _runaway(self, ev: Promise) -> bool:
        """The runaway guards (docs/spec.md, "Limits"): a promise past `max_promises`, or one whose topic (without a
        topic: the lead on its line) repeats an earlier promise's (`repeat_guard`), ends main there: the promise
        forks nothing, the blocks already forked finish, and `limits_hit` says which guard ended it. Main's text so
        far stays, and the raw form keeps the promise."""
        lim = self.limits
        key = " ".join(ev.topic.lower().split()) or self._lead_key()
        if lim.max_promises is not None and self.num_promises >= lim.max_promises:
            reason = "max_promises"
        elif lim.repeat_guard and key and key in self.topics:
            reason = "repeated_topic"
        else:
            self.topics.add(key)
            return False
        main = self.main
        main.finish = reason
        self.refused = len(main.events) - 1
        self._hit(reason)
        self._done(main)
        return True

    def _lead_key(self) -> str:
        """The repeat guard's key of a promise without a topic (scheme v3): main's text on the promise's line,
        lower-cased, without its list marker, markup and punctuation (`3. **Buy in bulk**:` -> `buy in bulk`)."""
        parts = []
        for e in reversed(self.main.events[:-1]):
            if isinstance(e, Promise):
                break
            if isinstance(e, Text):
                parts.append(e.raw)
                if "\n" in e.raw:
                    break
        line = "".join(reversed(parts)).rsplit("\n", 1)[-1]
        line = _LIST_MARKER.sub("", line.lower())
        return " ".join(_NOT_WORD.sub(" ", line).split())

    def _open_inline(self, t: Thread) -> None:
        """Force the `<async>` of a block main decodes inline. When the token that completed the promise also began
        the next tag (`"/` + `><`), the parser holds that '<': force only the rest of `<async>`, so the text reads
        `"/><async>` and not `"/><<async>` (which would leave the '<' as text and the block unopened). Anything
        else held back is let go first (a stray)."""
        t.inline_pending = False
        held = t.parser.held
        if held and ASYNC_OPEN.startswith(held):
            ids = list(self.tokenizer.encode(ASYNC_OPEN[len(held):], add_special_tokens=False))
        else:
            t.events.extend(t.parser.close())
            ids = self.open_ids
        t.parser.expect_block()
        t.tokens.extend(ids)
        self.clock += len(ids)
        for i in ids:
            t.events.extend(t.parser.feed(self._parsed(t, i, None)))

    def _done(self, t: Thread) -> None:
        t.status = Status.DONE
        for e in t.parser.close():
            t.events.append(e)
        if t.is_main:
            self.critical = max(self.critical, self.clock)
        else:
            self.critical = max(self.critical, self._end_clock(t))

    def _end_clock(self, t: Thread) -> int:
        return t.start_clock + t.num_generated

    def stop(self, reason: str) -> None:
        """End every thread that is still going, report `reason` in limits_hit; text written so far is kept."""
        if self.finished:
            return
        self._hit(reason)
        for t in self.threads:
            if t.status < Status.DONE:
                t.finish = t.finish or reason
                self._done(t)

    def _hit(self, what: str) -> None:
        if what not in self.limits_hit:
            self.limits_hit.append(what)

    # -- results -----------------------------------------------------------------------------------------------

    def num_chosen(self) -> int:
        """Tokens the model chose (what max_new_tokens limits); forced tags are not counted."""
        return sum(t.num_chosen for t in self.threads)

    def num_generated(self) -> int:
        return sum(t.num_generated for t in self.threads)

    def raw(self) -> str:
        """The serialized inline form: each forked block written right after its promise."""
        out = []
        for i, ev in enumerate(self.main.events):
            out.append(ev.raw)
            tid = self.main.forks.get(i)
            if tid is not None:
                b = self.threads[tid]
                out.append(ASYNC_OPEN + "".join(e.raw for e in b.events) + ("" if b.closed else ASYNC_CLOSE))
        return "".join(out)

    def rendered(self, complete: bool = False) -> str:
        """The answer in reading order; with complete=False only what can be shown now (for streaming)."""
        return "".join(text for _, text, _ in self._pieces(complete)[0])

    def hidden_text(self) -> str:
        """Main's text the rendered answer leaves out: a refused lead, and what followed the refused promise in the
        same token."""
        if self.refused is None:
            return ""
        after = "".join(e.raw for e in self.main.events[self.refused + 1:] if isinstance(e, Text))
        return self._pieces(complete=True)[1] + after

    def _pieces(self, complete: bool) -> tuple[list[tuple[int, str, int]], str]:
        """The rendered answer as (thread, text, offset of the text in the thread's parsed text) pieces in reading
        order, and the lead left out of it: the lead of a promise a runaway guard refused, or, while main is running
        (not `complete`), main's unfinished last line when it may be such a lead (docs/spec.md section 5)."""
        pieces: list[tuple[int, str, int]] = []
        main = self.main
        waiting = {e for e, _, _ in main.pending_forks}  # promises whose block forks at the next step
        events = main.events if self.refused is None else main.events[: self.refused]
        tail = 0  # where main's current run of text begins in `pieces`
        stopped = False
        at = 0
        for i, ev in enumerate(events):
            if isinstance(ev, Text):
                pieces.append((0, ev.raw, at))
            elif isinstance(ev, Promise):
                tail = len(pieces)  # a lead is text after main's last promise (forked or decoded inline)
            at += len(ev.raw)
            tid = main.forks.get(i)
            if tid is None:
                if i in waiting and not complete:
                    stopped = True
                    break  # its block comes next in reading order; text after the promise must wait for it
                continue
            b = self.threads[tid]
            own = self._text_pieces(b)
            pieces.extend(own or [(tid, "", 0)])  # an empty block still has its (empty) piece
            tail = len(pieces)
            if b.status < Status.DONE and not complete:
                stopped = True
                break
        held = self.refused is not None or (not complete and not stopped and self._guarded()
                                            and main.status < Status.FINISHING)
        return pieces, self._drop_held_lead(pieces, tail) if held else ""

    @staticmethod
    def _text_pieces(t: Thread) -> list[tuple[int, str, int]]:
        out, at = [], 0
        for e in t.events:
            if isinstance(e, Text):
                out.append((t.id, e.raw, at))
            at += len(e.raw)
        return out

    def _guarded(self) -> bool:
        """Whether a runaway guard could refuse main's next promise: only then may a lead be held back. Before
        main's first promise nothing can repeat, so an answer's first lead streams at once."""
        lim = self.limits
        return ((lim.max_promises is not None and self.num_promises >= lim.max_promises)
                or (lim.repeat_guard and any(self.topics)))

    @staticmethod
    def _drop_held_lead(pieces: list[tuple[int, str, int]], tail: int) -> str:
        """Cut main's last line (from its last line break on, within main's last run of text) when it may be a
        lead: at most LEAD_HOLD characters that look like a list item's start. Returns what was cut."""
        run = "".join(text for _, text, _ in pieces[tail:])
        line = run[run.rfind("\n") + 1:]
        if not line or len(line) > LEAD_HOLD or not _LEAD_LIKE.match(line):
            return ""
        cut = len(line)
        while cut:
            tid, text, at = pieces[-1]
            if len(text) <= cut:
                pieces.pop()
                cut -= len(text)
            else:
                pieces[-1] = (tid, text[: len(text) - cut], at)
                cut = 0
        return line

    def pieces(self) -> list[dict]:
        """The rendered answer in reading order as pieces of one thread each: main's text between forks and each
        block's chunk, with the thread id and why that thread ended (quality checks look at truncated chunks)."""
        out: list[dict] = []
        for tid, text, _ in self._pieces(complete=True)[0]:
            if out and out[-1]["thread"] == tid:
                out[-1]["text"] += text
            else:
                out.append({"thread": tid, "text": text, "finish": self.threads[tid].finish})
        return out

    def token_logprobs(self, complete: bool = False) -> list[dict]:
        """The rendered answer (what `rendered(complete)` shows) token by token in reading order: per token that
        shows text, {"text": the characters it shows, "id", "logprob", "top": [(id, logprob), ...], "thread"} (logprob None
        for a token the model did not choose: a forced or replayed one). The texts join to the rendered answer; a
        token that also wrote a tag shows only its text, one that wrote only tag characters has no entry, and one
        that wrote only part of a character shows '' (the token that completes the character shows it). `top`
        leaves out tag tokens (`_untagged`), so no tag is in any entry."""
        return [entry for _, entry in self.token_entries(complete)]

    def token_entries(self, complete: bool = False, start: int = 0) -> list[tuple[tuple[int, int], dict]]:
        """`token_logprobs` with each entry's key (thread, index of the token in the thread's text), from the entry
        at character `start` of the rendered answer on, give or take the entries that end there: a stream that has
        sent the answer up to `start` finds its next entry by key, at the cost of the new text only, not of the
        whole answer at every step."""
        out: list[tuple[tuple[int, int], dict]] = []
        pos = 0  # characters of the rendered answer before this piece
        for tid, text, begin in self._pieces(complete)[0]:
            end = begin + len(text)
            pos += len(text)
            if pos < start:  # the piece ends before `start`: all sent
                continue
            t = self.threads[tid]
            first = t.num_prompt if t.is_main else len(self.open_ids)  # t.tokens[first + k] wrote t.ends[k]
            # the first token that ends at or after `start` (ends before it were sent whole)
            k = bisect.bisect_left(t.ends, max(begin, end - (pos - start)))
            while k < len(t.ends) and (t.ends[k - 1] if k else 0) < end:
                lo, hi = max(begin, t.ends[k - 1] if k else 0), min(end, t.ends[k])
                # a token that shows nothing yet (part of a character: the next token completes it) is listed
                # where it stands, with empty text; one that ends where the piece begins wrote only what comes before
                # it (a tag's last token): no entry
                if hi > lo or t.ends[k] == (t.ends[k - 1] if k else 0):
                    shown = text[lo - begin: hi - begin]
                    if out and out[-1][0] == (tid, k):
                        out[-1][1]["text"] += shown
                    else:
                        info = t.infos.get(k)
                        out.append(((tid, k), {"text": shown, "id": t.tokens[first + k],
                                               "logprob": info[0] if info else None,
                                               "top": self._untagged(info[1]) if info else [], "thread": tid}))
                k += 1
        return out

    def _untagged(self, top: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """`top` without its tag tokens (a token whose text holds a tag head: on a tag-token tokenizer, each tag).
        No tag reaches a logprob field, so such an alternative is left out, not replaced: the list may be shorter
        than asked."""
        try:
            memo = _TAG_IDS.setdefault(self.tokenizer, {})
        except TypeError:  # a tokenizer that cannot be weakly referenced: no memo
            memo = {}
        out = []
        for i, v in top:
            if i not in memo:
                memo[i] = TAG_HEAD_RE.search(self.tokenizer.decode([i])) is not None
            if not memo[i]:
                out.append((i, v))
        return out

    def token_counts(self) -> tuple[int, int, int]:
        """The written tokens by what they wrote: (rendered, tag, hidden). Rendered: it wrote characters of the
        rendered answer (`token_logprobs` lists it); else hidden: main's text the answer leaves out (`hidden_text`);
        else a tag token: only tag characters (strays included), or a block's forced `<async>`. A token that wrote
        only part of a character counts with that character, and one whose character a thread's end cut short in
        none, so the three add up to every written token but those. Counted as written, not by re-encoding the
        text: a tag the model spelled out in pieces is all its pieces, on a tokenizer with the tags as tokens too."""
        shown: dict[int, list[tuple[int, int]]] = {}
        for tid, text, begin in self._pieces(complete=True)[0]:
            if text:
                shown.setdefault(tid, []).append((begin, begin + len(text)))
        rendered = tag = hidden = 0
        for t in self.threads:
            texts, at = [], 0
            for e in t.events:
                if isinstance(e, Text) and e.raw:
                    texts.append((at, at + len(e.raw)))
                at += len(e.raw)
            if not t.is_main:
                tag += len(self.open_ids)
            prev = 0
            for end in t.ends:
                lo, hi = (prev, end) if end > prev else (end, end + 1)  # part of a character: the character
                prev = end
                if lo >= at:  # nothing it wrote was parsed (a character cut short)
                    continue
                if _touches(shown.get(t.id, []), lo, hi):
                    rendered += 1
                elif _touches(texts, lo, hi):
                    hidden += 1
                else:
                    tag += 1
        return rendered, tag, hidden

    def tag_tokens(self) -> int:
        """Tokens written for tags (`token_counts`)."""
        return self.token_counts()[1]

    def theoretical_speedup(self) -> float:
        """All generated tokens / tokens on the critical path."""
        total = self.num_generated()
        return total / self.critical if self.critical else 1.0
