"""Select training answers whose first promise comes early (issue 24, item 3).

The shipped `pasta-linear` spends about half of its decode steps on the lead: main writing alone before its first
fork (docs/benchmarks.md, section 3). Its training data has the same shape: in annotated-v3 the text before the
first promise has a median of 31 words, and 88 of the 750 parallelizable answers have no promise at all.

This script changes no answer. It only chooses and repeats answers that already exist:

* parallelizable answers with no promise are left out;
* within each category (so that no category loses its share), the answers whose lead is among the shortest
  --short of that category are repeated --repeat times, those up to the --keep quantile are kept once, and
  the rest are left out;
* answers to the other prompts are kept once, as they are.

    python scripts/select_early_forks.py data/smollm2-135m/annotated-v3.jsonl data/smollm2-135m/annotated-v4.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from pastalm.train.annotate import lead_words
from pastalm.train.io import write_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="annotated JSONL (from `pasta annotate`)")
    ap.add_argument("output", type=Path)
    ap.add_argument("--short", type=float, default=1 / 3, help="quantile of a category's leads that counts as short")
    ap.add_argument("--keep", type=float, default=0.5, help="quantile of a category's leads above which answers go")
    ap.add_argument("--repeat", type=int, default=3, help="copies of each answer with a short lead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 0 <= args.short <= args.keep <= 1:
        ap.error("need 0 <= --short <= --keep <= 1")

    rows = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
    out: list[dict] = []
    why: Counter[str] = Counter()
    by_cat: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for row in rows:
        if not row.get("parallel"):
            out.append(row)
            why["other prompts: kept"] += 1
        elif not row.get("promises"):
            why["parallelizable, no promise: left out"] += 1
        else:
            by_cat[row["category"]].append((lead_words(row["annotated"]), row))
    before: list[int] = []
    after: list[int] = []
    for cat, items in sorted(by_cat.items()):
        items.sort(key=lambda t: (t[0], t[1]["id"]))
        n_short = round(args.short * len(items))
        n_keep = max(n_short, round(args.keep * len(items)))
        for i, (n, row) in enumerate(items):
            before.append(n)
            copies = args.repeat if i < n_short else 1 if i < n_keep else 0
            out.extend([row] * copies)
            after.extend([n] * copies)
        why[f"{cat}: {n_short} x{args.repeat}, {n_keep - n_short} x1, {len(items) - n_keep} left out"] += 1
    random.Random(args.seed).shuffle(out)
    write_jsonl(args.output, out)
    for k, v in sorted(why.items()):
        print(f"{v:5d}  {k}")
    print(f"{len(out):5d}  examples written to {args.output}")
    print(f"median lead of the forking answers: {statistics.median(before):.0f} words in {args.source.name}, "
          f"{statistics.median(after):.0f} in the examples written")


if __name__ == "__main__":
    main()
