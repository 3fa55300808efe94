"""llama.cpp's cost of one decode with k sequences on this machine (issue 24, item 5): is a batched step cheaper per
token than sequential decoding there?

Loads the bundled GGUF (SmolLM2-135M-Instruct, Q4_1) through llama-cpp-python's low-level API with a unified KV
cache, decodes a chat prompt once in sequence 0, copies it to sequences 1..k-1 (`llama_memory_seq_cp`: a fork
costs no compute), then times decode calls that each add one token to each of the k sequences at its own next
position (`llama_batch` with per-token positions and sequence ids): what a PASTA step with k live threads costs.
Reports the median milliseconds per call, tokens per second, and the cost against one sequence's call.

llama-cpp-python builds from source here (about 10 minutes on 2 cores): `scripts/setup.sh --llamacpp` builds it
once into ~/.cache/pastalm/wheels and installs it into .venv.

    .venv/bin/python bench/llamacpp_batch.py [--steps 64] [--reps 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="GGUF file (default: the bundled model's)")
    ap.add_argument("--steps", type=int, default=64, help="decode calls per measurement")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--context", type=int, default=0,
                    help="tokens in the cache before the timed calls (the prompt repeated; default: the prompt only)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.context > 512:
        ap.error("--context is at most 512 (the prompt is decoded in one batch of at most 512 tokens)")

    import llama_cpp as L

    from pastalm.eval.speed import machine, timestamp
    from pastalm.models import BUNDLED_GGUF, bundled_folder

    gguf = args.gguf or str(bundled_folder() / BUNDLED_GGUF)
    ks = [int(k) for k in args.ks.split(",")]
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(gguf.encode(), mp)
    vocab = L.llama_model_get_vocab(model)
    cp = L.llama_context_default_params()
    cp.n_ctx = 4096
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = max(ks)
    cp.kv_unified = True
    cp.n_threads = cp.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cp)
    mem = L.llama_get_memory(ctx)
    n_vocab = L.llama_vocab_n_tokens(vocab)

    text = b"<|im_start|>user\nGive three tips to sleep better.<|im_end|>\n<|im_start|>assistant\n"
    buf = (L.llama_token * 256)()
    n_prompt = L.llama_tokenize(vocab, text, len(text), buf, 256, False, True)
    prompt = list(buf[:n_prompt])
    while len(prompt) < args.context:  # a longer cache, as in the middle of an answer
        prompt += prompt[: args.context - len(prompt)]
    n_prompt = len(prompt)
    batch = L.llama_batch_init(max(512, n_prompt), 0, max(ks))

    def fill(tokens: list[tuple[int, int, int]]) -> None:
        """(token, position, sequence) per row; logits for every row."""
        batch.n_tokens = len(tokens)
        for i, (tok, pos, seq) in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = True

    import numpy as np

    def argmax(i: int) -> int:
        row = L.llama_get_logits_ith(ctx, i)
        return int(np.ctypeslib.as_array(row, shape=(n_vocab,)).argmax())

    rows = []
    for k in ks:
        per_rep = []
        for _ in range(args.reps):
            L.llama_memory_clear(mem, True)
            fill([(t, p, 0) for p, t in enumerate(prompt)])
            batch.logits[n_prompt - 1] = True
            assert L.llama_decode(ctx, batch) == 0
            first = argmax(n_prompt - 1)
            for s in range(1, k):
                L.llama_memory_seq_cp(mem, 0, s, 0, n_prompt)
            toks = [first] * k
            times = []
            for step in range(args.steps):
                fill([(toks[s], n_prompt + step, s) for s in range(k)])
                t0 = time.perf_counter()
                assert L.llama_decode(ctx, batch) == 0
                times.append(time.perf_counter() - t0)
                toks = [argmax(s) for s in range(k)]
            per_rep.append(statistics.median(times))
        ms = 1e3 * statistics.median(per_rep)
        rows.append({"k": k, "ms_per_call": ms, "tokens_per_s": k / ms * 1e3})
    base = rows[0]["ms_per_call"]
    print(f"\nllama.cpp (llama-cpp-python {L.__version__}), {Path(gguf).name}, {args.threads} threads, unified KV cache; "
          f"one decode call adds one token to each of k sequences; median of {args.reps} x {args.steps} calls")
    print("| k | ms per call | cost vs k=1 | tokens/s | tokens/s vs k=1 |\n|---|---|---|---|---|")
    for r in rows:
        r["cost_vs_1"] = r["ms_per_call"] / base
        r["speedup_vs_1"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"| {r['k']} | {r['ms_per_call']:.2f} | {r['cost_vs_1']:.2f}x | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_1']:.2f}x |")
    out = {"gguf": Path(gguf).name if not args.gguf else f"{Path(gguf).parent.name}/{Path(gguf).name}",
           "context": n_prompt, "threads": args.threads, "steps": args.steps, "reps": args.reps, "rows": rows,
           "llama_cpp_python": L.__version__, "machine": machine(), "when": timestamp()}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
