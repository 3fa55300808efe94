"""Continuous batching: the step loop. Each step serves every live thread of every running request through one
runner call (one forward pass on the transformers runner, one engine step on vLLM).

A step asks each request's interpreter what to feed, hands every feed to the runner together, and writes the token
the runner chose for each thread that wanted one (or the thread's script token, in a forced replay). Requests join
and leave between steps; the runner frees a finished or cancelled request's state (`Runner.release`).

`Engine.generate` is this with one request, so the exactness tests of the engine cover this code too.
"""

from __future__ import annotations

import time

from .interpreter import STOP, Interpreter, Status
from .types import Request, Result, Runner


MIN_CHUNK = 16  # a prefill piece is never smaller, so a prompt always advances


class Batcher:
    """Requests in flight on one engine; `step()` advances all of them by one runner step."""

    def __init__(self, engine):
        self.engine = engine
        self.runner: Runner = engine.runner()
        self.active: list[Request] = []
        self._next_id = 0
        self.steps = 0
        self.failures: list[tuple[Request, str]] = []  # requests that failed alone, not yet taken

    def add(self, prompt_ids: list[int], config, scripts: list[list[int]] | None = None, scaffold: bool = False,
            forced: bool = False, on_text=None, stop_ids: set[int] | None = None, on_tokens=None,
            on_step=None) -> Request:
        """Queue a request; it joins at the next step. `stop_ids` overrides the engine's (empty: ignore EOS and
        stop only at a limit, as benchmarks do). With `config.logprobs`, `on_tokens(entries)` gets the rendered
        answer's tokens (`Interpreter.token_logprobs`) as they become final. `on_step(view)` gets, after every
        step of this request, what each thread is doing (`thread_view`): for live views of the parallelism."""
        eng = self.engine
        config = eng.check(config)
        stops = eng.stop_ids if stop_ids is None else set(stop_ids)
        interp = Interpreter(eng.tokenizer, list(prompt_ids), stops, config.policy(eng.tokenizer),
                             config.limits(eng.max_positions), config.sequential, scripts,
                             open_block_scripts=scaffold, trace=config.record_trace)
        mode = (("forced-" if forced else "scaffold-" if scaffold else "scripted-" if scripts else "")
                + ("sequential" if config.sequential else "async"))
        req = Request(self._next_id, interp, config, len(prompt_ids), mode, scaffold, on_text,
                      logits={} if config.record_logits else None, on_tokens=on_tokens, on_step=on_step)
        self._next_id += 1
        self.active.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """End a request now (its text so far is kept, `limits_hit` says `cancelled`); its state is freed."""
        if not req.done:
            req.interp.stop("cancelled")
            self._finish(req)
        self._collect(free=True)

    @property
    def live_threads(self) -> int:
        return sum(sum(t.status < Status.DONE for t in r.interp.threads) for r in self.active)

    def stats(self) -> dict:
        return self.runner.stats()

    def step(self) -> list[Request]:
        """One runner step for every live request; returns the requests that finished in this step.

        A failure that belongs to one request (its interpreter, its sampling) ends that request only: it leaves
        with `error` set and its text so far, and is listed by `take_failures`, not returned here. A failure of
        the shared runner step itself propagates."""
        finished: list[Request] = []
        work = []
        # chunked prefill: a runner with a per-step budget of prompt tokens (the transformers one) gets long prompts
        # in pieces, so a long prompt delays the other requests' next tokens by one piece per step, not by its whole
        # prefill. While any request decodes, the budget is the smaller `busy_tokens` (a step's time is mostly its
        # prefill piece), and the requests with the least to feed go first: decoding threads and short prompts are
        # never held behind a long prompt, and a prompt that does not fit what is left waits while another is fed in
        # pieces (docs/serving.md, "Soak").
        budget = getattr(self.runner, "step_tokens", None)
        order = list(self.active)
        if budget is not None:
            order.sort(key=lambda r: r.interp.main.pending())
            if any(r.interp.main.num_fed >= r.interp.main.num_prompt for r in order):
                budget = min(budget, getattr(self.runner, "busy_tokens", budget))
        prefilling = False  # a prompt is being fed in pieces this step: other prompts wait for their turn
        for req in order:
            interp = req.interp
            try:
                if interp.finished:
                    finished.append(self._finish(req))
                    continue
                main = interp.main
                if budget is not None and main.num_fed < main.num_prompt:
                    if prefilling and budget < main.pending():
                        continue  # one long prompt at a time: the cache (and each step's attention) stays small
                    prefilling = prefilling or budget < main.pending()
                fs = interp.schedule(None if budget is None else max(MIN_CHUNK, budget))
                if budget is not None:  # a decoding thread's one token a step is not prefill
                    budget -= sum(len(f.ids) - 1 for f in fs)
                if not fs and not req.waiting:
                    interp.stop("stalled")  # a limit ended it (then a no-op), or nothing can move
                    finished.append(self._finish(req))
                    continue
                req.waiting.update(interp.fed(fs))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                self._fail(req, e)
                continue
            work.append((req, fs))
        if work:
            chosen = self.runner.step(work)
            self.steps += 1
            for req, _ in work:
                if req.error is not None:  # the runner could not serve it
                    self._fail(req, None)
                    continue
                try:
                    self._advance(req, chosen)
                    if req.interp.finished:
                        finished.append(self._finish(req))
                except Exception as e:  # noqa: BLE001
                    self._fail(req, e)
        self._collect()
        return finished

    def _fail(self, req: Request, exc: Exception | None) -> None:
        """End `req` alone after a failure of its own; the rest of the batch goes on."""
        if exc is not None:
            req.error = f"{type(exc).__name__}: {exc}"
        try:
            req.interp.stop("error")
            self._finish(req)
        except Exception:  # noqa: BLE001 - its state is broken: keep what can be kept
            req.result = Result(text="", raw="", model=self.engine.name, mode=req.mode, prompt_tokens=req.prompt_len,
                                tokens=0, tag_tokens=0, decode_steps=req.steps, threads=0, theoretical_speedup=1.0,
                                wall_s=round(time.perf_counter() - req.t0, 4), limits_hit=["error"])
        self.failures.append((req, req.error))

    def take_failures(self) -> list[tuple[Request, str]]:
        """The requests that failed alone since the last call, with their errors."""
        out, self.failures = self.failures, []
        return out

    def _advance(self, req: Request, chosen: dict[tuple[int, int], int]) -> None:
        interp = req.interp
        req.steps += 1
        wrote: list[list] = []  # on_step: [thread, whether its token showed text] per token written
        for tid in sorted(req.waiting):
            if interp.threads[tid].status != Status.RUNNING:  # a limit ended it in this step
                req.waiting.discard(tid)
                continue
            token = interp.scripted(tid)
            if token is None:
                token = chosen.get((req.id, tid))
                if token is None:  # the runner has not decoded it yet
                    continue
            req.waiting.discard(tid)
            t = interp.threads[tid]
            before = (len(t.tokens), len(t.text())) if req.on_step is not None else None
            interp.write(tid, token, req.token_info.pop(tid, None))
            if before is not None and len(t.tokens) > before[0]:  # written (an EOS or a spent budget is not)
                wrote.append([tid, len(t.text()) > before[1]])
            if req.scaffold and tid == 0:  # the rest of main's script goes in at once
                while interp.main.status == Status.RUNNING and (token := interp.scripted(0)) not in (None, STOP):
                    interp.write(0, token)
        if req.on_tokens is not None:
            _send_entries(req)
        if req.on_text is not None:
            req.streamed = _stream(interp.rendered(), req.streamed, req.on_text)
        if req.on_step is not None:
            req.on_step(thread_view(interp, req.steps, wrote))

    def _finish(self, req: Request) -> Request:
        interp = req.interp
        if req.on_text is not None:
            _stream(interp.rendered(complete=True), req.streamed, req.on_text)
        logprobs = interp.token_logprobs(complete=True) if req.config.logprobs is not None else None
        if req.on_tokens is not None:
            _stream(logprobs, req.tokens_sent, req.on_tokens)
        # the written tokens that show rendered text, and those written for tags; a refused lead's (hidden) are
        # written, not shown, so neither (`Interpreter.token_counts`)
        rendered, tag_tokens, _ = interp.token_counts()
        req.waiting.clear()
        req.result = Result(
            text=interp.rendered(complete=True),
            raw=interp.raw(),
            model=self.engine.name,
            mode=req.mode,
            prompt_tokens=req.prompt_len,
            tokens=rendered,
            tag_tokens=tag_tokens,
            decode_steps=req.steps,
            threads=len(interp.threads) - 1,
            theoretical_speedup=round(interp.theoretical_speedup(), 4),
            wall_s=round(time.perf_counter() - req.t0, 4),
            limits_hit=list(interp.limits_hit),
            finish=[t.finish for t in interp.threads],
            pieces=interp.pieces(),
            token_ids=[interp.threads[0].tokens[req.prompt_len:]] + [t.tokens for t in interp.threads[1:]],
            chosen=interp.num_chosen(),
            logits=req.logits,
            logprobs=logprobs,
            trace=interp.trace.to_json() if interp.trace is not None else None,
        )
        return req

    def _collect(self, free: bool = False) -> None:
        """Forget finished requests and let the runner free their state (now, with `free`)."""
        gone = [r for r in self.active if r.done]
        if gone or free:
            self.active = [r for r in self.active if not r.done]
            self.runner.release(gone, self.active, free)


