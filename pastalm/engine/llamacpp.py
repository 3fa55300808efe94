"""The llama.cpp backend (`--backend llamacpp`): PASTA decoding on llama.cpp through llama-cpp-python's low-level
API, in the linear layout, for CPUs and edge machines.

llama.cpp's batch takes a position and a sequence id per token, and its unified KV cache lets a cell belong to
several sequences; attention in a sequence sees that sequence's cells at earlier positions. That is exactly the
linear layout (docs/spec.md section 3), where each thread's context is one run of consecutive positions:

- each layout column (main, each block, main's re-laid column after a sync) is a llama.cpp sequence;
- a new column's context (main's tokens through the promise, for a block) is shared, not recomputed:
  `llama_memory_seq_cp` adds the new sequence to those cells;
- a step is one `llama_decode` over every request's feeds, the logits of each feed's last token read back and the
  token chosen by the transformers backend's own sampling code (`runner.choose`), so greedy and seeded sampled
  tokens follow the same rules as on the transformers backend;
- a finished request's sequences are removed (`llama_memory_seq_rm`) and their ids reused.

The model is a GGUF written from the cached HF folder `models.prepare` makes (the adapter merged, tag tokens added;
`gguf_export`), in float32, float16 or llama.cpp's Q4_1 (the bundled model's own type). llama-cpp-python is
imported only here, inside `load_llamacpp`: pastalm installs and tests without it (`scripts/setup.sh --llamacpp`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .engine import Engine

GGUF_KINDS = ("f32", "f16", "q8_0", "q4_1", "as-is")


class LlamaCppEngine(Engine):
    """`Engine` on a llama.cpp context (in this process): `generate` and `batcher` as on the transformers backend,
    linear layout only. One runner at a time uses the context (each new runner clears it)."""

    backend = "llamacpp"
    layouts = ("linear",)

    def __init__(self, lib, model, ctx, tokenizer, name: str, stop_ids: set[int], max_positions: int,
                 n_seq: int, n_batch: int, gguf: Path):
        self.model = None
        self.lib, self.lmodel, self.ctx = lib, model, ctx
        self.tokenizer = tokenizer
        self.name = name
        self.stop_ids = set(stop_ids)
        self.max_positions = max_positions
        self.n_seq, self.n_batch, self.gguf = n_seq, n_batch, gguf
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))

    def runner(self):
        return LlamaCppRunner(self)

    def close(self) -> None:
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.lmodel)
            self.ctx = self.lmodel = None


@dataclass
class _State:
    """A pastalm request's columns: their llama.cpp sequence, first position and token count."""

    seq: dict[int, int] = field(default_factory=dict)
    first_pos: dict[int, int] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)


class LlamaCppRunner:
    """The `Runner` of the llama.cpp backend (see the module docstring)."""

    def __init__(self, engine: LlamaCppEngine):
        import numpy as np

        self.np = np
        self.engine = engine
        self.L = engine.lib
        self.ctx = engine.ctx
        self.mem = self.L.llama_get_memory(self.ctx)
        self.L.llama_memory_clear(self.mem, True)
        self.free = list(range(engine.n_seq - 1, -1, -1))
        self.states: dict[int, _State] = {}
        self.batch = self.L.llama_batch_init(engine.n_batch, 0, engine.n_seq)

    def __del__(self):
        try:
            self.L.llama_batch_free(self.batch)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _new_column(self, st: _State, f, fed: dict) -> int:
        """A sequence for the feed's new column, sharing the cells of the context it sees: those already in the
        cache (`llama_memory_seq_cp`) and those fed in this same step (the new sequence is added to their rows:
        a fork sees main's tokens through its promise, some of which main feeds in the fork's step)."""
        col, span = f.span.thread, f.span
        if not self.free:
            raise RuntimeError(f"llama.cpp backend: more than {self.engine.n_seq} live sequences (columns of all "
                               "requests); lower --max-threads or the requests running at once")
        first = span.positions[0] - span.start if span.positions else 0
        seq = st.seq[col] = self.free.pop()
        st.first_pos[col], st.count[col] = first, 0
        seen = 0
        for d, n in enumerate(span.view):
            if not n or d == col:
                continue
            if d not in st.seq:
                raise ValueError("the llama.cpp backend decodes the linear layout only: a thread sees a column "
                                 "not decoded yet")
            p0 = st.first_pos[d]
            self.L.llama_memory_seq_cp(self.mem, st.seq[d], seq, p0, p0 + n)
            for row in fed.get(d, ()):
                if row[1] < p0 + n:
                    row[2].append(seq)
            seen += n
        if seen != first:
            raise ValueError("the llama.cpp backend decodes the linear layout only: a thread's context must be one "
                             "sequence at consecutive positions")
        return seq

    def step(self, work: list) -> dict[tuple[int, int], int]:
        from .runner import choose

        rows: list[list] = []  # [token, position, [sequences], wants logits]
        feeds, later = [], []
        fed: dict[int, dict[int, list]] = {}  # request -> column -> its rows in this step
        for req, fs in work:  # columns the cache has first: a new column may share their rows of this step
            st = self.states.setdefault(req.id, _State())
            for f in fs:
                if f.span.thread in st.seq:
                    self._rows(st, f, st.seq[f.span.thread], rows, fed.setdefault(req.id, {}))
                    feeds.append((req, f))
                else:
                    later.append((req, st, f))
        for req, st, f in later:
            fd = fed.setdefault(req.id, {})
            self._rows(st, f, self._new_column(st, f, fd), rows, fd)
            feeds.append((req, f))
        chosen: dict[tuple[int, int], int] = {}
        if not rows:
            return chosen
        logits = self._decode(rows)
        if logits is None:  # the KV cache is full: every request of this step ends at its context limit
            for req, _ in work:
                req.interp.stop("context")
            return chosen
        for k, (req, f) in enumerate(feeds):
            choose(req, f, logits[k], chosen)
        return chosen

    @staticmethod
    def _rows(st: _State, f, seq: int, rows: list, fed: dict) -> None:
        col = f.span.thread
        if f.span.start != st.count[col]:
            raise RuntimeError(f"llama.cpp runner: column {col} out of step ({f.span.start} != {st.count[col]})")
        st.count[col] += len(f.ids)
        n = len(f.ids)
        new = [[t, p, [seq], j == n - 1] for j, (t, p) in enumerate(zip(f.ids, f.span.positions))]
        rows += new
        fed.setdefault(col, []).extend(new)

    def _decode(self, rows):
        import torch

        L, b, np = self.L, self.batch, self.np
        out = []
        nb = self.engine.n_batch
        for s in range(0, len(rows), nb):
            part = rows[s: s + nb]
            b.n_tokens = len(part)
            want = []
            for i, (tok, pos, seqs, last) in enumerate(part):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, len(seqs), last
                for j, seq in enumerate(seqs):
                    b.seq_id[i][j] = seq
                if last:
                    want.append(i)
            rc = L.llama_decode(self.ctx, b)
            if rc == 1:
                return None
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            for i in want:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.engine.n_vocab,))
                out.append(torch.from_numpy(row.copy()))
        return out

    def release(self, gone: list, live: list, now: bool = False) -> None:
        for req in gone:
            st = self.states.pop(req.id, None)
            if st is not None:
                for seq in st.seq.values():
                    self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)
                    self.free.append(seq)

    def stats(self) -> dict:
        return {"cache_slots": sum(sum(st.count.values()) for st in self.states.values())}


