"""Types the step loop, its backends and their callers share: the settings of a generation, a request in flight,
its result, and the `Runner` protocol a backend implements (docs/spec.md section 4)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

from ..lang.layout import LAYOUTS, ReservePolicy
from ..settings import nonneg_float, nonneg_int, opt, positive_float, positive_int, probability
from .interpreter import Feed, Interpreter, Limits


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class GenerateConfig:
    """Settings of one generation.

    Args:
        max_new_tokens: tokens all threads may choose together (tags included; the forced <async> is free).
        async_factor: an async block's chunk may take async_factor * its promised tokens (plus its two tags).
        async_cap: hard cap on the tokens of one chunk.
        max_threads: live async threads; a promise past it is decoded inline by main.
        max_context: cache slots per request, re-laid copies included (a memory bound); None sets none: the
            model's positions (`max_position_embeddings`) still bound every thread's context.
        layout: 'reserve' (positions reserved per block; main sees the blocks where they were written) or 'linear'
            (nothing reserved; a sync re-lays the history in reading order): docs/spec.md section 3. None: the
            backend's own (linear on every backend; reserve on transformers where a reserve_scale is given).
        reserve_scale: reserve layout: positions reserved per block, R = ceil(scale * tokens) + tag overhead; 0
            reserves none. None: 1 in the reserve layout, 0 (the only value it allows) in the linear one.
        temperature: 0 (or below 1e-5) is greedy.
        top_p: nucleus sampling threshold in (0, 1].
        seed: seeds every thread's own generator.
        max_promises: runaway guard: main ends at a promise past this many (None: no limit).
        repeat_guard: runaway guard: main ends at a promise whose topic repeats an earlier one's (on: docs/spec.md
            section 5 has the measurement).
        block_guard: a block that writes a promise (which only main may) ends there (on).
        sequential: decode everything in main, one token at a time (the baseline).
        record_logits: keep each fed token's logits (for tests), keyed by (thread, index in thread).
        record_trace: keep what was fed and chosen (`Result.trace`, the exact training example of this decode).
        logprobs: None, or keep each chosen token's log-probability and its `logprobs` (0-20) most likely
            alternatives, under the model's own distribution (before temperature and top_p): `Result.logprobs`.
    """

    max_new_tokens: int = opt(512, "tokens all threads may choose together", type=positive_int)
    async_factor: float = opt(2.0, "an async block may write this many times its promised tokens",
                              type=positive_float)
    async_cap: int = opt(512, "hard cap on one async block's tokens", type=positive_int)
    max_threads: int = opt(8, "live async threads (0: all inline)", type=nonneg_int)
    max_promises: int | None = opt(None, "runaway guard: main ends at a promise past this many in one answer "
                                   "(default: no limit)", type=positive_int)
    repeat_guard: bool = opt(True, "runaway guard: main ends at a promise whose topic (or lead) repeats an "
                             "earlier one's (on)", action="bool")
    block_guard: bool = opt(True, "a block that writes a promise (which only main may) ends there (on)",
                            action="bool")
    max_context: int | None = opt(None, "cache slots per request, re-laid copies included (default: no slot limit; the "
                                  "model's positions still bound each thread)",
                                  type=positive_int)
    layout: str | None = opt(None, "'linear': nothing reserved, a sync re-lays the history in reading order (every "
                             "backend's default, the only one vLLM and llama.cpp run); 'reserve': positions reserved "
                             "per block, main sees blocks in place (transformers only; the default there when "
                             "--reserve-scale is given); docs/spec.md section 3", choices=LAYOUTS)
    reserve_scale: float | None = opt(None, "reserve layout: positions reserved per block, ceil(scale * tokens) + "
                                      "tag overhead; 0 reserves none (default 1)", type=nonneg_float)
    temperature: float = opt(0.0, "0 is greedy", type=nonneg_float)
    top_p: float = opt(1.0, "nucleus sampling threshold in (0, 1]", type=probability)
    seed: int = opt(0, "seeds every thread's sampling", type=int)
    sequential: bool = opt(False, "turn async decoding off (the baseline)", action="store_true")
    record_logits: bool = False
    record_trace: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "linear" and self.reserve_scale not in (None, 0):
            raise ValueError(f"the linear layout reserves no positions; reserve_scale {self.reserve_scale} needs "
                             "layout 'reserve'")
        ReservePolicy(self.scale)  # validates the scale
        self.limits(None)  # validates the limits

    @property
    def scale(self) -> float:
        """The reserve scale in effect."""
        if self.reserve_scale is not None:
            return self.reserve_scale
        return 1.0 if self.layout == "reserve" else 0.0  # None: the linear layout, every backend's default

    def resolved_layout(self, layouts: tuple[str, ...] = ("linear", "reserve")) -> str:
        """The layout these settings decode on a backend that runs `layouts` (its default first): the one given,
        else the reserve layout where a reserve scale is given (it asks for one) and the backend runs it, else the
        backend's default."""
        if self.layout is not None:
            return self.layout
        return "reserve" if self.reserve_scale is not None and "reserve" in layouts else layouts[0]

    def policy(self, tokenizer) -> ReservePolicy:
        return ReservePolicy.for_tokenizer(tokenizer, self.scale, self.resolved_layout())

    def limits(self, max_positions: int | None) -> Limits:
        return Limits(self.max_new_tokens, self.async_factor, self.async_cap, self.max_threads,
                      max_context=self.max_context, max_positions=max_positions,
                      max_promises=self.max_promises, repeat_guard=self.repeat_guard,
                      block_guard=self.block_guard)


