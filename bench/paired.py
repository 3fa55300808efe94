"""Paired bootstrap of a `pasta eval` folder: each PASTA mode against a reference mode, prompt by prompt.

For every mode: the ratio of its geometric-mean wall-clock speedup to the reference's (that is, the geometric mean
over prompts of reference wall time / mode wall time) and the difference of mean judge scores, each with a 95%
percentile bootstrap interval over prompts (resampled in pairs, so prompt difficulty cancels). Prints a markdown
table and writes it as JSON beside the run (`paired.json`).

    python bench/paired.py docs/frontier --reference pasta:stage1 [--group parallel]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path


def load(folder: Path):
    rows = [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines() if x.strip()]
    judg = [json.loads(x) for x in (folder / "judgments.jsonl").read_text().splitlines() if x.strip()]
    res = {(r["id"], r["mode"]): r for r in rows}
    score = {(j["id"], j["mode"]): j["score"] for j in judg}
    return res, score


def paired(res, score, mode: str, ref: str, keep, n_boot: int = 2000, seed: int = 0) -> dict:
    ids = sorted({i for (i, m) in res if m == mode and (i, ref) in res and keep(res[(i, mode)])})
    ids = [i for i in ids if (i, mode) in score and (i, ref) in score]
    if not ids:
        return {"mode": mode, "prompts": 0}
    logr = [math.log(res[(i, ref)]["wall_s"] / res[(i, mode)]["wall_s"]) for i in ids]
    dq = [score[(i, mode)] - score[(i, ref)] for i in ids]
    rng = random.Random(seed)
    boots_r, boots_q = [], []
    for _ in range(n_boot):
        pick = [rng.randrange(len(ids)) for _ in ids]
        boots_r.append(math.exp(sum(logr[k] for k in pick) / len(pick)))
        boots_q.append(sum(dq[k] for k in pick) / len(pick))
    boots_r.sort()
    boots_q.sort()
    lo, hi = int(0.025 * n_boot), int(0.975 * n_boot) - 1
    return {"mode": mode, "prompts": len(ids), "speed_ratio": math.exp(sum(logr) / len(logr)),
            "speed_ratio_ci": [boots_r[lo], boots_r[hi]], "quality_diff": sum(dq) / len(dq),
            "quality_diff_ci": [boots_q[lo], boots_q[hi]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--reference", default="pasta:stage1")
    ap.add_argument("--boot", type=int, default=2000)
    args = ap.parse_args()
    res, score = load(args.folder)
    modes = sorted({m for (_, m) in res if m.startswith("pasta") and m != args.reference})
    groups = {"all": lambda r: True, "parallel": lambda r: r.get("parallel") is True,
              "not parallel": lambda r: r.get("parallel") is False}
    out = {}
    lines = [f"Against `{args.reference}`, paired by prompt, 95% bootstrap intervals ({args.boot} resamples).", "",
             "| group | mode | prompts | wall-clock ratio | quality difference |", "|---|---|---|---|---|"]
    for g, keep in groups.items():
        out[g] = [paired(res, score, m, args.reference, keep, args.boot) for m in modes]
        for s in out[g]:
            if not s["prompts"]:
                continue
            lines.append(f"| {g} | `{s['mode']}` | {s['prompts']} | {s['speed_ratio']:.3f} "
                         f"[{s['speed_ratio_ci'][0]:.3f}, {s['speed_ratio_ci'][1]:.3f}] | "
                         f"{s['quality_diff']:+.3f} [{s['quality_diff_ci'][0]:+.3f}, {s['quality_diff_ci'][1]:+.3f}] |")
    print("\n".join(lines))
    (args.folder / "paired.json").write_text(json.dumps({"reference": args.reference, "groups": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