def load_llamacpp(model: str | None = None, adapter: str | None = "auto", kind: str = "q8_0",
                  n_ctx: int = 8192, threads: int | None = None, n_seq: int = 64) -> LlamaCppEngine:
    """A `LlamaCppEngine` on the GGUF of the folder `models.prepare` makes (the adapter merged), exported once next
    to it in `kind` (float32, float16, Q8_0 or Q4_1), or with kind 'as-is' the model's own GGUF file (the bundled
    model's, or a --model .gguf; no adapter). `n_ctx` is the KV cells all requests share (a cell shared by a block
    and main counts once); `threads` defaults to every core.

    Q8_0 is the default: the shipped PASTA adapter still forks there as in float32 ("Give three tips to sleep
    better.": 3 async threads in Q8_0, f16 and f32), while in Q4_1 it forks on none of the eval prompts tried
    (the quantization error in the layers moves the margin that decides a promise)."""
    from transformers import AutoConfig, AutoTokenizer

    from ..models import ModelError, auto_adapter, prepare, stop_ids

    if kind not in GGUF_KINDS:
        raise ValueError(f"--gguf-type {kind!r}: use one of {', '.join(GGUF_KINDS)}")
    try:
        import llama_cpp as L
    except ImportError as e:
        raise ValueError(f"--backend llamacpp needs llama-cpp-python ({e}); run `scripts/setup.sh --llamacpp`") from None
    from ..gguf_export import export, quantize

    L.llama_backend_init()
    L.llama_log_set(_quiet(L), None)
    adapter = auto_adapter(adapter, model, None, "llamacpp")
    if kind == "as-is":
        from ..models import resolve, resolve_adapter

        where, file, _ = resolve(model)
        if file is None or resolve_adapter(adapter, model) is not None:
            raise ValueError("--gguf-type as-is loads a GGUF file as it is: give --model FILE.gguf (or the bundled "
                             "model) and --adapter none")
        gguf_file = Path(where) / file
    folder, name, _ = prepare(model, adapter)
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"--backend llamacpp needs a local model (a folder or .gguf file), not {folder}")
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    gguf = gguf_file if kind == "as-is" else folder / f"pastalm-{kind}.gguf"
    if not gguf.is_file():
        base = folder / ("pastalm-f16.gguf" if kind == "f16" else "pastalm-f32.gguf")
        if not base.is_file():
            export(folder, base, "f16" if kind == "f16" else "f32")
        if base != gguf:
            quantize(base, gguf, kind)
            if kind != "f32":
                base.unlink()
    mp = L.llama_model_default_params()
    lmodel = L.llama_model_load_from_file(str(gguf).encode(), mp)
    if not lmodel:
        raise ModelError(f"llama.cpp could not load {gguf}")
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = cp.n_ubatch = 512
    cp.n_seq_max = n_seq
    cp.kv_unified = True
    if kind == "f32":  # exact: a float32 KV cache too (llama.cpp's default is float16)
        cp.type_k = cp.type_v = 0
    cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
    ctx = L.llama_init_from_model(lmodel, cp)
    if not ctx:
        raise ModelError("llama.cpp could not create a context (lower n_ctx)")
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(folder)
    except OSError:
        gen = None
    limit = getattr(config, "max_position_embeddings", None) or 4096
    return LlamaCppEngine(L, lmodel, ctx, tok, name, stop_ids(tok, gen), min(limit, n_ctx), n_seq, 512, gguf)


_LOG = None


def _quiet(L):
    """A llama.cpp log callback that drops everything below errors (its start-up chatter is not for users)."""
    global _LOG
    if _LOG is None:
        @L.llama_log_callback
        def _cb(level, text, data):
            if level >= 4 and level != 5:  # GGML_LOG_LEVEL_ERROR (4); 5 is "continue"
                import sys

                sys.stderr.write(text.decode(errors="replace"))
        _LOG = _cb
    return _LOG
