"""Engine benchmark: (a) our sequential decoding vs HF generate, (b) forced replays with 1/2/4/8 chunks,
(c) the cost of one forward pass with k query tokens. Prints markdown tables and writes JSON.

    python bench/engine.py [--model PATH] [--dtype bf16|fp32] [--reps 3] [--out bench/results/engine.json]

Timings on shared machines are noisy: every comparison is measured side by side in one run, repeated, and
reported as a median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from pastalm.engine import Engine, GenerateConfig  # noqa: E402
from pastalm.engine.runner import cache_kwarg  # noqa: E402
from pastalm.lang import promise_tag  # noqa: E402
from pastalm.models import chat_prompt, load  # noqa: E402

PROMPT = "Give me some practical tips for sleeping better, with a short explanation for each."
CHUNKS = [
    "Keep a fixed schedule: go to bed and get up at the same time every day, weekends included, so that your "
    "body clock learns when to feel tired and when to wake up.",
    "Avoid screens in the hour before bed: the blue light of phones and laptops delays melatonin, and the "
    "stream of news and messages keeps the mind busy when it should slow down.",
    "Cut caffeine after noon: coffee, tea and cola stay in the blood for six hours or more, and even when you "
    "fall asleep they make the deep stages of sleep shorter and lighter.",
    "Keep the bedroom cool, dark and quiet: a temperature near eighteen degrees, thick curtains and a fan or "
    "earplugs make it much easier to fall asleep and to stay asleep.",
    "Move during the day: a brisk walk or some exercise in the afternoon builds up the pressure to sleep, as "
    "long as it ends a few hours before bedtime.",
    "Eat light in the evening: a heavy or spicy dinner late at night makes the stomach work while you lie "
    "down, which can cause heartburn and wake you up.",
    "Write your worries down: a short list of what is on your mind and what you will do about it tomorrow "
    "helps the mind let go of it for the night.",
    "Get out of bed if you cannot sleep: after twenty minutes awake, read something calm in dim light and "
    "come back when you feel sleepy, so the bed stays linked with sleep.",
]


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def annotated(tok, k: int) -> str:
    """An answer with k independent chunks, each promise carrying its chunk's real token count."""
    parts = ["Here are some tips that help.\n"]
    for i, c in enumerate(CHUNKS[:k]):
        chunk = f"{i + 1}. {c}"
        n = len(tok.encode(chunk, add_special_tokens=False))
        parts.append(promise_tag(f"tip {i + 1}", n) + f"<async>{chunk}</async>\n")
    parts.append("<sync/>Together these habits make a good night's sleep much more likely.")
    return "".join(parts)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_vs_hf(model, tok, reps: int, n: int) -> dict:
    """(a) per-token latency of our sequential decoding vs HF generate, same prompt and token count."""
    ids = chat_prompt(tok, PROMPT)
    eng = Engine(model, tok, stop_ids=set())  # never stops early: exactly n tokens
    cfg = GenerateConfig(max_new_tokens=n, sequential=True)
    inp = torch.tensor([ids])
    hf = lambda: model.generate(inp, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    ours = lambda: eng.generate(ids, cfg)  # noqa: E731
    hf(), ours()  # warm up
    t_hf, t_ours = [], []
    for _ in range(reps):
        t_hf.append(timed(hf))
        t_ours.append(timed(ours))
    ms_hf, ms_ours = 1000 * statistics.median(t_hf) / n, 1000 * statistics.median(t_ours) / n
    return {"tokens": n, "hf_ms_per_token": ms_hf, "ours_ms_per_token": ms_ours, "ratio": ms_ours / ms_hf,
            "ratios": [o / h for o, h in zip(t_ours, t_hf)]}


def bench_forced(model, tok, reps: int, ks=(1, 2, 4, 8), scale: float = 1.0) -> list[dict]:
    """(b) forced replay: async vs sequential decoding of the same annotated answer."""
    ids = chat_prompt(tok, PROMPT)
    eng = Engine(model, tok)
    rows = []
    for k in ks:
        ans = annotated(tok, k)
        seq_cfg, par_cfg = GenerateConfig(sequential=True), GenerateConfig(reserve_scale=scale)
        eng.generate(ids, par_cfg, force=ans)  # warm up
        t_seq, t_par, res = [], [], None
        for _ in range(reps):
            t_seq.append(timed(lambda: eng.generate(ids, seq_cfg, force=ans)))
            res = eng.generate(ids, par_cfg, force=ans)
            t_par.append(res.wall_s)
        seq = eng.generate(ids, seq_cfg, force=ans)
        assert seq.text == res.text, "sequential and async replays must write the same answer"
        wall = statistics.median(t_seq) / statistics.median(t_par)
        rows.append({"chunks": k, "tokens": sum(len(t) for t in res.token_ids), "async_steps": res.decode_steps,
                     "sequential_steps": seq.decode_steps, "sequential_s": statistics.median(t_seq),
                     "async_s": statistics.median(t_par), "wall_speedup": wall,
                     "theoretical_speedup": res.theoretical_speedup,
                     "step_speedup": seq.decode_steps / res.decode_steps,
                     "efficiency": wall / res.theoretical_speedup})
    return rows


def bench_forward(model, reps: int, prefix: int = 300, ks=(1, 2, 4, 8, 16)) -> list[dict]:
    """(c) one forward pass with k query tokens after a prefix."""
    torch.manual_seed(0)
    rows = []
    kw = cache_kwarg(model)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.randint(0, 1000, (1, prefix)), **{kw: cache})
        times = {k: [] for k in ks}
        for _ in range(max(reps, 5)):
            for k in ks:  # interleaved, so drift hits every k alike
                q = torch.randint(0, 1000, (1, k))
                times[k].append(timed(lambda: model(input_ids=q, logits_to_keep=k, **{kw: cache})))
                cache.crop(-k)  # back to the prefix
    base = statistics.median(times[1])
    for k in ks:
        m = statistics.median(times[k])
        rows.append({"k": k, "ms": 1000 * m, "vs_k1": m / base})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per run in (a)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    loaded = load(args.model, args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    info = {"machine": machine(), "model": loaded.name, "dtype": args.dtype, "reps": args.reps}
    print(f"machine: {info['machine']}\nmodel: {loaded.name}, dtype {args.dtype}, median of {args.reps} runs\n")

    a = bench_vs_hf(model, tok, args.reps, args.tokens)
    print("(a) sequential decoding vs HF generate (baseline: HF generate, same run)\n")
    print("| tokens | HF generate ms/token | pastalm sequential ms/token | ratio |\n|---|---|---|---|")
    print(f"| {a['tokens']} | {a['hf_ms_per_token']:.1f} | {a['ours_ms_per_token']:.1f} | {a['ratio']:.3f} |\n")

    b = bench_forced(model, tok, args.reps)
    print("(b) forced replay, async vs sequential decoding of the same answer (baseline: sequential, same run)\n")
    print("| chunks | tokens | steps seq/async | seq s | async s | wall speedup | theoretical | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    for r in b:
        print(f"| {r['chunks']} | {r['tokens']} | {r['sequential_steps']}/{r['async_steps']} | "
              f"{r['sequential_s']:.2f} | {r['async_s']:.2f} | {r['wall_speedup']:.2f}x | "
              f"{r['theoretical_speedup']:.2f}x | {r['efficiency']:.2f} |")

    c = bench_forward(model, args.reps)
    print("\n(c) one forward pass with k query tokens after a 300-token prefix (baseline: k = 1)\n")
    print("| k | ms | vs k=1 |\n|---|---|---|")
    for r in c:
        print(f"| {r['k']} | {r['ms']:.1f} | {r['vs_k1']:.2f} |")

    out = args.out or Path(__file__).parent / "results" / f"engine-{args.dtype}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "vs_hf": a, "forced": b, "forward": c}, indent=2))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
