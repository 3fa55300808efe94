"""Continuous batching: one forward pass per step serves every live thread of every running request.

All requests share one interleaved KV cache. A request's threads get columns of their own in the views (global
thread ids), so the visibility rule that keeps a request's threads apart (docs/spec.md section 3) also keeps
requests apart: a query sees a cache slot only if the slot's thread is one of its own request's threads and the
slot is inside its view. Positions stay per request. Requests join and leave between steps; the slots of a
finished or cancelled request are dropped from the cache once they make up most of it.

`Engine.generate` is this with one request, so the exactness tests of the engine cover this code too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..lang.layout import ReservePolicy
from .interpreter import STOP, Feed, Interpreter, Status
from .runner import SharedCache
from .sampler import sample, thread_generator


@dataclass
class Request:
    """One request in flight: its interpreter, settings, generators and measures."""

    id: int
    interp: Interpreter
    config: object  # GenerateConfig
    prompt_len: int
    mode: str
    scaffold: bool = False
    on_text: object = None
    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    streamed: int = 0
    generators: dict = field(default_factory=dict)
    logits: dict | None = None
    columns: dict[int, int] = field(default_factory=dict)  # local thread id -> global column
    result: object = None  # Result once finished

    @property
    def done(self) -> bool:
        return self.result is not None


class Batcher:
    """Requests in flight on one model; `step()` advances all of them by one forward pass."""

    def __init__(self, engine):
        self.engine = engine
        self.cache = SharedCache(engine.model)
        self.active: list[Request] = []
        self._next_id = 0
        self.steps = 0

    def add(self, prompt_ids: list[int], config, scripts: list[list[int]] | None = None, scaffold: bool = False,
            forced: bool = False, on_text=None, stop_ids: set[int] | None = None) -> Request:
        """Queue a request; it joins at the next step. `stop_ids` overrides the engine's (empty: ignore EOS and
        stop only at a limit, as benchmarks do)."""
        eng = self.engine
        policy = ReservePolicy.for_tokenizer(eng.tokenizer, config.reserve_scale)
        stops = eng.stop_ids if stop_ids is None else set(stop_ids)
        interp = Interpreter(eng.tokenizer, list(prompt_ids), stops, policy,
                             config.limits(eng.max_positions), config.sequential, scripts,
                             open_block_scripts=scaffold)
        mode = (("forced-" if forced else "scaffold-" if scaffold else "scripted-" if scripts else "")
                + ("sequential" if config.sequential else "async"))
        req = Request(self._next_id, interp, config, len(prompt_ids), mode, scaffold, on_text,
                      logits={} if config.record_logits else None)
        self._next_id += 1
        self.active.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """End a request now (its text so far is kept, `limits_hit` says `cancelled`); its slots are freed."""
        if not req.done:
            req.interp.stop("cancelled")
            self._finish(req)
        self._collect(free=True)

    @property
    def live_threads(self) -> int:
        return sum(sum(t.status < Status.DONE for t in r.interp.threads) for r in self.active)

    def step(self) -> list[Request]:
        """One forward pass for every live request; returns the requests that finished in this step."""
        finished: list[Request] = []
        feeds: list[tuple[Request, Feed]] = []
        per: dict[int, list[Feed]] = {}
        for req in list(self.active):
            if req.interp.finished:
                finished.append(self._finish(req))
                continue
            fs = req.interp.schedule()
            if not fs:
                req.interp.stop("stalled")  # a limit ended it (then a no-op), or nothing can move
                finished.append(self._finish(req))
                continue
            per[req.id] = fs
            feeds += [(req, f) for f in fs]
        if feeds:
            logits = self.cache.forward(feeds)
            self.steps += 1
            k = 0
            for req in [r for r in self.active if r.id in per]:
                fs = per[req.id]
                rows = {f.thread: (k + i, f.span.start + len(f.ids) - 1) for i, f in enumerate(fs)}
                k += len(fs)
                self._advance(req, fs, rows, logits)
                if req.interp.finished:
                    finished.append(self._finish(req))
        self._collect()
        return finished

    def _advance(self, req: Request, fs: list[Feed], rows: dict, logits: torch.Tensor) -> None:
        interp = req.interp
        req.steps += 1
        if req.logits is not None:
            for tid, (i, idx) in rows.items():
                req.logits[(tid, idx)] = logits[i].float().clone()
        for tid in interp.fed(fs):
            token = interp.scripted(tid)
            if token is None:
                if tid not in req.generators:
                    req.generators[tid] = thread_generator(req.config.seed, tid)
                token = sample(logits[rows[tid][0]], req.config.temperature, req.config.top_p, req.generators[tid])
            interp.write(tid, token)
            if req.scaffold and tid == 0:  # the rest of main's script goes in at once
                while interp.main.status == Status.RUNNING and (token := interp.scripted(0)) not in (None, STOP):
                    interp.write(0, token)
        if req.on_text is not None:
            req.streamed = _stream(interp.rendered(), req.streamed, req.on_text)

    def _finish(self, req: Request) -> Request:
        from .engine import Result

        interp = req.interp
        if req.on_text is not None:
            _stream(interp.rendered(complete=True), req.streamed, req.on_text)
        tag_tokens = interp.tag_tokens()
        generated = interp.num_generated()
        hidden = interp.hidden_text()  # a refused lead: written, not shown, so not a rendered token
        hidden_tokens = len(self.engine.tokenizer.encode(hidden, add_special_tokens=False)) if hidden else 0
        req.result = Result(
            text=interp.rendered(complete=True),
            raw=interp.raw(),
            model=self.engine.name,
            mode=req.mode,
            prompt_tokens=req.prompt_len,
            tokens=generated - tag_tokens - hidden_tokens,
            tag_tokens=tag_tokens,
            decode_steps=req.steps,
            threads=len(interp.threads) - 1,
            theoretical_speedup=round(interp.theoretical_speedup(), 4),
            wall_s=round(time.perf_counter() - req.t0, 4),
            limits_hit=list(interp.limits_hit),
            finish=[t.finish for t in interp.threads],
            pieces=interp.pieces(),
            token_ids=[interp.threads[0].tokens[req.prompt_len:]] + [t.tokens for t in interp.threads[1:]],
            logits=req.logits,
        )
        return req

    def _collect(self, free: bool = False) -> None:
        """Forget finished requests; drop their cache slots once they are most of the cache (or now: `free`)."""
        before = len(self.active)
        self.active = [r for r in self.active if not r.done]
        if len(self.active) == before and not free:
            return
        if not self.active:
            if self.cache.num_slots:
                self.cache = SharedCache(self.engine.model)
            return
        live = sum(t.num_fed for r in self.active for t in r.interp.threads)
        if free or self.cache.num_slots - live > max(256, live):
            self.cache.compact(self.active)


def _stream(text: str, done: int, on_text) -> int:
    if len(text) > done:
        on_text(text[done:])
    return max(done, len(text))
