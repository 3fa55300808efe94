"""What streaming a request costs the step loop per step, as its answer grows (no model: forced replays).

The batcher renders each streamed request after every step: the text (`Interpreter.rendered`) and, when the client
asked for logprobs, the token entries (`Interpreter.token_logprobs`). Built whole, the entries cost O(answer) per
step, so O(answer^2) per request. The batcher now builds only the entries from the first unsent one on
(`Interpreter.token_entries(start=...)`). This replays synthetic PASTA answers (N items of M words each, every
item a block) through the interpreter with the bundled tokenizer and times, per step, each way of rendering,
side by side in one run. Prints a table and writes JSON.

    .venv/bin/python bench/stream_cost.py [--out bench/results/stream_cost.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pastalm.engine.batch import _send_entries  # noqa: E402
from pastalm.engine.engine import thread_segments  # noqa: E402
from pastalm.engine.interpreter import Interpreter, Limits  # noqa: E402
from pastalm.eval.speed import machine, timestamp  # noqa: E402
from pastalm.lang import ReservePolicy  # noqa: E402
from pastalm.models import load_tokenizer  # noqa: E402
from pastalm.testing import replay_scripts  # noqa: E402

WAYS = ("text", "entries, whole", "entries, from the first unsent")


def answer(items: int, words: int) -> str:
    body = " ".join(f"point{j}" for j in range(words))
    return "Here are some tips:\n\n" + "".join(
        f'{i + 1}. **Tip number {i + 1}**:<promise tokens="500"/><async> {body}.</async>\n\n' for i in range(items))


def per_step_ms(tok, annotated: str, way: str) -> tuple[float, int, int]:
    """Mean ms per step spent rendering one way (the request's total over its steps), steps, rendered tokens."""
    scripts = [tok.encode("".join(s.text for s in segs), add_special_tokens=False)
               for segs in thread_segments(annotated, False)]
    interp = Interpreter(tok, tok.encode("Tips?", add_special_tokens=False), {tok.eos_token_id},
                         ReservePolicy.for_tokenizer(tok), Limits(repeat_guard=False, max_threads=64,
                                                                  max_new_tokens=1 << 20), False, scripts)
    req = SimpleNamespace(interp=interp, tokens_sent=0, chars_sent=0, next_entry=None, on_tokens=lambda e: None)
    times: list[float] = []

    def step() -> None:
        t = time.perf_counter()
        if way == "text":
            interp.rendered()
        elif way == "entries, whole":
            interp.token_logprobs()
        else:
            _send_entries(req)
        times.append(time.perf_counter() - t)

    replay_scripts(interp, step)
    return 1000 * statistics.fmean(times), len(times), len(interp.token_logprobs(complete=True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stream_cost.json")
    args = ap.parse_args()
    tok = load_tokenizer()
    rows = []
    for items, words in ((4, 40), (8, 100), (16, 100), (8, 400)):
        row = {"items": items, "words": words}
        for way in WAYS:
            ms, steps, tokens = per_step_ms(tok, answer(items, words), way)
            row.update({way: round(ms, 4), "steps": steps, "tokens": tokens})
        rows.append(row)
    print("| items x words | rendered tokens | steps | " + " | ".join(f"{w} (ms/step, mean)" for w in WAYS) + " |")
    print("|---|---|---|" + "---|" * len(WAYS))
    for r in rows:
        print(f"| {r['items']} x {r['words']} | {r['tokens']} | {r['steps']} | "
              + " | ".join(f"{r[w]:.3f}" for w in WAYS) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": timestamp(), "machine": machine(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
