"""Fork the lead of each parallelizable training answer (issue 24, item 3).

The lead (main writing alone before its first promise) is the largest part of main's critical path: 35-47% of all
decode steps with today's `pasta-linear` (docs/benchmarks.md, sections 3 and 3b), and the four parallelizable eval
answers that never fork are one long lead each. In the training answers the lead is an opening paragraph (or two)
that main writes alone before the list or the second paragraph begins.

This script changes no answer's text, only where its tags go: in the text before the first promise (the whole
answer when there is none), every paragraph of at least --min-words words and two sentences keeps its lead in main
(the annotator's `lead_end`: a bold header, a short first clause, or the first 4 words) and gives the rest to a
block. Main then goes on to the next paragraph or the list while that block writes. A paragraph with no text of
main's after it (a one-paragraph answer) is left as it is: forking it would only make main wait. Every annotation
is checked by `pastalm.train.annotate.check` (it must render to the original answer) and its budgets are the real
token counts, rounded up to --bucket, as `pasta annotate` writes them.

    python scripts/fork_leads.py data/smollm2-135m/annotated-v4.jsonl data/smollm2-135m/annotated-v5.jsonl \
        --also data/smollm2-135m/annotated-v3.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from collections import Counter
from pathlib import Path

from pastalm.lang.tags import ASYNC_CLOSE, ASYNC_OPEN, promise_tag
from pastalm.models import load_tokenizer
from pastalm.train.annotate import check, lead_end, lead_words
from pastalm.train.io import write_jsonl

_SENTENCE_END = re.compile(r"[.!?:](?=\s|$)")


def sentences(paragraph: str) -> int:
    return len(_SENTENCE_END.findall(paragraph.strip()))


def fork_paragraph(par: str, min_words: int, min_body_words: int) -> str | None:
    """`par` (one paragraph, with its trailing blank line) with its body in a block, or None to leave it."""
    text = par.rstrip()
    if len(text.split()) < min_words or sentences(text) < 2 or "\n" in text.strip():
        return None
    cut = lead_end(text)
    lead, body = text[:cut], text[cut:]
    if len(body.split()) < min_body_words or not lead.strip():
        return None
    return lead + promise_tag(None, 1) + ASYNC_OPEN + body + ASYNC_CLOSE + par[len(text):]


def fork_lead(annotated: str, min_words: int, min_body_words: int) -> str:
    """The annotation with the paragraphs of its lead forked (unchanged when none qualifies)."""
    cut = annotated.find("<promise")
    lead, rest = (annotated, "") if cut < 0 else (annotated[:cut], annotated[cut:])
    parts = re.split(r"(?<=\n\n)", lead)
    out = []
    for k, par in enumerate(parts):
        # main must have something to write after the block: a later paragraph of the lead, or the rest
        after = "".join(parts[k + 1:]) + rest
        forked = fork_paragraph(par, min_words, min_body_words) if after.strip() else None
        out.append(forked if forked is not None else par)
    return "".join(out) + rest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="annotated JSONL (e.g. annotated-v4, from select_early_forks.py)")
    ap.add_argument("output", type=Path)
    ap.add_argument("--also", type=Path, help="another annotated JSONL whose parallelizable answers without a "
                    "promise are added once each, forked where this script can (annotated-v3's 88)")
    ap.add_argument("--min-words", type=int, default=25, help="shortest paragraph of the lead that is forked")
    ap.add_argument("--min-body-words", type=int, default=15, help="shortest text a block is given")
    ap.add_argument("--bucket", type=int, default=10, help="round budgets up to this, as `pasta annotate` does")
    ap.add_argument("--model", default=None, help="whose tokenizer counts the budgets (default: the bundled model)")
    ap.add_argument("--unchanged", type=int, help="keep only this many (random) parallelizable examples whose lead "
                    "was left as it is (default: all)")
    ap.add_argument("--other", type=int, help="keep only this many (random) examples of the other prompts "
                    "(default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = [json.loads(line) for line in args.source.read_text().splitlines() if line.strip()]
    if args.also:
        extra = [json.loads(line) for line in args.also.read_text().splitlines() if line.strip()]
        rows += [r for r in extra if r.get("parallel") and not r.get("promises")]
    tok = load_tokenizer(args.model)
    why: Counter[str] = Counter()
    cache: dict[str, tuple[str, int] | None] = {}
    forked, unchanged, other = [], [], []  # (row written, its annotation before)
    for row in rows:
        if not row.get("parallel"):
            other.append((row, row["annotated"]))
            continue
        key = row["annotated"]
        if key not in cache:
            new_ann = fork_lead(key, args.min_words, args.min_body_words)
            res = check(new_ann, row["answer"], tok, args.bucket) if new_ann != key else None
            if res is not None and res.annotated is None:
                why["rejected by check: " + ", ".join(res.reasons)] += 1
            cache[key] = (res.annotated, res.promises) if res is not None and res.annotated else None
        done = cache[key]
        if done is None:
            if not row.get("promises"):
                why["parallelizable, no promise and none added: left out"] += 1
            else:
                unchanged.append((row, key))
            continue
        new = dict(row)
        new["annotated"], new["promises"] = done
        forked.append((new, key))
    rng = random.Random(args.seed)
    if args.unchanged is not None and args.unchanged < len(unchanged):
        unchanged = rng.sample(unchanged, args.unchanged)
    if args.other is not None and args.other < len(other):
        other = rng.sample(other, args.other)
    why["parallelizable: lead forked"] = len(forked)
    why["parallelizable: lead left as it is"] = len(unchanged)
    why["other prompts: kept as they are"] = len(other)
    before = [lead_words(old) for _, old in forked + unchanged]
    after = [lead_words(new["annotated"]) for new, _ in forked + unchanged]
    out = [row for row, _ in forked + unchanged + other]
    rng.shuffle(out)
    write_jsonl(args.output, out)
    for k, v in sorted(why.items()):
        print(f"{v:5d}  {k}")
    print(f"{len(out):5d}  examples written to {args.output}")
    print(f"median lead of the parallelizable examples: {statistics.median(before):.0f} words before, "
          f"{statistics.median(after):.0f} after; mean {statistics.mean(before):.1f} -> {statistics.mean(after):.1f}")


if __name__ == "__main__":
    main()
