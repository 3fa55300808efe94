"""What an annotation scheme costs and buys, on the training answers themselves (no model, no timing).

Each base answer is annotated with each scheme and replayed through the real interpreter (every thread follows
its script, one token per step, as in a forced replay): the theoretical speedup it would have if the model wrote
exactly this, the tag tokens main writes on its critical path, and how many answers fork. This bounds what a model
trained on the scheme can reach; `pasta eval` measures what it does reach.

    python bench/annotation.py                      # data/smollm2-135m/answers.jsonl, schemes v1, v2, v2 without topics
    python bench/annotation.py --limit 200 --output bench/results/annotation.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pastalm.engine.engine import scripts_for  # noqa: E402
from pastalm.engine.interpreter import Interpreter, Limits  # noqa: E402
from pastalm.eval.speed import geomean  # noqa: E402
from pastalm.lang import ReservePolicy  # noqa: E402
from pastalm.lang.parser import Promise, parse  # noqa: E402
from pastalm.testing import replay_scripts  # noqa: E402
from pastalm.train.annotate import StructuralAnnotator, check  # noqa: E402
from pastalm.train.io import read_jsonl  # noqa: E402


def replay(tok, annotated: str, policy: ReservePolicy) -> Interpreter:
    scripts = scripts_for(tok, annotated)
    interp = Interpreter(tok, tok.encode("Q", add_special_tokens=False), {tok.eos_token_id}, policy,
                         Limits(max_new_tokens=10**6, max_threads=64, async_factor=10.0, async_cap=10**6,
                                repeat_guard=False, block_guard=False), False,
                         scripts)
    replay_scripts(interp)
    return interp


def no_topics(annotated: str) -> str:
    return re.sub(r' topic="[^"]*"', "", annotated)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", default=str(ROOT / "data/smollm2-135m/answers.jsonl"))
    ap.add_argument("--limit", type=int)
    ap.add_argument("--output", default=str(ROOT / "bench/results/annotation.json"))
    a = ap.parse_args()
    from pastalm.models import load_tokenizer

    tok = load_tokenizer()
    policy = ReservePolicy.for_tokenizer(tok)
    rows = read_jsonl(a.answers)[: a.limit]
    schemes = {"v1": (StructuralAnnotator(scheme="v1"), None), "v2": (StructuralAnnotator(scheme="v2"), None),
               "v2, no topics": (StructuralAnnotator(scheme="v2"), no_topics)}
    table = {}
    for name, (ann, post) in schemes.items():
        speed, main_tags, main_tokens, forked, promises = [], [], [], 0, []
        for r in rows:
            res = check(ann.annotate(r["prompt"], r["answer"]), r["answer"], tok, bucket=10)
            text = res.annotated or r["answer"]
            if post:
                text = post(text)
            interp = replay(tok, text, policy)
            n_prom = sum(isinstance(e, Promise) for e in parse(text))
            if not n_prom:
                continue
            forked += 1
            promises.append(n_prom)
            speed.append(interp.theoretical_speedup())
            main = interp.main
            main_tokens.append(main.num_generated)
            main_tags.append(sum(len(tok.encode(e.raw, add_special_tokens=False)) for e in main.events
                                 if type(e).__name__ != "Text"))
        table[name] = {"answers": len(rows), "forked": forked, "promises_mean": sum(promises) / len(promises),
                       "theoretical_speedup_gmean": geomean(speed),
                       "main_tokens_mean": sum(main_tokens) / len(main_tokens),
                       "main_tag_tokens_mean": sum(main_tags) / len(main_tags)}
    print(f"{len(rows)} answers from {a.answers}; forked answers only below")
    print("| scheme | forked | promises (mean) | theoretical speedup (gmean) | main's tokens (mean) | of them tags |")
    print("|---|---|---|---|---|---|")
    for name, t in table.items():
        print(f"| {name} | {t['forked']} | {t['promises_mean']:.1f} | {t['theoretical_speedup_gmean']:.2f}x | "
              f"{t['main_tokens_mean']:.0f} | {t['main_tag_tokens_mean']:.0f} |")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