def thread_view(interp: Interpreter, step: int, wrote: list[list]) -> dict:
    """What each thread is doing after a step, for live views (`pasta generate --show-threads`, the playground's
    stream): `step` (the request's steps so far, prefill included), `live` (the threads still decoding, main is 0),
    `wrote` ([thread, shown] for each token written in this step; shown is false for a token that showed no text
    yet: a tag's, or one the parser holds until it knows it is not a tag), and `pieces`: the whole answer so far
    in reading order, one {"thread", "text", "finish"} per run of one thread's text, every block where it stands
    (a live block's text still grows; main's text after a live block is shown too, before the final answer
    would show it)."""
    return {"step": step, "live": [t.id for t in interp.threads if t.status < Status.DONE], "wrote": wrote,
            "pieces": interp.pieces()}


def _send_entries(req: Request) -> None:
    """Stream the rendered answer's token entries that are final: all but the last, which may still grow. Only the
    entries from the first unsent one on are built (`Interpreter.token_entries`); should that one not be found, the
    whole list is built again and counted instead."""
    new = req.interp.token_entries(start=req.chars_sent)
    if req.tokens_sent:
        keys = [key for key, _ in new]
        new = new[keys.index(req.next_entry):] if req.next_entry in keys \
            else req.interp.token_entries()[req.tokens_sent:]
    if len(new) < 2:
        req.next_entry = new[0][0] if new else req.next_entry
        return
    sent = [entry for _, entry in new[:-1]]
    req.on_tokens(sent)
    req.tokens_sent += len(sent)
    req.chars_sent += sum(len(e["text"]) for e in sent)
    req.next_entry = new[-1][0]


def _stream(items, done: int, send) -> int:
    """Send what `items` (the text shown so far, or its token entries) has past the first `done`; return the new
    count."""
    if len(items) > done:
        send(items[done:])
    return max(done, len(items))
