"""Where main's critical path goes (issue 24, item 3): every step of a PASTA answer, sorted by what it did.

A PASTA answer takes as many steps as its critical path is long, and each step costs about one forward pass, so
rendered tokens per step is the speedup a backend can give at best. This script decodes the eval prompts with the
shipped adapter of the linear layout (greedy, the defaults of `bench/backends.py`) and sorts each step of each
answer by what its threads wrote (`on_step`'s `wrote`, the interpreter's thread states):

- `prefill`: the prompt's step (it writes main's first token);
- `lead`, `between`, `closing`: main writes text alone, before the first fork, between a join and the next
  fork, after the last join;
- `main tag`: main writes a tag token alone (a promise, `<sync/>`);
- `parallel`: main writes while one or more blocks write;
- `blocks, 2+` and `longest block`: main waits at `<sync/>` (or has ended) while two or more blocks write, or while
  one block, the longest, finishes alone: the cost of unbalanced promises;
- `other`: a step in which nothing was written that a thread kept (the re-laid history's feed, a budget cut).

For each kind: steps, their share of all steps, the rendered tokens written in them (tags excluded) and the
time they took (the step's wall-clock, between two `on_step` calls); and the median time of a step by how many
threads wrote in it (item 4: against `bench/llamacpp_batch.py`'s raw decode with k sequences). Prints the tables
and writes JSON.

    .venv-vllm/bin/python bench/critical_path.py [--backend llamacpp] [--per-category 5] [--max-new-tokens 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pastalm.eval.speed import machine, stratified, timestamp  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402

KINDS = ("prefill", "lead", "between", "closing", "main tag", "parallel", "blocks, 2+", "longest block", "other")


def trace(eng, ids: list[int], config, tags: set[int]) -> dict:
    """Decode one prompt, recording per step what each thread wrote, whether main waited and the step's time."""
    from pastalm.engine.interpreter import Status

    batcher = eng.batcher()
    steps: list[dict] = []
    holder: dict = {}
    last = [0.0]

    def on_step(view: dict) -> None:
        now = time.perf_counter()
        interp = holder["req"].interp
        text, tag = Counter(), Counter()
        seen = Counter()
        for tid, _shown in view["wrote"]:
            seen[tid] += 1
        for tid, k in seen.items():  # the thread's last k tokens are the ones written in this step
            for token in interp.threads[tid].tokens[-k:]:
                (tag if token in tags else text)[tid] += 1
        steps.append({"dt": now - last[0], "text": dict(text), "tag": dict(tag),
                      "main_status": int(interp.main.status), "live": view["live"]})
        last[0] = now

    req = batcher.add(ids, config, on_step=on_step)
    holder["req"] = req
    last[0] = time.perf_counter()
    while not req.done:
        batcher.step()
    if req.error is not None:
        raise RuntimeError(req.error)
    return {"steps": steps, "tokens": req.result.tokens, "threads": req.result.threads, "wall_s": req.result.wall_s}


