"""The serving loop: one thread owns the engine's `Batcher` and steps it while any request is live.

HTTP handlers (on the asyncio loop) `submit` jobs and `cancel` them; the loop thread admits waiting jobs between
steps (up to `max_running` at once), runs one forward pass for every live thread of every running request, and
sends each job its text deltas and its final result through the job's asyncio queue.

`pasta serve` loads the engine in that same thread (`ComputeThread`), so one thread does all of the process's
tensor work: torch's OpenMP runtime keeps a team of worker threads for each thread that computes, and with two
teams on a machine that has as many cores as a team has threads it stops letting its workers spin between parallel
regions, so each region waits for a sleeping worker. Measured on the 2-core CPU machine (vLLM backend, bundled
model, 16 eval prompts, 8 at a time, in-process): 24 ms per step when the thread that loaded the engine steps it,
45 ms when another thread does (docs/serving.md).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..engine import Engine, GenerateConfig


class Busy(Exception):
    """The waiting queue is full (HTTP 429)."""


class Closed(Exception):
    """The server is shutting down (HTTP 503)."""


@dataclass
class Job:
    """One request (one choice of one HTTP request) as the serving loop sees it. Events on `queue`:
    (index, "text", delta), (index, "tokens", logprob entries) when it asked for logprobs, (index, "threads", what
    each thread did in a step) when it asked for `threads`, (index, "done", Result),
    (index, "error", message); the jobs of one HTTP request (n
    choices, several prompts) share a queue and tell their events apart by `index`."""

    prompt_ids: list[int]
    config: GenerateConfig
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_text: float | None = None
    request: object = None  # the Batcher's Request once admitted
    stop_ids: set[int] | None = None  # None: the engine's; empty: ignore EOS
    id: int = field(default_factory=itertools.count().__next__)
    client_gone: bool = False
    threads: bool = False  # pasta.threads: also emit (index, "threads", `batch.thread_view`) after each step
    force: str | None = None  # pasta.force: replay this annotated answer instead of sampling

    def emit(self, kind: str, payload) -> None:
        if kind == "text" and self.first_text is None:
            self.first_text = time.perf_counter()
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, payload))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass


class ComputeThread:
    """One daemon thread that runs the functions given to `submit`, in order: `pasta serve` loads its engine with
    it and then runs the scheduler's loop on it, so the thread that set up the engine's tensors also steps them
    (see the module docstring). Not a one-worker `ThreadPoolExecutor`: interpreter exit waits for its worker, so
    Ctrl-C during a minute-long vLLM compile, or a step that never returns, would hold the process."""

    def __init__(self, name: str = "pasta-scheduler"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def call(self, fn, *args, **kwargs):
        """Run `fn` on the thread and return its result (or raise its exception) here."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """End the thread once what was submitted before has run."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)


def _report(loop: Future) -> None:
    """A serving loop that ended on an exception (it catches those of a step) prints it, as a thread would."""
    if not loop.cancelled() and loop.exception() is not None:
        traceback.print_exception(loop.exception())


