"""What a shorter promise tag would buy on the vLLM backend's own answers (no model, no timing).

Issue 14 asks PASTA on vLLM to render 1.5x the tokens per second of sequential decoding on vLLM. vLLM's step costs
the same with one sequence or a handful (docs/results.md), so that ratio is close to the rendered tokens a PASTA
step yields. Main's critical path holds each item's lead and its promise tag (`<promise tokens="30"/>`: 8 tokens
of the bundled tokenizer). This takes the answers the vLLM backend decoded with `pasta-linear`
(`bench/results/restate.json`, written by `bench/restate.py`: the first 60 eval prompts, greedy, 512 tokens),
rewrites their promise tags, and replays each through the real interpreter in the linear layout, every thread
following its script one token per step (the decoding limits off, so every answer is replayed whole):

- `v3`: the answers as decoded (`<promise tokens="30"/>`: 8 tokens);
- `4-token promise`: the same tags, with everything after `<promise` one added token (`<`, `prom`, `ise`,
  ` tokens="30"/>`): about what dropping the length hint (`<promise/>`) would save;
- `one-token promise`: each tag one added token: what a new vocabulary entry would save; nothing shorter is
  possible short of not promising;
- `one-token tags`: that, and `<async>`, `</async>` and `<sync/>` one added token each (a block's close tag is
  on the critical path when that block is the last to end).

The text stays the same and valid (added tokens only change how it is cut into tokens), so the blocks' budgets
and everything else replay as decoded.

Per answer: rendered tokens per step (the sequential baseline yields 1). Prints geometric means over the
parallelizable prompts and over the prompts `bench/backends.py` measured, with the measured ratio for reference,
and writes JSON. The same answers in every variant: a model trained on a shorter tag would write other answers,
so this bounds what the tag alone can buy.

    .venv/bin/python bench/promise_length.py [--answers bench/results/restate.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pastalm.engine.engine import scripts_for  # noqa: E402
from pastalm.engine.interpreter import Interpreter, Limits  # noqa: E402
from pastalm.eval.speed import geomean, machine, timestamp  # noqa: E402
from pastalm.lang import ReservePolicy  # noqa: E402
from pastalm.models import load_tokenizer  # noqa: E402
from pastalm.testing import replay_scripts  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402

TAG = re.compile(r"<promise[^>]*/>")


def per_step(tok, raw: str) -> tuple[float, int, int]:
    """(rendered tokens per step, rendered tokens, steps) of a replay of `raw` in the linear layout."""
    interp = Interpreter(tok, tok.encode("Q", add_special_tokens=False), {tok.eos_token_id},
                         ReservePolicy.for_tokenizer(tok, layout="linear"),
                         Limits(max_new_tokens=10**6, max_threads=64, async_factor=10.0, async_cap=10**6,
                                repeat_guard=False, block_guard=False), False, scripts_for(tok, raw))
    steps = [0]
    replay_scripts(interp, lambda: steps.__setitem__(0, steps[0] + 1))
    rendered = len(interp.token_logprobs(complete=True))
    return rendered / max(steps[0], 1), rendered, steps[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=Path, default=ROOT / "bench" / "results" / "restate.json")
    ap.add_argument("--backends", type=Path, default=ROOT / "bench" / "results" / "backends-compiled.json",
                    help="bench/backends.py's JSON: its prompts and measured ratio")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "promise_length.json")
    args = ap.parse_args()
    tok = load_tokenizer()
    parallel = {p["id"] for p in load_prompts("eval") if p.get("parallel")}
    answers = [a for a in json.loads(args.answers.read_text())["answers"] if a["id"] in parallel]
    tags = sorted({t for a in answers for t in TAG.findall(a["raw"])})
    four, one, tags1 = copy.deepcopy(tok), copy.deepcopy(tok), copy.deepcopy(tok)
    four.add_tokens([t[len("<promise"):] for t in tags])
    one.add_tokens(tags)
    tags1.add_tokens(tags + ["<async>", "</async>", "<sync/>"])
    variants = {"v3": tok, "4-token promise": four, "one-token promise": one, "one-token tags": tags1}
    for name, want in (("4-token promise", 4), ("one-token promise", 1)):
        assert all(len(variants[name].encode(t, add_special_tokens=False)) == want for t in tags), name
    rows = []
    for a in answers:
        row = {"id": a["id"], "threads": a["threads"]}
        for name, t in variants.items():
            row[name], row[f"{name} tokens"], row[f"{name} steps"] = per_step(t, a["raw"])
        rows.append(row)
    measured = json.loads(args.backends.read_text()) if args.backends.is_file() else None
    bench_ids: set[str] = set()
    ratio = None
    if measured is not None:
        jsonl = ROOT / measured["settings"]["out"]
        bench_ids = {json.loads(line)["id"] for line in jsonl.read_text().splitlines() if line.strip()}
        ratio = next((r["gmean"] for r in measured["ratios"] if r["ratio"] == "vllm-pasta / vllm-seq"), None)
    table = []
    for label, ids in (("parallelizable eval prompts in the first 60", {r["id"] for r in rows}),
                       ("bench/backends.py's prompts", bench_ids & {r["id"] for r in rows})):
        sel = [r for r in rows if r["id"] in ids]
        if sel:
            table.append({"prompts": label, "n": len(sel), **{v: geomean([r[v] for r in sel]) for v in variants},
                          "tag tokens a promise": {v: len(t.encode(tags[0], add_special_tokens=False))
                                                   for v, t in variants.items()}})
    print("| prompts | n | " + " | ".join(f"{v}: rendered tokens / step" for v in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for t in table:
        print(f"| {t['prompts']} | {t['n']} | " + " | ".join(f"{t[v]:.2f}" for v in variants) + " |")
    print("tag tokens a promise: " + ", ".join(f"{v} {n}" for v, n in table[0]["tag tokens a promise"].items()))
    if ratio is not None:
        print(f"measured on those prompts (bench/backends.py, vLLM PASTA / vLLM sequential, rendered tok/s): "
              f"{ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": timestamp(), "machine": machine(), "table": table, "measured": ratio,
                                    "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
