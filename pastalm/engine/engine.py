"""`Engine`: a model, its tokenizer and a backend (`runner()`), and `Engine.generate`: one request through the step
loop of `batch.Batcher` (schedule -> runner step -> write tokens, until the interpreter says it is finished)."""

from __future__ import annotations

from ..lang.render import CHUNK, CLOSE, OPEN, PROMISE, SYNC_KIND, TEXT, Segment, segments
from .batch import Batcher
from .types import GenerateConfig, Result, Runner

__all__ = ["Engine", "GenerateConfig", "Result", "scripts_for", "thread_segments"]


def thread_segments(annotated: str, sequential: bool = False) -> list[list[Segment]]:
    """The segments each thread writes when it replays an annotated answer, main first: main's text and tags,
    then one script per promise, in order: its block's chunk and `</async>` (empty for a promise without a block,
    so that every later block stays with its own promise). `<async>` is never written: the interpreter forces it.
    A block without a promise right before it (strays aside) is a stray that main writes, as it would when
    decoding freely.
    Sequentially, main writes the blocks inline."""
    threads: list[list[Segment]] = [[]]
    awaiting = None  # the script of the last promise, while its block has not opened
    current = 0  # where chunk and close segments go: an open block's script, or main
    for seg in segments(annotated):
        if sequential:
            if seg.kind in (TEXT, PROMISE, SYNC_KIND, CHUNK, CLOSE):
                threads[0].append(seg)
            continue
        if seg.kind == PROMISE:
            threads[0].append(seg)
            threads.append([])
            awaiting, current = len(threads) - 1, 0
        elif seg.kind == OPEN:
            if awaiting is None:  # a stray: main writes it
                threads[0].append(seg)
            current, awaiting = (awaiting if awaiting is not None else 0), None
        elif seg.kind in (CHUNK, CLOSE):
            threads[current].append(seg)
            if seg.kind == CLOSE:
                current = 0
        elif seg.kind in (TEXT, SYNC_KIND):
            # the parser opens a block only right after its promise, strays between them aside (a stray has no
            # effect, L5): so a stray there (`<promise .../><sync><async>`) keeps the block with its promise, as
            # training lays it out (issue 26: replay gave the chunk to main); text or a sync leaves no block to open
            threads[0].append(seg)
    return threads


def scripts_for(tokenizer, annotated: str, sequential: bool = False) -> list[list[int]]:
    """Per-thread token scripts that replay an annotated answer (`thread_segments`), tokenized segment by segment
    as in training (docs/spec.md T1)."""
    return [[i for seg in segs for i in tokenizer.encode(seg.text, add_special_tokens=False)]
            for segs in thread_segments(annotated, sequential)]


class Engine:
    """Asynchronous (PASTA) and sequential decoding of one HF causal LM on the transformers backend (the vLLM
    backend is `pastalm.engine.vllm.VllmEngine`, the same interface)."""

    backend = "hf"
    # the layouts this backend decodes exactly, its default first: linear since 2026-12-07 (docs/spec.md section 3:
    # with the shipped adapters it renders 1.16x the reserve layout's tokens per second, at no lower quality)
    layouts = ("linear", "reserve")

    def __init__(self, model, tokenizer, name: str = "model", stop_ids: set[int] | None = None):
        from ..models import stop_ids as default_stop_ids

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.stop_ids = set(stop_ids) if stop_ids is not None else default_stop_ids(tokenizer, getattr(model, "generation_config", None))
        self.max_positions = getattr(model.config, "max_position_embeddings", None)

    def runner(self) -> Runner:
        """A fresh runner (the backend's per-batcher state: here a shared KV cache)."""
        from .runner import HFRunner

        return HFRunner(self.model)

    @classmethod
    def check_layout(cls, layout: str | None) -> None:
        """Refuse a layout this backend cannot decode exactly (None: the backend's own)."""
        if layout is not None and layout not in cls.layouts:
            raise ValueError(f"the {cls.backend} backend decodes the {' and '.join(cls.layouts)} layout"
                             f"{'s' if len(cls.layouts) > 1 else ''}, not {layout!r}; pass --layout {cls.layouts[-1]}")

    def check(self, config: GenerateConfig) -> GenerateConfig:
        """The settings this backend decodes (layout None: its first layout, or the reserve layout where a reserve
        scale is given, as it asks for one); refuse what it cannot decode exactly."""
        from dataclasses import replace

        self.check_layout(config.layout)
        return config if config.layout is not None else replace(config, layout=config.resolved_layout(self.layouts))

    def generate(self, prompt_ids: list[int], config: GenerateConfig = GenerateConfig(),
                 force: str | None = None, on_text=None, scripts: list[list[int]] | None = None,
                 scaffold: bool = False, on_step=None) -> Result:
        """Answer one prompt (token ids, chat template applied). `force` replays an annotated answer instead of
        choosing tokens; `on_text(str)` receives the rendered answer in reading order as it becomes final;
        `on_step(view)` what each thread did in each step (`batch.thread_view`).

        `scripts` (instead of `force`): per-thread token scripts, main first (see `scripts_for`), replayed one
        token per step. With `scaffold`, the scripts are scaffolding instead: main's script is written in one
        step (all its promises fork together), and a block's script is only a forced prefix after which the block
        decodes freely. This is how Skeleton-of-Thought expands its points through the same fork machinery."""
        if force is not None:
            if scripts is not None:
                raise ValueError("give either force or scripts, not both")
            scripts = scripts_for(self.tokenizer, force, config.sequential)
        batcher = Batcher(self)
        req = batcher.add(prompt_ids, config, scripts, scaffold=scaffold, forced=force is not None, on_text=on_text,
                          on_step=on_step)
        while not req.done:
            batcher.step()
        if req.error is not None:
            raise RuntimeError(f"decoding failed: {req.error}")
        return req.result

    def batcher(self) -> Batcher:
        """A `Batcher` on this engine: many requests advanced together, one forward pass per step."""
        return Batcher(self)
