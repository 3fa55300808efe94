"""Where a decode step's time goes: the model's forward against the engine's host work (issue 24, items 1 and 2).

Two parts, each a table (and JSON with --json):

- `--part host` (a tiny random Llama, where the forward costs about nothing): the engine's host time per step with
  1, 4 and 8 live threads (forced replays of blocks long enough to keep them live), against HF `generate`'s per
  step on the same model. Host time is a step's wall time less the time inside the model's forward (timed with
  forward hooks on the top-level module), so the mask, positions, cache bookkeeping, the interpreter, sampling and
  the stream are host; attention and the layers are not.
- `--part model` (the bundled model): for each prompt, the sequential baseline (`--adapter baseline
  --sequential`) and the PASTA adapter, interleaved: time to first token, decode steps, forward and host time per
  step, rendered tokens per second overall and over the decode steps alone. This says whether a PASTA answer that
  does not fork costs more per step than a sequential one, and where.

    .venv/bin/python bench/step_cost.py --part host [--steps 200] [--reps 5]
    .venv/bin/python bench/step_cost.py --part model [--prompts 12] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pastalm.engine import Engine, GenerateConfig  # noqa: E402
from pastalm.engine.batch import Batcher  # noqa: E402
from pastalm.eval.speed import machine, timestamp  # noqa: E402


class ForwardClock:
    """Seconds spent inside `model.forward` (top-level module hooks), and how many calls."""

    def __init__(self, model):
        self.total = 0.0
        self.calls = 0
        self._t = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t = time.perf_counter()

    def _post(self, *_):
        self.total += time.perf_counter() - self._t
        self.calls += 1


def timed_steps(eng: Engine, prompt: list[int], cfg: GenerateConfig, clock: ForwardClock, scripts=None,
                on_text=None, stop_ids=None) -> dict:
    """One request through the step loop, each step timed: wall and forward time per step, the first step
    (prefill) apart. `scripts` are scaffolding (main's written at once, the blocks then decode freely)."""
    b = Batcher(eng)
    req = b.add(prompt, cfg, scripts, scaffold=scripts is not None, on_text=on_text, stop_ids=stop_ids)
    walls, fwds, live = [], [], []
    while not req.done:
        f0, t0 = clock.total, time.perf_counter()
        n = b.live_threads
        b.step()
        walls.append(time.perf_counter() - t0)
        fwds.append(clock.total - f0)
        live.append(n)
    return {"walls": walls, "fwds": fwds, "live": live, "result": req.result}


def host_part(args) -> dict:
    from pastalm.models import chat_prompt
    from pastalm.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama")
    clock = ForwardClock(model)
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    prompt = chat_prompt(tok, "Give tips.")
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    rows = []
    n = args.steps
    for k in (1, 4, 8):
        # k = 1: main decodes n tokens greedily; k > 1: main writes k promises in one step, then each block decodes
        # greedily to its budget of n tokens: k live threads for about n steps. No stop token (a random model stops
        # anywhere), streamed as `pasta generate` streams.
        if k == 1:
            cfg, scripts = GenerateConfig(max_new_tokens=n, sequential=True), None
        else:
            main = [i for _ in range(k) for i in enc(f'<promise tokens="{n}"/>')]
            scripts = [main] + [[] for _ in range(k)]
            cfg = GenerateConfig(max_new_tokens=10 * n * k, async_factor=1.0, max_threads=8, repeat_guard=False,
                                 layout="linear")  # 8 reservations of n would pass the 1,024 positions
        per = []
        for _ in range(args.reps):
            r = timed_steps(eng, prompt, cfg, clock, scripts=scripts, on_text=lambda s: None, stop_ids=set())
            steady = [(w, f) for w, f, lv in zip(r["walls"][1:], r["fwds"][1:], r["live"][1:]) if lv >= k]
            per.append((statistics.median(w for w, _ in steady), statistics.median(f for _, f in steady),
                        statistics.median(w - f for w, f in steady), len(steady)))
        rows.append({"mode": f"pastalm, {k} live thread{'s' if k > 1 else ''}", "threads": k,
                     "step_ms": 1e3 * statistics.median(p[0] for p in per),
                     "forward_ms": 1e3 * statistics.median(p[1] for p in per),
                     "host_ms": 1e3 * statistics.median(p[2] for p in per), "steps": per[0][3]})
    # HF generate, one sequence, the same number of new tokens (no EOS: a random model would stop anywhere)
    ids = torch.tensor([prompt])
    per = []
    for _ in range(args.reps):
        f0, c0, t0 = clock.total, clock.calls, time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        wall, calls = time.perf_counter() - t0, clock.calls - c0
        per.append((wall / calls, (clock.total - f0) / calls))
    rows.append({"mode": "HF generate, 1 sequence", "threads": 1,
                 "step_ms": 1e3 * statistics.median(p[0] for p in per),
                 "forward_ms": 1e3 * statistics.median(p[1] for p in per),
                 "host_ms": 1e3 * statistics.median(p[0] - p[1] for p in per), "steps": n})
    print(f"\nHost time per step, tiny random Llama ({sum(p.numel() for p in model.parameters()):,} parameters), "
          f"{n} steps, median of {args.reps}")
    print(f"| mode | step (ms) | in the forward (ms) | host (ms) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['step_ms']:.2f} | {r['forward_ms']:.2f} | {r['host_ms']:.2f} |")
    return {"part": "host", "steps": n, "reps": args.reps, "rows": rows}


def model_part(args) -> dict:
    from pastalm.models import chat_prompt, load
    from pastalm.train.prompts import load_prompts

    prompts = [p for p in load_prompts("eval") if not p.get("parallel")][: args.prompts]
    engines = {}
    for mode, adapter in (("sequential", "baseline"), ("pasta", "pasta")):
        lo = load(None, args.dtype, adapter)
        engines[mode] = (Engine(lo.model, lo.tokenizer, lo.name), ForwardClock(lo.model))
    cfgs = {"sequential": GenerateConfig(sequential=True, max_new_tokens=args.max_new_tokens),
            "pasta": GenerateConfig(max_new_tokens=args.max_new_tokens)}
    warm = chat_prompt(engines["pasta"][0].tokenizer, "Hello")
    for eng, clock in engines.values():
        timed_steps(eng, warm, GenerateConfig(max_new_tokens=8), clock)
    rows = []
    for i, p in enumerate(prompts):
        order = ["sequential", "pasta"] if i % 2 == 0 else ["pasta", "sequential"]
        for rep in range(args.reps):
            for mode in order:
                eng, clock = engines[mode]
                r = timed_steps(eng, chat_prompt(eng.tokenizer, p["prompt"]), cfgs[mode], clock,
                                on_text=lambda s: None)
                res = r["result"]
                dec_w, dec_f = r["walls"][1:], r["fwds"][1:]
                rows.append({"id": p["id"], "mode": mode, "rep": rep, "tokens": res.tokens,
                             "threads": res.threads, "steps": res.decode_steps, "wall_s": sum(r["walls"]),
                             "ttft_s": r["walls"][0], "decode_step_ms": 1e3 * statistics.median(dec_w or [0]),
                             "forward_ms": 1e3 * statistics.median(dec_f or [0]),
                             "host_ms": 1e3 * statistics.median([w - f for w, f in zip(dec_w, dec_f)] or [0]),
                             "tok_s": res.tokens / sum(r["walls"]),
                             "decode_tok_s": (res.tokens - 1) / sum(dec_w) if dec_w else 0.0,
                             "text": res.text})
        print(f"{p['id']} done", file=sys.stderr)
    summary = {}
    for mode in ("sequential", "pasta"):
        rs = [r for r in rows if r["mode"] == mode]
        summary[mode] = {k: statistics.median(r[k] for r in rs) for k in
                         ("tokens", "ttft_s", "decode_step_ms", "forward_ms", "host_ms", "tok_s", "decode_tok_s")}
    print(f"\nBundled model, {len(prompts)} non-parallelizable eval prompts x {args.reps}, medians")
    print("| mode | tokens | TTFT (s) | decode step (ms) | forward (ms) | host (ms) | tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, s in summary.items():
        print(f"| {mode} | {s['tokens']:.0f} | {s['ttft_s']:.3f} | {s['decode_step_ms']:.2f} | {s['forward_ms']:.2f} "
              f"| {s['host_ms']:.2f} | {s['tok_s']:.1f} | {s['decode_tok_s']:.1f} |")
    return {"part": "model", "reps": args.reps, "summary": summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("host", "model"), default="host")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = host_part(args) if args.part == "host" else model_part(args)
    out.update(machine=machine(), when=timestamp(), torch_threads=torch.get_num_threads())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
