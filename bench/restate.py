"""How often main restates a block it cannot see, in the linear layout (docs/results.md, issue 14).

In the linear layout main does not see a block before a sync, so after a promise it may write the block's text
itself. This decodes the first N evaluation prompts with PASTA and counts the blocks after which main's text begins
with the block's own first 4 words. Run it in the vLLM environment (`.venv-vllm/bin/python bench/restate.py`), or with
`--backend hf` in either environment. Prints the counts and the cases, and writes the answers to --out.

    .venv-vllm/bin/python bench/restate.py [--prompts 60] [--backend vllm] [--out bench/results/restate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pastalm.engine import GenerateConfig  # noqa: E402
from pastalm.models import chat_prompt  # noqa: E402
from pastalm.settings import ModelSettings  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402

BLOCK = re.compile(r"<promise[^>]*/><async>(.*?)</async>", re.S)


def words(s: str) -> list[str]:
    return re.findall(r"[\w']+", s.lower())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=60, help="the first N evaluation prompts")
    ap.add_argument("--backend", default="vllm", choices=["hf", "vllm"])
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "restate.json")
    args = ap.parse_args(argv)
    engine = ModelSettings(backend=args.backend).engine(layout="linear")
    cfg = GenerateConfig(max_new_tokens=args.max_new_tokens, layout="linear")
    answers, blocks, cases = [], 0, []
    for p in load_prompts("eval")[: args.prompts]:
        r = engine.generate(chat_prompt(engine.tokenizer, p["prompt"]), cfg)
        answers.append({"id": p["id"], "raw": r.raw, "text": r.text, "threads": r.threads})
        for m in BLOCK.finditer(r.raw):
            blocks += 1
            head, after = words(m.group(1))[:4], words(r.raw[m.end():m.end() + 300])[:4]
            if len(head) == 4 and head == after:
                cases.append((p["id"], " ".join(head)))
    forked = sum(1 for a in answers if a["threads"])
    print(f"{args.backend}: {len(answers)} prompts, {forked} forked, {blocks} blocks; main restates its block's first "
          f"4 words after {len(cases)} blocks in {len({c[0] for c in cases})} answers")
    for c in cases:
        print("  ", *c)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"backend": args.backend, "blocks": blocks, "cases": cases, "answers": answers},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
