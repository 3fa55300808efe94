"""Paired bootstrap of `pasta eval` folders: each PASTA mode against a reference mode, prompt by prompt.

For every mode and prompt group (all, parallelizable, not): the wall-clock ratio to the reference (geometric mean
over prompts of reference time / mode time) and the difference of mean judge scores, each with a 95% percentile
bootstrap interval (`pastalm.eval.speed.paired_bootstrap`). Prints a markdown table and writes
`FOLDER/paired.json`. Several folders (runs on different prompts) are pooled: a prompt's pair of answers always
comes from one run, and the result goes to `--output`.

    python bench/paired.py docs/frontier --reference pasta:stage1 [--boot 2000]
    python bench/paired.py docs/frontier2 docs/frontier3 --reference pasta:stage1 --output docs/frontier-pooled.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pastalm.eval.speed import paired_bootstrap
from pastalm.train.io import read_jsonl

GROUPS = {"all": lambda r: True, "parallel": lambda r: r.get("parallel") is True,
          "not parallel": lambda r: r.get("parallel") is False}


def compare(folders: list[Path], reference: str, n_boot: int = 2000) -> dict:
    res, score = {}, {}
    for k, folder in enumerate(folders):  # a prompt id is only unique within its run
        tag = "" if len(folders) == 1 else f"{k}/"
        res.update({(tag + r["id"], r["mode"]): r for r in read_jsonl(folder / "results.jsonl")})
        score.update({(tag + j["id"], j["mode"]): j["score"] for j in read_jsonl(folder / "judgments.jsonl")})
    modes = sorted({m for (_, m) in res if m.startswith("pasta") and m != reference})
    out = {}
    for group, keep in GROUPS.items():
        out[group] = []
        for mode in modes:
            ids = sorted(i for (i, m) in res if m == mode and keep(res[(i, m)]) and (i, reference) in res
                         and (i, mode) in score and (i, reference) in score)
            if ids:
                out[group].append({"mode": mode, **paired_bootstrap(
                    [res[(i, reference)]["wall_s"] for i in ids], [res[(i, mode)]["wall_s"] for i in ids],
                    [score[(i, reference)] for i in ids], [score[(i, mode)] for i in ids], n_boot)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+", help="`pasta eval --out` folders with results and judgments")
    ap.add_argument("--reference", default="pasta:stage1", help="the mode every other PASTA mode is compared with")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--output", type=Path, help="where to write the JSON (default: FOLDER/paired.json; required "
                    "with several folders)")
    args = ap.parse_args()
    if args.output is None and len(args.folders) > 1:
        ap.error("pooling several folders: give --output FILE for the result")
    out = compare(args.folders, args.reference, args.boot)
    if not any(out.values()):
        ap.error(f"no prompt has both a '{args.reference}' answer and another PASTA mode's; check --reference")
    pooled = f" pooled over {len(args.folders)} runs" if len(args.folders) > 1 else ""
    lines = [f"Against `{args.reference}`, paired by prompt{pooled}, 95% bootstrap intervals ({args.boot} resamples).",
             "",
             "| group | mode | prompts | wall-clock ratio | quality difference |", "|---|---|---|---|---|"]
    for group, rows in out.items():
        for s in rows:
            lines.append(f"| {group} | `{s['mode']}` | {s['prompts']} | {s['speed_ratio']:.3f} "
                         f"[{s['speed_ratio_ci'][0]:.3f}, {s['speed_ratio_ci'][1]:.3f}] | "
                         f"{s['quality_diff']:+.3f} [{s['quality_diff_ci'][0]:+.3f}, {s['quality_diff_ci'][1]:+.3f}] |")
    print("\n".join(lines))
    dest = args.output or args.folders[0] / "paired.json"
    dest.write_text(json.dumps({"reference": args.reference, "runs": [str(f) for f in args.folders], "groups": out},
                               indent=1) + "\n")


if __name__ == "__main__":
    main()
