"""Plot bench/backends.py summaries: median rendered tokens per second of every mode, one group of bars per
prompt set, the per-prompt spread (interquartile range over prompts) as error bars, from the JSONL results.

    .venv/bin/python bench/plot_backends.py bench/results/backends-all.json bench/results/backends-all-other.json \
        --out docs/img/backends.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def per_prompt(summary: dict) -> dict[str, list[float]]:
    """mode -> per-prompt medians over repetitions of rendered tok/s, from the summary's JSONL file."""
    rows = [json.loads(line) for line in Path(summary["settings"]["out"]).read_text().splitlines()]
    modes = list(summary["modes"])
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["mode"] in modes:
            by.setdefault((r["mode"], r["id"]), []).append(r["tok_s"])
    out: dict[str, list[float]] = {m: [] for m in modes}
    for (m, _), xs in by.items():
        out[m].append(statistics.median(xs))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", type=Path, help="JSON files written by bench/backends.py --json")
    ap.add_argument("--out", type=Path, default=Path("docs/img/backends.png"))
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sums = [json.loads(p.read_text()) for p in args.summaries]
    modes = list(dict.fromkeys(m for s in sums for m in s["modes"]))
    width = 0.8 / len(sums)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(modes)), 4.0))
    for j, s in enumerate(sums):
        pp = per_prompt(s)
        meds, lo, hi = [], [], []
        for m in modes:
            xs = sorted(pp.get(m, [])) or [0.0]  # a mode absent from this summary: an empty bar
            q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
            meds.append(statistics.median(xs))
            lo.append(meds[-1] - q[0])
            hi.append(q[2] - meds[-1])
        xs = [i + (j - (len(sums) - 1) / 2) * width for i in range(len(modes))]
        n = max(len(v) for v in pp.values())
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=3, label=f"{s['settings']['set']} prompts ({n})")
    ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right")
    ax.set_ylabel("rendered tokens / s (median over prompts)")
    mach = sums[0]["machine"]
    ax.set_title(f"pastalm backends, {mach.get('threads', '?')} CPU threads, {sums[0]['when'][:10]}", fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
