"""Speed of a PASTA model decoding asynchronously against a baseline model decoding sequentially.

Both run in the same process, prompt by prompt, alternating which goes first, so that drift in the machine's
speed hits both alike (docs/spec.md section 7). Per prompt:
- theoretical speedup: the PASTA generation's tokens / its critical path (tags included);
- wall-clock speedup: baseline time / PASTA time, for each one's own answer;
- throughput-normalized speedup: PASTA rendered tokens per second / baseline tokens per second, so that a
  shorter answer does not count as a faster one.
Aggregates are geometric means over prompts.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..engine import Engine, GenerateConfig
from ..lang.render import validate
from ..models import chat_prompt


def geomean(xs) -> float:
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def paired_bootstrap(ref_wall: list[float], wall: list[float], ref_quality: list[float], quality: list[float],
                     n_boot: int = 2000, seed: int = 0) -> dict:
    """Compare a mode with a reference on the same prompts (lists aligned by prompt): the wall-clock ratio
    (geometric mean over prompts of ref time / mode time; above 1 is faster) and the mean quality difference,
    each with a 95% percentile bootstrap interval. Prompts are resampled as pairs, so prompt difficulty cancels."""
    import random

    n = len(wall)
    if not n or not (len(ref_wall) == len(ref_quality) == len(quality) == n):
        raise ValueError("paired_bootstrap needs non-empty lists of equal length, one entry per prompt")
    ratio = [r / w for r, w in zip(ref_wall, wall)]
    diff = [q - r for r, q in zip(ref_quality, quality)]
    rng = random.Random(seed)
    boot_r, boot_q, boot_qr = [], [], []
    for _ in range(n_boot):
        pick = [rng.randrange(n) for _ in range(n)]
        boot_r.append(geomean([ratio[k] for k in pick]))
        boot_q.append(sum(diff[k] for k in pick) / n)
        ref_sum = sum(ref_quality[k] for k in pick)
        boot_qr.append(sum(quality[k] for k in pick) / ref_sum if ref_sum > 0 else float("nan"))
    boot_r.sort()
    boot_q.sort()
    boot_qr = sorted(x for x in boot_qr if x == x) or [float("nan")]
    lo, hi = int(0.025 * n_boot), int(0.975 * n_boot) - 1
    qlo, qhi = int(0.025 * len(boot_qr)), max(0, int(0.975 * len(boot_qr)) - 1)
    ref_mean = sum(ref_quality) / n
    return {"prompts": n, "speed_ratio": geomean(ratio), "speed_ratio_ci": [boot_r[lo], boot_r[hi]],
            "quality_diff": sum(diff) / n, "quality_diff_ci": [boot_q[lo], boot_q[hi]],
            "quality_ratio": (sum(quality) / n) / ref_mean if ref_mean > 0 else float("nan"),
            "quality_ratio_ci": [boot_qr[qlo], boot_qr[qhi]]}


def validity(raw: str, threads: int) -> dict:
    """`valid_promise`: a promise parsed and forked a thread; `valid_raw`: the whole annotated answer validates
    (an answer cut by max_new_tokens inside a tag does not)."""
    rep = validate(raw)
    return {"valid_promise": rep.promises > 0 and threads > 0, "valid_raw": rep.ok}


def machine() -> dict:
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


def compare(pasta: Engine, baseline: Engine, prompts: list[dict], config: GenerateConfig,
            system: str | None = None, progress: bool = True) -> list[dict]:
    """One record per prompt with both generations' measures."""
    seq = replace(config, sequential=True)
    ids0 = chat_prompt(pasta.tokenizer, "Say hello.", system)
    pasta.generate(ids0, replace(config, max_new_tokens=8))  # warm-up, not measured
    baseline.generate(ids0, replace(seq, max_new_tokens=8))
    out = []
    for i, p in enumerate(tqdm(prompts, desc="eval", unit="prompt", disable=not progress)):
        ids = chat_prompt(pasta.tokenizer, p["prompt"], system)
        runs = [("pasta", pasta, config), ("baseline", baseline, seq)]
        res = {}
        for name, eng, cfg in (runs if i % 2 == 0 else runs[::-1]):
            res[name] = eng.generate(ids, cfg)
        a, b = res["pasta"], res["baseline"]
        out.append({
            "id": p.get("id"), "prompt": p["prompt"], "category": p.get("category"), "parallel": p.get("parallel"),
            "pasta": a.to_json(), "baseline": b.to_json(),
            "forked": a.threads > 0, **validity(a.raw, a.threads),
            "theoretical_speedup": a.theoretical_speedup,
            "wall_speedup": b.wall_s / a.wall_s,
            "throughput_speedup": (a.tokens / a.wall_s) / (b.tokens / b.wall_s) if a.tokens and b.tokens else None,
        })
    return out


def summarize(records: list[dict]) -> dict:
    """Aggregates of a set of records (see the module docstring)."""
    n = len(records)
    if not n:
        return {"prompts": 0}
    tp = [r["throughput_speedup"] for r in records if r["throughput_speedup"]]
    return {
        "prompts": n,
        "with_valid_promise": sum(r["valid_promise"] for r in records) / n,
        "forked": sum(r["forked"] for r in records) / n,
        "valid_raw": sum(r["valid_raw"] for r in records) / n,
        "mean_async_threads": sum(r["pasta"]["threads"] for r in records) / n,
        "theoretical_speedup_gmean": geomean(r["theoretical_speedup"] for r in records),
        "wall_speedup_gmean": geomean(r["wall_speedup"] for r in records),
        "throughput_speedup_gmean": geomean(tp),
        "pasta_tokens_mean": sum(r["pasta"]["tokens"] for r in records) / n,
        "pasta_tag_tokens_mean": sum(r["pasta"]["tag_tokens"] for r in records) / n,
        "baseline_tokens_mean": sum(r["baseline"]["tokens"] for r in records) / n,
        "pasta_limits_hit": sum(bool(r["pasta"]["limits_hit"]) for r in records),
        "baseline_limits_hit": sum(bool(r["baseline"]["limits_hit"]) for r in records),
    }


def stratified(prompts: list[dict], per_category: int | None) -> list[dict]:
    """The first `per_category` prompts of each category (in file order); all when None."""
    if per_category is None:
        return list(prompts)
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        c = p.get("category", "")
        if seen.get(c, 0) < per_category:
            seen[c] = seen.get(c, 0) + 1
            out.append(p)
    return out


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
