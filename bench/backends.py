"""Backend benchmark: PASTA and sequential decoding on the transformers (hf), llama.cpp and vLLM backends, side by
side, in one process and one run.

The vLLM modes run in the vLLM environment (`scripts/setup.sh --vllm`; `.venv-vllm/bin/python bench/backends.py`),
the llama.cpp ones where llama-cpp-python is installed (`scripts/setup.sh --llamacpp`; `.venv/bin/python`), on the
bundled model by default, over the parallelizable evaluation prompts (`--set other`: the others). Modes, all
greedy, the same settings (--max-new-tokens, bf16 on hf and vLLM, the GGUF type on llama.cpp, the linear layout):

- `hf-seq`, `vllm-seq`, `lcpp-seq`: the sequential baseline (the shipped baseline adapter, as `pasta eval`'s
  sequential mode), through pastalm's step loop;
- `hf-pasta`, `vllm-pasta`, `lcpp-pasta`: the shipped PASTA adapter of the linear layout, asynchronous decoding;
- `hf-reserve`: the transformers backend's own default, the reserve layout with its shipped adapter (`pasta`);
- `vllm-native`: vLLM's own decoding of the baseline adapter (one request, no pastalm loop): what the loop costs;
- `lcpp-native`: llama.cpp's own greedy loop (one `llama_decode` and an argmax per token, as llama.cpp's examples
  do) on the baseline's GGUF: what pastalm's loop costs there;
- `lcpp-bundled`: the same loop on the bundled GGUF file itself (Q4_1, no adapter): what a user running llama.cpp
  on this model gets today.

Every prompt runs in every mode once per repetition (modes interleaved, the order rotated per prompt); a prompt's
number per mode is the median over repetitions of rendered tokens per second (tags excluded) and the table gives
geometric means of per-prompt ratios. Results append to a JSONL file as they land, so a rerun resumes. Prints a
table, writes JSON, and the section of docs/benchmarks.md between its markers with --doc. On a GPU machine the
same script runs unchanged (vLLM picks the GPU; the hf backend follows PASTA_DEVICE=cuda).

    .venv-vllm/bin/python bench/backends.py [--per-category 3] [--reps 3] [--max-new-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pastalm.eval.speed import machine, stratified, timestamp  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402

MODES = ("hf-seq", "hf-pasta", "vllm-seq", "vllm-pasta", "vllm-native")
ALL_MODES = MODES + ("hf-reserve", "lcpp-seq", "lcpp-pasta", "lcpp-native", "lcpp-bundled",
                     "hf-cand", "vllm-cand", "lcpp-cand")
RATIOS = [("vllm-pasta", "vllm-seq"), ("vllm-pasta", "hf-pasta"), ("hf-pasta", "hf-seq"), ("hf-reserve", "hf-seq"),
          ("hf-pasta", "hf-reserve"), ("vllm-seq", "hf-seq"),
          ("vllm-seq", "vllm-native"), ("lcpp-pasta", "lcpp-seq"), ("lcpp-pasta", "lcpp-native"),
          ("lcpp-seq", "lcpp-native"), ("lcpp-pasta", "hf-pasta"), ("lcpp-pasta", "lcpp-bundled"),
          ("lcpp-native", "lcpp-bundled"), ("vllm-pasta", "lcpp-bundled"),
          ("hf-cand", "hf-seq"), ("hf-cand", "hf-pasta"), ("vllm-cand", "vllm-seq"), ("vllm-cand", "vllm-pasta"),
          ("lcpp-cand", "lcpp-seq"), ("lcpp-cand", "lcpp-pasta")]


def lcpp_native(lc, ids: list[int], max_new: int) -> dict:
    """llama.cpp's own greedy decoding of one prompt on the engine's GGUF and context: prefill, then one
    `llama_decode` of one token and an argmax per step, until a stop id or `max_new` tokens."""
    import numpy as np

    L = lc.lib
    t0 = time.perf_counter()
    mem = L.llama_get_memory(lc.ctx)
    L.llama_memory_clear(mem, True)
    b = L.llama_batch_init(max(len(ids), 1), 0, 1)
    try:
        b.n_tokens = len(ids)
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, i == len(ids) - 1
            b.seq_id[i][0] = 0
        out, last, ttft = [], len(ids) - 1, None
        for step in range(max_new):
            assert L.llama_decode(lc.ctx, b) == 0
            row = np.ctypeslib.as_array(L.llama_get_logits_ith(lc.ctx, last), shape=(lc.n_vocab,))
            tok = int(row.argmax())
            if tok in lc.stop_ids:
                break
            out.append(tok)
            if ttft is None:
                ttft = time.perf_counter() - t0
            b.n_tokens = 1
            b.token[0], b.pos[0], b.n_seq_id[0], b.logits[0] = tok, len(ids) + step, 1, True
            b.seq_id[0][0] = 0
            last = 0
    finally:
        L.llama_batch_free(b)
    wall = time.perf_counter() - t0
    return {"tokens": len(out), "wall_s": wall, "text": lc.tokenizer.decode(out), "threads": 0,
            "steps": len(out) + 1, "ttft_s": ttft if ttft is not None else wall}


def gmean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def native(vl, ids: list[int], max_new: int) -> dict:
    """vLLM's own greedy decoding of one prompt (stop at the engine's stop ids), timed like the others."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    rid = f"native-{time.perf_counter_ns()}"
    vl.llm.add_request(rid, TokensPrompt(prompt_token_ids=ids),
                       SamplingParams(max_tokens=max_new, temperature=0.0, stop_token_ids=sorted(vl.stop_ids),
                                      ignore_eos=True))
    out, ttft = None, None
    while vl.llm.has_unfinished_requests():
        for o in vl.llm.step():
            if o.request_id == rid and ttft is None and o.outputs and o.outputs[0].token_ids:
                ttft = time.perf_counter() - t0
            if o.request_id == rid and o.finished:
                out = o
    wall = time.perf_counter() - t0
    toks = [t for t in out.outputs[0].token_ids if t not in vl.stop_ids]
    return {"tokens": len(toks), "wall_s": wall, "text": vl.tokenizer.decode(toks), "threads": 0,
            "ttft_s": ttft if ttft is not None else wall}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=3, help="eval prompts per category (parallelizable kept)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(ALL_MODES)}")
    ap.add_argument("--adapter", default="pasta-linear",
                    help="the PASTA adapter (default: the shipped one of the linear layout, which every mode decodes)")
    ap.add_argument("--reserve-adapter", default="pasta",
                    help="hf-reserve: the adapter decoded in the reserve layout (default: the shipped one trained in it)")
    ap.add_argument("--candidate", help="*-cand modes: a second PASTA adapter decoded like *-pasta, side by side "
                    "with it in the same run (a candidate for shipping)")
    ap.add_argument("--set", default="parallel", choices=("parallel", "other", "all"),
                    help="the eval prompts: the parallelizable ones, the others, or all")
    ap.add_argument("--gguf-type", default="q8_0", help="llama.cpp modes: the GGUF type (pastalm's default, q8_0)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backends.jsonl")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "backends.json")
    ap.add_argument("--doc", type=Path, help="update this markdown file's section between the markers")
    ap.add_argument("--marker", default="backends",
                    help="the section's markers in --doc: <!-- MARKER:begin --> and <!-- MARKER:end -->")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]

    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; use {', '.join(ALL_MODES)}")
    if any(m.endswith("-cand") for m in modes) and not args.candidate:
        ap.error("the *-cand modes need --candidate ADAPTER")
    from pastalm.engine import GenerateConfig
    from pastalm.models import chat_prompt
    from pastalm.settings import ModelSettings

    want = {"parallel": lambda p: bool(p.get("parallel")), "other": lambda p: not p.get("parallel"),
            "all": lambda p: True}[args.set]
    prompts = [p for p in stratified(load_prompts("eval"), args.per_category) if want(p)]
    done: dict[tuple, dict] = {}
    if args.out.is_file():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done[(r["rep"], r["id"], r["mode"])] = r
    engines = {}
    for backend, short in (("hf", "hf"), ("vllm", "vllm"), ("llamacpp", "lcpp")):
        if any(m.startswith(short + "-") for m in modes):
            settings = ModelSettings(dtype=args.dtype, backend=backend, gguf_type=args.gguf_type)
            for kind, adapter in (("baseline", "baseline"), ("pasta", args.adapter), ("cand", args.candidate)):
                if kind != "cand" or short + "-cand" in modes:
                    engines[(short, kind)] = settings.engine(adapter, layout="linear")
    if "hf-reserve" in modes:
        engines[("hf", "reserve")] = ModelSettings(dtype=args.dtype).engine(args.reserve_adapter, layout="reserve")
    if "lcpp-bundled" in modes:
        engines[("lcpp", "bundled")] = ModelSettings(backend="llamacpp", gguf_type="as-is").engine("none")
    tok = next(iter(engines.values())).tokenizer
    seq = GenerateConfig(max_new_tokens=args.max_new_tokens, layout="linear", sequential=True)
    pasta = GenerateConfig(max_new_tokens=args.max_new_tokens, layout="linear")
    reserve = GenerateConfig(max_new_tokens=args.max_new_tokens, layout="reserve")

    def run(mode: str, ids: list[int]) -> dict:
        backend, kind = mode.split("-")
        if kind == "native":
            if backend == "lcpp":
                return lcpp_native(engines[("lcpp", "baseline")], ids, args.max_new_tokens)
            return native(engines[("vllm", "baseline")], ids, args.max_new_tokens)
        if kind == "bundled":
            return lcpp_native(engines[("lcpp", "bundled")], ids, args.max_new_tokens)
        eng = engines[(backend, kind if kind in ("pasta", "reserve", "cand") else "baseline")]
        first: list[float] = []
        t0 = time.perf_counter()

        def on_text(piece: str) -> None:  # time to the first rendered text, as a streaming user sees it
            if piece and not first:
                first.append(time.perf_counter() - t0)

        r = eng.generate(ids, {"pasta": pasta, "cand": pasta, "reserve": reserve}.get(kind, seq), on_text=on_text)
        return {"tokens": r.tokens, "wall_s": r.wall_s, "text": r.text, "threads": r.threads,
                "steps": r.decode_steps, "ttft_s": first[0] if first else r.wall_s}

    # warm-up: one answer per mode
    warm = chat_prompt(tok, "Give two tips to stay focused.")
    for m in modes:
        run(m, warm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for rep in range(args.reps):
            for i, p in enumerate(prompts):
                ids = chat_prompt(tok, p["prompt"])
                order = modes[i % len(modes):] + modes[: i % len(modes)]
                for m in order:
                    if (rep, p["id"], m) in done:
                        continue
                    r = {"rep": rep, "id": p["id"], "mode": m, **run(m, ids)}
                    r["tok_s"] = r["tokens"] / r["wall_s"] if r["wall_s"] > 0 else 0.0
                    done[(rep, p["id"], m)] = r
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                print(f"rep {rep + 1}/{args.reps}, prompt {i + 1}/{len(prompts)}", file=sys.stderr, flush=True)

    per = {m: {} for m in modes}  # mode -> prompt id -> median tok/s
    for m in modes:
        for p in prompts:
            xs = [done[(r, p["id"], m)]["tok_s"] for r in range(args.reps) if (r, p["id"], m) in done]
            if xs:
                per[m][p["id"]] = statistics.median(xs)
    rows = []
    for a, b in RATIOS:
        if a in per and b in per:
            common = [k for k in per[a] if k in per[b]]
            rows.append({"ratio": f"{a} / {b}", "prompts": len(common),
                         "gmean": gmean([per[a][k] / per[b][k] for k in common])})
    def med(m: str, key: str) -> float | None:  # median over prompts of the per-prompt median over repetitions
        xs = [statistics.median(done[(r, p["id"], m)][key] for r in range(args.reps) if (r, p["id"], m) in done)
              for p in prompts if any((r, p["id"], m) in done and key in done[(r, p["id"], m)]
                                      for r in range(args.reps))]
        return statistics.median(xs) if xs else None

    table = {m: {"prompts": len(per[m]), "median_tok_s": statistics.median(per[m].values()) if per[m] else None,
                 "median_wall_s": med(m, "wall_s"), "median_ttft_s": med(m, "ttft_s"),
                 "median_tokens": statistics.median(done[(0, k, m)]["tokens"] for k in per[m])
                 if per[m] and all((0, k, m) in done for k in per[m]) else None}
             for m in modes}
    summary = {"when": timestamp(), "machine": machine(), "settings": vars(args) | {"out": str(args.out),
               "json": str(args.json), "doc": str(args.doc)}, "modes": table, "ratios": rows,
               "per_prompt_tok_s": per}
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| mode | prompts | rendered tok/s (median) | rendered tokens (median) | wall-clock s (median) "
             "| time to first token s (median) |", "|---|---|---|---|---|---|"]
    for m, t in table.items():
        lines.append(f"| {m} | {t['prompts']} | {num(t['median_tok_s'], '.1f')} | {t['median_tokens']} "
                     f"| {num(t['median_wall_s'], '.2f')} | {num(t['median_ttft_s'], '.3f')} |")
    lines += ["", "| ratio (geomean over prompts of medians of rendered tok/s) | prompts | value |", "|---|---|---|"]
    lines += [f"| {r['ratio']} | {r['prompts']} | {r['gmean']:.2f}x |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.doc is not None:
        doc = args.doc.read_text()
        mach = summary["machine"]
        where = f"{mach['processor']} ({mach['threads']} torch threads), torch {mach['torch']}"
        cmd = " ".join(a for a in sys.argv[1:] if not a.startswith("--doc") and a != str(args.doc))
        py = ".venv-vllm/bin/python" if any(m.startswith("vllm") for m in modes) else ".venv/bin/python"
        begin, end = f"<!-- {args.marker}:begin -->", f"<!-- {args.marker}:end -->"
        block = (f"{begin}\nMeasured {summary['when']} on {where}: `{py} bench/backends.py {cmd}`, "
                 f"{len(prompts)} eval prompts ({args.set}).\n\n{text}\n{end}")
        if begin in doc:
            doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end):]
        else:
            doc += "\n" + block + "\n"
        args.doc.write_text(doc)


if __name__ == "__main__":
    main()