@dataclass
class Result:
    """One answer and its measures (docs/spec.md section 7)."""

    text: str
    raw: str
    model: str
    mode: str
    prompt_tokens: int
    tokens: int  # written tokens that show rendered text (`Interpreter.token_counts`)
    tag_tokens: int  # written tokens of tags only, as the model spelled them (the forced <async> included)
    decode_steps: int  # forward passes, prefill included
    threads: int  # async threads forked
    theoretical_speedup: float
    wall_s: float
    limits_hit: list[str]
    finish: list[str] = field(default_factory=list)  # why each thread ended, main first
    pieces: list[dict] = field(default_factory=list)  # reading order: {"thread", "text", "finish"} per piece
    token_ids: list[list[int]] = field(default_factory=list)  # each thread's written tokens (main without prompt)
    chosen: int = 0  # tokens the model chose, tags included, forced <async> not: what max_new_tokens bounds
    logits: dict | None = field(default=None, repr=False)
    trace: dict | None = field(default=None, repr=False)  # record_trace: `Trace.to_json()` (lang.layout.trace_layout)
    logprobs: list[dict] | None = field(default=None, repr=False)  # config.logprobs: `Interpreter.token_logprobs`

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("logits")
        d.pop("trace")
        d.pop("logprobs")
        d.pop("token_ids")
        return d


@dataclass
class Request:
    """One request in flight: its interpreter, settings, generators and measures."""

    id: int
    interp: Interpreter
    config: GenerateConfig
    prompt_len: int
    mode: str
    scaffold: bool = False
    on_text: object = None
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    streamed: int = 0
    generators: dict = field(default_factory=dict)  # thread -> torch.Generator (the HF runner's sampling)
    logits: dict | None = None  # record_logits: (thread, index in thread) -> logits or the backend's record
    columns: dict[int, int] = field(default_factory=dict)  # layout column -> the runner's global column
    waiting: set[int] = field(default_factory=set)  # threads that want a token and have not been given one
    result: Result | None = None  # once finished
    error: str | None = None  # set when this request failed on its own (the batch goes on without it)
    token_info: dict = field(default_factory=dict)  # config.logprobs: thread -> (logprob, top) of its token now
    on_tokens: object = None  # config.logprobs: called with `token_logprobs` entries as they become final
    tokens_sent: int = 0  # entries sent by on_tokens ...
    chars_sent: int = 0  # ... the characters of their texts ...
    next_entry: tuple[int, int] | None = None  # ... and the key of the one held back (`Interpreter.token_entries`)
    on_step: object = None  # called with `batch.thread_view` after each step (live views)

    @property
    def done(self) -> bool:
        return self.result is not None


class Runner(Protocol):
    """A backend: runs the model for the step loop (`batch.Batcher`).

    Each step the loop gives every live request's feeds (the tokens each thread adds to its context, with their
    layout span) and the threads that want a token; the runner returns the chosen token of each such thread it
    could decode in this step, keyed by (request id, thread). A runner that samples for itself (vLLM) may leave a
    thread out; the loop asks again next step. `release` frees the state of finished or cancelled requests
    (`gone`); it may wait until they are most of its memory, unless `now`."""

    def step(self, work: list[tuple[Request, list[Feed]]]) -> dict[tuple[int, int], int]: ...

    def release(self, gone: list[Request], live: list[Request], now: bool = False) -> None: ...

    def stats(self) -> dict: ...