class Scheduler:
    """Continuous batching of requests on one engine, in a background thread (the `compute` thread when given: the
    one that loaded the engine)."""

    def __init__(self, engine: Engine, max_running: int = 16, max_queue: int = 64, metrics=None,
                 compute: ComputeThread | None = None):
        self.engine = engine
        self.max_running = max_running
        self.max_queue = max_queue
        self.metrics = metrics
        self.batcher = engine.batcher()
        self.cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.cancels: list[Job] = []
        self.jobs: dict[int, Job] = {}  # Batcher request id -> job
        self.stopping = False
        self.in_flight = 0  # submitted and not yet answered
        self.compute = compute
        self.own_compute: ComputeThread | None = None  # the thread started for the loop when none was given
        self.running: Future | None = None  # the loop, once started

    def start(self) -> None:
        compute = self.compute
        if compute is None:
            compute = self.own_compute = ComputeThread()
        self.running = compute.submit(self._run)
        self.running.add_done_callback(_report)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.running is not None:
            try:
                self.running.result(timeout=10)
            except Exception:  # noqa: BLE001 - a failed loop was reported when it ended; one that does not end in
                pass  # time is left to its daemon thread
        if self.own_compute is not None:
            self.own_compute.close()

    # -- called from the HTTP side ----------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise Closed("the server is shutting down")
            if self.in_flight >= self.max_running + self.max_queue:
                raise Busy(f"the server is busy: {self.in_flight} requests in flight ({self.max_running} decoded "
                           f"at once, {self.max_queue} may wait); retry later")
            self.in_flight += 1
            self.waiting.append(job)
            self.cond.notify_all()

    def cancel(self, job: Job, client_gone: bool = True) -> None:
        """End `job` at the next step boundary (or drop it from the queue); its "done" event carries the text so
        far. `client_gone` counts it in `pasta_cancelled_requests_total` (a stop string ending it does not)."""
        with self.cond:
            job.client_gone = client_gone
            self.cancels.append(job)
            self.cond.notify_all()

    def state(self) -> dict:
        with self.cond:
            return {"running": len(self.batcher.active), "queued": len(self.waiting),
                    "live_threads": self.batcher.live_threads, **self.batcher.stats()}

    # -- the loop thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.waiting or self.cancels or self.batcher.active):
                    self.cond.wait()
                if self.stopping:
                    break
                cancels, self.cancels = self.cancels, []
                for job in cancels:
                    if job in self.waiting:  # never admitted: nothing to free, nothing decoded
                        self.waiting.remove(job)
                        self.in_flight -= 1
                        if self.metrics is not None and job.client_gone:
                            self.metrics.cancelled()
                        job.emit("error", "cancelled while queued")
                admit = []
                while self.waiting and len(self.batcher.active) + len(admit) < self.max_running:
                    admit.append(self.waiting.popleft())
            try:
                self._cancel(cancels)
                for job in admit:
                    try:
                        on_tokens = (None if job.config.logprobs is None
                                     else lambda e, j=job: j.emit("tokens", e))
                        on_step = (lambda v, j=job: j.emit("threads", v)) if job.threads else None
                        replay = {}
                        if job.force is not None:  # pasta.force: the annotated answer is replayed
                            from ..engine.engine import scripts_for

                            replay = dict(scripts=scripts_for(self.engine.tokenizer, job.force,
                                                              job.config.sequential), forced=True)
                        job.request = self.batcher.add(job.prompt_ids, job.config, stop_ids=job.stop_ids,
                                                       on_text=lambda s, j=job: j.emit("text", s),
                                                       on_tokens=on_tokens, on_step=on_step, **replay)
                    except Exception as e:  # noqa: BLE001 - this request's settings: it fails alone
                        self._release()
                        job.emit("error", f"could not start decoding: {type(e).__name__}: {e}")
                        continue
                    self.jobs[job.request.id] = job
                if self.batcher.active:
                    finished = self.batcher.step()
                    if self.metrics is not None:
                        self.metrics.step()
                    for req in finished:
                        self._done(req)
                    for req, err in self.batcher.take_failures():  # failed alone; the others go on
                        job = self.jobs.pop(req.id, None)
                        if job is not None:
                            self._release()
                            job.emit("error", f"internal error while decoding this request: {err}")
                self._gauges()
            except Exception as e:  # a failure of the shared step (not of one request): fail the live requests and
                # start clean; the server goes on
                traceback.print_exc()
                for req in list(self.batcher.active):
                    job = self.jobs.pop(req.id, None)
                    if job is not None:
                        self._release()
                        job.emit("error", f"internal error while decoding: {type(e).__name__}: {e}")
                try:  # free what the backend holds for them (vLLM: its requests)
                    self.batcher.runner.release(list(self.batcher.active), [], True)
                except Exception:
                    traceback.print_exc()
                self.batcher = self.engine.batcher()
        for job in list(self.waiting) + [self.jobs[r.id] for r in self.batcher.active if r.id in self.jobs]:
            job.emit("error", "the server is shutting down")

    def _cancel(self, cancels: list[Job]) -> None:
        for job in cancels:
            req = job.request
            if req is not None and not req.done:
                self.batcher.cancel(req)
                if self.jobs.pop(req.id, None) is not None:
                    self._release()
                if self.metrics is not None and job.client_gone:
                    self.metrics.cancelled()
                job.emit("done", req.result)

    def _done(self, req) -> None:
        job = self.jobs.pop(req.id, None)
        if job is None:
            return
        self._release()
        if self.metrics is not None:
            self.metrics.finished(req.result, job)
        job.emit("done", req.result)

    def _release(self) -> None:
        with self.cond:
            self.in_flight -= 1

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.gauges(len(self.batcher.active), len(self.waiting), self.batcher.live_threads,
                                self.batcher.stats().get("cache_slots", 0))
