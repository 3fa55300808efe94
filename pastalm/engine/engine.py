"""`Engine.generate`: one request through the step loop of `batch.Batcher` (schedule -> forward -> choose tokens,
until the interpreter says the request is finished), and the settings and result of a generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


from ..lang.layout import ReservePolicy
from ..lang.render import CHUNK, CLOSE, OPEN, PROMISE, SYNC_KIND, TEXT, Segment, segments
from .batch import Batcher
from .interpreter import Limits


@dataclass
class GenerateConfig:
    """Settings of one generation.

    Args:
        max_new_tokens: tokens all threads may choose together (tags included; the forced <async> is free).
        async_factor: an async block's chunk may take async_factor * its promised tokens (plus its two tags).
        async_cap: hard cap on the tokens of one chunk.
        max_threads: live async threads; a promise past it is decoded inline by main.
        max_context: cache slots per request; None takes the model's max_position_embeddings.
        reserve_scale: positions reserved per block, R = ceil(scale * tokens) + tag overhead; 0 reserves none.
        temperature: 0 is greedy.
        top_p: nucleus sampling threshold in (0, 1].
        seed: seeds every thread's own generator.
        max_promises: runaway guard: main ends at a promise past this many (None: no limit).
        repeat_guard: runaway guard: main ends at a promise whose topic repeats an earlier one's (on: docs/spec.md
            section 5 has the measurement).
        block_guard: a block that writes a promise (which only main may) ends there (on).
        sequential: decode everything in main, one token at a time (the baseline).
        record_logits: keep each fed token's logits (for tests), keyed by (thread, index in thread).
    """

    max_new_tokens: int = 512
    async_factor: float = 2.0
    async_cap: int = 512
    max_threads: int = 8
    max_promises: int | None = None
    repeat_guard: bool = True
    block_guard: bool = True
    max_context: int | None = None
    reserve_scale: float = 1.0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sequential: bool = False
    record_logits: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        ReservePolicy(self.reserve_scale)  # validates the scale
        self.limits(None)  # validates the limits


    def limits(self, max_positions: int | None) -> Limits:
        return Limits(self.max_new_tokens, self.async_factor, self.async_cap, self.max_threads,
                      max_context=self.max_context or max_positions, max_positions=max_positions,
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
    tokens: int  # tokens of the rendered answer (tags excluded)
    tag_tokens: int
    decode_steps: int  # forward passes, prefill included
    threads: int  # async threads forked
    theoretical_speedup: float
    wall_s: float
    limits_hit: list[str]
    finish: list[str] = field(default_factory=list)  # why each thread ended, main first
    pieces: list[dict] = field(default_factory=list)  # reading order: {"thread", "text", "finish"} per piece
    token_ids: list[list[int]] = field(default_factory=list)  # each thread's written tokens (main without prompt)
    logits: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("logits")
        d.pop("token_ids")
        return d


def thread_segments(annotated: str, sequential: bool = False) -> list[list[Segment]]:
    """The segments each thread writes when it replays an annotated answer, main first: main's text and tags,
    block j's chunk and `</async>`. `<async>` is never written: the interpreter forces it. Sequentially, main
    writes the blocks inline."""
    threads: list[list[Segment]] = [[]]
    for seg in segments(annotated):
        if seg.kind == OPEN:
            if not sequential:
                threads.append([])
        elif seg.kind in (CHUNK, CLOSE) and not sequential:
            threads[-1].append(seg)
        elif seg.kind in (TEXT, PROMISE, SYNC_KIND, CHUNK, CLOSE):
            threads[0].append(seg)
    return threads


def scripts_for(tokenizer, annotated: str, sequential: bool = False) -> list[list[int]]:
    """Per-thread token scripts that replay an annotated answer (`thread_segments`), tokenized segment by segment
    as in training (docs/spec.md T1)."""
    return [[i for seg in segs for i in tokenizer.encode(seg.text, add_special_tokens=False)]
            for segs in thread_segments(annotated, sequential)]


class Engine:
    """Asynchronous (PASTA) and sequential decoding of one HF causal LM."""

    def __init__(self, model, tokenizer, name: str = "model", stop_ids: set[int] | None = None):
        from ..models import stop_ids as default_stop_ids

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.stop_ids = set(stop_ids) if stop_ids is not None else default_stop_ids(model, tokenizer)
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def generate(self, prompt_ids: list[int], config: GenerateConfig = GenerateConfig(),
                 force: str | None = None, on_text=None, scripts: list[list[int]] | None = None,
                 scaffold: bool = False) -> Result:
        """Answer one prompt (token ids, chat template applied). `force` replays an annotated answer instead of
        choosing tokens; `on_text(str)` receives the rendered answer in reading order as it becomes final.

        `scripts` (instead of `force`): per-thread token scripts, main first (see `scripts_for`), replayed one
        token per step. With `scaffold`, the scripts are scaffolding instead: main's script is written in one
        step (all its promises fork together), and a block's script is only a forced prefix after which the block
        decodes freely. This is how Skeleton-of-Thought expands its points through the same fork machinery."""
        if force is not None:
            if scripts is not None:
                raise ValueError("give either force or scripts, not both")
            scripts = scripts_for(self.tokenizer, force, config.sequential)
        batcher = Batcher(self)
        req = batcher.add(prompt_ids, config, scripts, scaffold=scaffold, forced=force is not None, on_text=on_text)
        while not req.done:
            batcher.step()
        return req.result

    def batcher(self) -> Batcher:
        """A `Batcher` on this engine: many requests advanced together, one forward pass per step."""
        return Batcher(self)
