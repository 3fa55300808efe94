"""Stage-2 candidates without the judge, judged later: for sampling on a machine that cannot hold the proxy judge's
embedding model (a GPU lent with a small transfer limit), then judging and training where it is installed.

    PASTA_DEVICE=cuda python scripts/sample_deferred.py sample runs/v3-prefer --from runs/v3-sft2 --limit 64
    python scripts/sample_deferred.py judge runs/v3-prefer
    pasta train prefer --from runs/v3-sft2 --output runs/v3-prefer --limit 64 ...   # same settings: trains only

`sample` writes OUT/round-1-samples.jsonl exactly as `pasta train prefer` does (the same prompts, seeds, greedy
candidate and budget; prompts already there are skipped), with quality 0 and the answer's pieces kept for the judge;
it needs OUT/reference.jsonl (the baseline's answers, from an earlier `pasta train prefer` on the same prompts).
`judge` scores every deferred sample with the proxy judge against that reference, in place. `pasta train prefer` on
the same folder then finds every prompt sampled and goes straight to the pairs and the training.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Deferred:
    """A judge that scores nothing and keeps what the proxy judge will need."""

    pairwise = False

    def judge(self, prompt, reference, candidate):
        return SimpleNamespace(score=0.0, details={"deferred": True, "pieces": candidate.pieces})


def sample(a) -> None:
    from pastalm.engine import Engine
    from pastalm.eval.speed import stratified
    from pastalm.models import load
    from pastalm.train.io import read_jsonl
    from pastalm.train.prefer import PreferConfig, sample_answers
    from pastalm.train.prompts import load_prompts

    out = Path(a.output)
    cfg = PreferConfig(output=str(out), from_adapter=a.from_adapter, per_category=a.per_category,
                       lambdas=[math.inf], greedy_candidate=True, max_new_tokens=a.max_new_tokens,
                       batch_requests=a.batch_requests)
    prompts = stratified(load_prompts(cfg.prompts), cfg.per_category)[: a.limit]
    refs = {r["id"]: r for r in read_jsonl(out / "reference.jsonl")}
    gen = load(None, cfg.dtype, a.from_adapter)
    print(f"{gen.name} on {gen.model.device}", flush=True)
    sample_answers(Engine(gen.model, gen.tokenizer, gen.name), prompts, cfg, out / "round-1-samples.jsonl",
                   Deferred(), refs)


def judge(a) -> None:
    from pastalm.eval.judges import Answer, ProxyJudge
    from pastalm.train.io import read_jsonl

    out = Path(a.output)
    refs = {r["id"]: r for r in read_jsonl(out / "reference.jsonl")}
    path = out / "round-1-samples.jsonl"
    rows = read_jsonl(path)
    j = ProxyJudge()
    n = 0
    for r in rows:
        if not r["judge"].get("deferred"):
            continue
        ref = refs[r["id"]]
        v = j.judge(r["prompt"], Answer(ref["answer"], ref.get("pieces", [])), Answer(r["text"], r["judge"]["pieces"]))
        r["quality"], r["judge"] = v.score, v.details
        n += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    print(f"judged {n} of {len(rows)} samples in {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("output")
    s.add_argument("--from", dest="from_adapter", required=True)
    s.add_argument("--per-category", type=int, default=8)
    s.add_argument("--limit", type=int)
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--batch-requests", type=int, default=16)
    s.set_defaults(func=sample)
    g = sub.add_parser("judge")
    g.add_argument("output")
    g.set_defaults(func=judge)
    a = ap.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