def classify(steps: list[dict]) -> list[str]:
    """One kind per step (see the module's docstring)."""
    live_before = [0] + [0] * len(steps)  # blocks live before each step
    for i, s in enumerate(steps):
        live_before[i + 1] = sum(1 for t in s["live"] if t != 0)
    forked = [any(t != 0 for t in list(s["text"]) + list(s["tag"])) for s in steps]
    first_fork = next((i for i, f in enumerate(forked) if f), None)
    last_block = max((i for i, f in enumerate(forked) if f), default=None)
    kinds = []
    for i, s in enumerate(steps):
        main_text = s["text"].get(0, 0)
        main_tag = s["tag"].get(0, 0)
        blocks = sorted({t for t in list(s["text"]) + list(s["tag"]) if t != 0})
        if i == 0:
            kinds.append("prefill")
        elif blocks and (main_text or main_tag):
            kinds.append("parallel")
        elif blocks:
            # one block writing alone is the longest one's tail only when no other block is live before or after
            kinds.append("longest block" if len(blocks) == 1 and live_before[i] <= 1 else "blocks, 2+")
        elif main_text:
            if first_fork is None or i < first_fork:
                kinds.append("lead")
            elif i > last_block:
                kinds.append("closing")
            else:
                kinds.append("between")
        elif main_tag:
            kinds.append("main tag")
        else:
            kinds.append("other")
    return kinds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="llamacpp", choices=("hf", "vllm", "llamacpp"))
    ap.add_argument("--adapter", default="pasta-linear")
    ap.add_argument("--per-category", type=int, default=5)
    ap.add_argument("--set", default="parallel", choices=("parallel", "other"))
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "critical_path.json")
    args = ap.parse_args(argv)
    from pastalm.engine import GenerateConfig
    from pastalm.engine.interpreter import tag_token_ids
    from pastalm.models import chat_prompt
    from pastalm.settings import ModelSettings

    eng = ModelSettings(backend=args.backend, gguf_type="q8_0").engine(args.adapter, layout="linear")
    tok = eng.tokenizer
    tags = set(tag_token_ids(tok))
    config = GenerateConfig(max_new_tokens=args.max_new_tokens, layout="linear")
    want = (lambda p: bool(p.get("parallel"))) if args.set == "parallel" else (lambda p: not p.get("parallel"))
    prompts = [p for p in stratified(load_prompts("eval"), args.per_category) if want(p)]
    trace(eng, chat_prompt(tok, "Give two tips to stay focused."), config, tags)  # warm-up

    total = {k: {"steps": 0, "tokens": 0, "tags": 0, "time_s": 0.0} for k in KINDS}
    by_threads: dict[int, list[float]] = defaultdict(list)  # threads that wrote in a decode step -> step times
    per_prompt = []
    for n, p in enumerate(prompts):
        t = trace(eng, chat_prompt(tok, p["prompt"]), config, tags)
        kinds = classify(t["steps"])
        row = {"id": p["id"], "tokens": t["tokens"], "threads": t["threads"], "steps": len(kinds),
               "kinds": dict(Counter(kinds))}
        by = defaultdict(float)
        for k, s in zip(kinds, t["steps"]):
            total[k]["steps"] += 1
            total[k]["tokens"] += sum(s["text"].values())
            total[k]["tags"] += sum(s["tag"].values())
            total[k]["time_s"] += s["dt"]
            by[k] += s["dt"]
            if k != "prefill":
                by_threads[len(set(s["text"]) | set(s["tag"]))].append(s["dt"])
        row["time_s"] = {k: round(v, 4) for k, v in by.items()}
        row["tokens_per_step"] = round(t["tokens"] / max(1, len(kinds)), 3)
        per_prompt.append(row)
        print(f"{n + 1}/{len(prompts)} {p['id']}: {t['tokens']} tokens, {t['threads']} blocks, {len(kinds)} steps, "
              f"{row['tokens_per_step']} tokens/step", file=sys.stderr, flush=True)

    steps = sum(v["steps"] for v in total.values())
    time_all = sum(v["time_s"] for v in total.values())
    tokens = sum(v["tokens"] for v in total.values())
    print(f"\n{len(prompts)} {args.set} eval prompts, backend {args.backend}, {args.adapter}, "
          f"{args.max_new_tokens} tokens: {tokens} rendered tokens in {steps} steps "
          f"({tokens / max(1, steps):.2f} per step), {time_all:.1f} s\n")
    print("| kind | steps | share of steps | rendered tokens | tokens/step | tag tokens | time (s) | share of time | ms/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in KINDS:
        v = total[k]
        if not v["steps"]:
            continue
        print(f"| {k} | {v['steps']} | {v['steps'] / steps:.1%} | {v['tokens']} | {v['tokens'] / v['steps']:.2f} | "
              f"{v['tags']} | {v['time_s']:.1f} | {v['time_s'] / time_all:.1%} | "
              f"{1000 * v['time_s'] / v['steps']:.1f} |")
    print("\n| threads writing in a step | steps | median ms/step | vs 1 thread |")
    print("|---|---|---|---|")
    one = statistics.median(by_threads[1]) if by_threads.get(1) else None
    cost = {}
    for k in sorted(by_threads):
        ms = 1000 * statistics.median(by_threads[k])
        cost[k] = {"steps": len(by_threads[k]), "median_ms": round(ms, 3)}
        rel = f"{ms / (1000 * one):.2f}x" if one else "-"
        print(f"| {k} | {len(by_threads[k])} | {ms:.1f} | {rel} |")
    forked = [r for r in per_prompt if r["threads"]]
    print(f"\n{len(forked)}/{len(per_prompt)} answers fork; median tokens/step "
          f"{statistics.median(r['tokens_per_step'] for r in per_prompt):.2f} (forking: "
          f"{statistics.median(r['tokens_per_step'] for r in forked) if forked else 0:.2f})")
    out = {"measured": timestamp(), "machine": machine(), "backend": args.backend, "adapter": args.adapter,
           "set": args.set, "max_new_tokens": args.max_new_tokens, "prompts": len(prompts),
           "command": "bench/critical_path.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "total": total, "step_cost_by_threads": cost, "per_prompt": per_prompt}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
