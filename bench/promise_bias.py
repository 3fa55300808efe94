"""An experiment, not a feature (issue 24, item 3): does a logit bias toward promises make main fork sooner?

Most of main's critical path is the lead: the text main writes alone before its first promise
(`bench/critical_path.py`). This adds `--biases` (in logits) to every one-token promise tag of the shipped
`pasta-linear` adapter in main's choices only, on the llama.cpp backend (greedy, Q8_0, 512 tokens), and reports per
prompt the rendered tokens, steps, blocks and rendered tokens per step and per second, with the answers in the
JSON for reading side by side. The bias is applied by wrapping the runners' shared `runner.choose`; pastalm itself
has no such setting.

    .venv/bin/python bench/promise_bias.py [--biases 0,2,4] [--per-category 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pastalm.eval.speed import machine, stratified, timestamp  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--biases", default="0,2,4")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "promise_bias.json")
    args = ap.parse_args(argv)
    from pastalm.engine import GenerateConfig
    from pastalm.engine import runner
    from pastalm.engine.llamacpp import load_llamacpp
    from pastalm.engine.interpreter import promise_token_ids
    from pastalm.models import chat_prompt

    eng = load_llamacpp(None, "pasta-linear", "q8_0")
    tok = eng.tokenizer
    promise_ids = list(promise_token_ids(tok))
    if not promise_ids:
        raise SystemExit("the adapter has no one-token promise tags")
    bias = [0.0]
    choose = runner.choose

    def biased(req, f, logits, chosen):
        if f.thread == 0 and bias[0]:
            logits = logits.clone()
            logits[promise_ids] += bias[0]
        return choose(req, f, logits, chosen)

    runner.choose = biased  # the llama.cpp runner imports it at each step
    config = GenerateConfig(max_new_tokens=args.max_new_tokens, layout="linear")
    prompts = [p for p in stratified(load_prompts("eval"), args.per_category) if p.get("parallel")]
    rows = []
    for b in [float(x) for x in args.biases.split(",")]:
        bias[0] = b
        for p in prompts:
            r = eng.generate(chat_prompt(tok, p["prompt"]), config)
            rows.append({"bias": b, "id": p["id"], "tokens": r.tokens, "steps": r.decode_steps, "blocks": r.threads,
                         "tok_s": round(r.tokens / r.wall_s, 2), "tokens_per_step": round(r.tokens / r.decode_steps, 3),
                         "text": r.text, "raw": r.raw})
            print(f"bias {b}: {p['id']} {r.tokens} tokens, {r.decode_steps} steps, {r.threads} blocks",
                  file=sys.stderr, flush=True)
    print("| bias | prompts | median tokens/step | median rendered tok/s | blocks (mean) |")
    print("|---|---|---|---|---|")
    for b in sorted({r["bias"] for r in rows}):
        rs = [r for r in rows if r["bias"] == b]
        print(f"| {b:g} | {len(rs)} | {statistics.median(r['tokens_per_step'] for r in rs):.2f} | "
              f"{statistics.median(r['tok_s'] for r in rs):.1f} | {statistics.mean(r['blocks'] for r in rs):.1f} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"measured": timestamp(), "machine": machine(),
                                     "command": "bench/promise_bias.py " + " ".join(argv or sys.argv[1:]),
                                     "rows": rows}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
