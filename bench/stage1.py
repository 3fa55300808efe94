"""Stage 1 results: the PASTA adapter decoding asynchronously vs the baseline adapter decoding sequentially.

Runs both on the evaluation prompts (a per-category sample by default), in one process, and writes
bench/results/stage1.json and docs/results-stage1.md (tables split by parallelizable vs not, plus sample answers).

    python bench/stage1.py [--per-category 6] [--pasta pasta-stage1] [--baseline baseline] [--max-new-tokens 400]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pastalm.engine import Engine, GenerateConfig  # noqa: E402
from pastalm.eval.speed import compare, machine, stratified, summarize, timestamp, validity  # noqa: E402
from pastalm.models import load  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402

ROWS = [
    ("prompts", "prompts", "{:d}"),
    ("answers with a valid promise (forked)", "with_valid_promise", "{:.0%}"),
    ("answers whose whole annotation validates", "valid_raw", "{:.0%}"),
    ("mean async threads", "mean_async_threads", "{:.2f}"),
    ("theoretical speedup (gmean)", "theoretical_speedup_gmean", "{:.2f}x"),
    ("wall-clock speedup vs baseline (gmean)", "wall_speedup_gmean", "{:.2f}x"),
    ("throughput-normalized speedup (gmean)", "throughput_speedup_gmean", "{:.2f}x"),
    ("PASTA rendered tokens (mean)", "pasta_tokens_mean", "{:.0f}"),
    ("PASTA tag tokens (mean)", "pasta_tag_tokens_mean", "{:.0f}"),
    ("baseline tokens (mean)", "baseline_tokens_mean", "{:.0f}"),
    ("PASTA answers that hit a limit", "pasta_limits_hit", "{:d}"),
    ("baseline answers that hit a limit", "baseline_limits_hit", "{:d}"),
]


def table(groups: dict[str, dict]) -> str:
    names = list(groups)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in ROWS:
        cells = []
        for g in names:
            v = groups[g].get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_category(records: list[dict]) -> str:
    cats = sorted({r["category"] for r in records}, key=lambda c: (not records[0]["parallel"], c))
    lines = ["| category | parallel | prompts | valid promise | threads | theoretical | wall-clock | throughput |",
             "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cats, key=lambda c: (not next(r["parallel"] for r in records if r["category"] == c), c)):
        s = summarize([r for r in records if r["category"] == c])
        par = next(r["parallel"] for r in records if r["category"] == c)
        lines.append(f"| {c} | {'yes' if par else 'no'} | {s['prompts']} | {s['with_valid_promise']:.0%} | "
                     f"{s['mean_async_threads']:.1f} | {s['theoretical_speedup_gmean']:.2f}x | "
                     f"{s['wall_speedup_gmean']:.2f}x | {s['throughput_speedup_gmean']:.2f}x |")
    return "\n".join(lines)


def samples(records: list[dict], k: int = 5) -> str:
    picked, cats = [], set()
    for r in records:
        if r["parallel"] and r["valid_promise"] and r["category"] not in cats:
            picked.append(r)
            cats.add(r["category"])
        if len(picked) == k:
            break
    out = []
    for r in picked:
        p = r["pasta"]
        out.append(f"### {r['id']} ({r['category']}): {r['prompt']}\n\n"
                   f"{p['threads']} async threads, {p['tokens']} + {p['tag_tokens']} tag tokens, theoretical "
                   f"{r['theoretical_speedup']:.2f}x, wall-clock {r['wall_speedup']:.2f}x vs the baseline's "
                   f"{r['baseline']['tokens']}-token answer.\n\nRaw (what the model wrote, in serialized order):\n\n"
                   f"```\n{p['raw']}\n```\n\nRendered (what the user reads):\n\n```\n{p['text']}\n```\n")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="eval")
    ap.add_argument("--per-category", type=int, default=6, help="prompts per category (0: all)")
    ap.add_argument("--pasta", default="pasta-stage1", help="adapter of the PASTA model (default: the shipped stage-1 one)")
    ap.add_argument("--baseline", default="baseline", help="adapter of the baseline model")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-new-tokens", type=int, default=400)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "stage1.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results-stage1.md")
    ap.add_argument("--from-json", type=Path, help="rewrite the tables from a saved run instead of measuring")
    args = ap.parse_args(argv)

    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        records = saved["records"]
        for r in records:  # recompute the validity measures with the current definitions
            r.update(validity(r["pasta"]["raw"], r["pasta"]["threads"]))

        class _N:  # names of the saved run
            name = saved["info"]["model"]
        a, b = _N(), _N()
        b.name = saved["info"]["baseline"]
    else:
        prompts = stratified(load_prompts(args.prompts), args.per_category or None)
        a = load(None, args.dtype, args.pasta)
        b = load(None, args.dtype, args.baseline)
        records = compare(Engine(a.model, a.tokenizer, a.name), Engine(b.model, b.tokenizer, b.name), prompts, cfg)
    groups = {"parallelizable": summarize([r for r in records if r["parallel"]]),
              "not parallelizable": summarize([r for r in records if not r["parallel"]]),
              "all": summarize(records)}
    info = saved["info"] if args.from_json else {**machine(), "model": a.name, "baseline": b.name, "dtype": args.dtype, "when": timestamp(),
            "config": {"max_new_tokens": cfg.max_new_tokens, "reserve_scale": cfg.reserve_scale,
                       "max_threads": cfg.max_threads, "async_factor": cfg.async_factor, "greedy": True},
            "prompts": f"{args.prompts}, {args.per_category or 'all'} per category"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "summary": groups, "records": records}, indent=1))
    tbl = table(groups)
    print(tbl)
    args.doc.write_text(f"""# Stage 1 results

Written by `python bench/stage1.py` ({info['when']}); raw numbers in `bench/results/stage1.json`.

- Machine: {info['processor']}, {info['threads']} torch threads, torch {info['torch']}, CPU only.
- PASTA model: `{a.name}`, asynchronous decoding. Baseline: `{b.name}` (the same answers with their tags
  removed, LoRA on the same layers, but one epoch against the PASTA adapter's three: see docs/training.md),
  sequential decoding. Both {args.dtype}, greedy, max {cfg.max_new_tokens} new tokens, measured
  prompt by prompt in the same process, alternating which runs first.
- Prompts: the shipped evaluation set, {info['prompts']}.
- Theoretical speedup counts tag tokens as generated tokens; wall-clock speedup is the baseline's time for its
  own answer over PASTA's time for its own; throughput-normalized divides rendered tokens per second, so a
  shorter answer does not count as faster. All three are geometric means over prompts.
- Read the wall-clock column with the limit rows: a PASTA answer that hits max new tokens (tags count) is cut
  short, and a shorter answer is a faster one; the throughput-normalized column does not have that bias.
- "Valid promise" counts answers with at least one promise that parsed and forked a thread; "whole annotation
  validates" also needs no tag cut off by a limit.

{tbl}

## By category

{by_category(records)}

## Sample answers

{samples(records)}
""")
    print(f"wrote {args.json} and {args.doc}")


if __name__ == "__main__":
    main()
