"""Load benchmark of `pasta serve`: 1, 4 and 8 concurrent clients over the evaluation prompts.

Starts the server (bundled model and its default adapter unless told otherwise) in a subprocess on 127.0.0.1,
then for each concurrency level sends the same prompts through the official `openai` client, streamed, with
that many clients at once. Per level: aggregate completion tokens per second (all tokens / wall time of the
level), p50/p95 latency and time to first token, and the ratio of aggregate throughput to the 1-client level
measured in the same run. Prints a table, writes bench/results/serve_load.json and the section of
docs/benchmarks.md between its markers.

    python bench/serve_load.py [--prompts 16] [--max-tokens 128] [--levels 1,4,8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pastalm.eval.speed import machine, stratified, timestamp  # noqa: E402
from pastalm.train.prompts import load_prompts  # noqa: E402

BEGIN, END = "<!-- serve_load:begin -->", "<!-- serve_load:end -->"


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "pastalm.cli", "serve", "--port", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    base = info["url"].rsplit("/v1", 1)[0]
    for _ in range(600):
        try:
            with urllib.request.urlopen(base + "/health", timeout=2):
                return proc, info["url"], info["serving"]
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not come up")


def one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    from openai import OpenAI

    c = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    first, usage = None, None
    for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                        max_tokens=max_tokens, stream=True, temperature=0):
        if first is None and ch.choices and ch.choices[0].delta.content:
            first = time.perf_counter()
        usage = ch.usage or usage
    t1 = time.perf_counter()
    u = usage.model_dump()
    return {"latency_s": t1 - t0, "ttft_s": (first or t1) - t0, "tokens": u["completion_tokens"],
            "threads": u.get("threads", 0), "steps": u.get("decode_steps", 0)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def level(url: str, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        rows = list(pool.map(lambda p: one(url, model, p, max_tokens), prompts))
    wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in rows)
    return {"clients": clients, "requests": len(rows), "wall_s": wall, "tokens": toks,
            "tokens_per_s": toks / wall, "latency_p50_s": statistics.median(r["latency_s"] for r in rows),
            "latency_p95_s": pct([r["latency_s"] for r in rows], 0.95),
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in rows),
            "ttft_p95_s": pct([r["ttft_s"] for r in rows], 0.95),
            "threads_mean": sum(r["threads"] for r in rows) / len(rows)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="evaluation prompts (stratified by category)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--server-args", default="", help="extra `pasta serve` flags, e.g. '--adapter none'")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args(argv)
    per_cat = max(1, -(-args.prompts // 12))
    prompts = [p["prompt"] for p in stratified(load_prompts("eval"), per_cat)][: args.prompts]
    proc, url, model = start_server(args.server_args.split())
    try:
        one(url, model, "Say hello.", 8)  # warm-up
        results = [level(url, model, prompts, int(c), args.max_tokens) for c in args.levels.split(",")]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    base = results[0]["tokens_per_s"]
    for r in results:
        r["throughput_vs_first"] = r["tokens_per_s"] / base
    info = {**machine(), "when": timestamp(), "model": model, "prompts": len(prompts),
            "max_tokens": args.max_tokens, "server_args": args.server_args}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"info": info, "levels": results}, indent=1) + "\n")
    lines = ["| clients | requests | tokens/s (aggregate) | vs 1 client | latency p50 / p95 (s) | "
             "time to first token p50 / p95 (s) | async threads / request |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['throughput_vs_first']:.2f}x | "
                     f"{r['latency_p50_s']:.1f} / {r['latency_p95_s']:.1f} | {r['ttft_p50_s']:.2f} / "
                     f"{r['ttft_p95_s']:.2f} | {r['threads_mean']:.1f} |")
    table = "\n".join(lines)
    print(table)
    section = (f"{BEGIN}\n## `pasta serve` under load\n\nWritten by `python bench/serve_load.py` ({info['when']}): "
               f"`{model}` behind `pasta serve` on {info['processor']} ({info['threads']} torch threads, torch "
               f"{info['torch']}), {len(prompts)} evaluation prompts (stratified by category), streamed, greedy, "
               f"max_tokens {args.max_tokens}; each level sends the same prompts with that many clients at once. "
               f"Aggregate tokens/s = completion tokens (tags included) / wall time of the level.\n\n{table}\n{END}")
    doc = args.doc.read_text() if args.doc.exists() else "# Benchmarks\n"
    if BEGIN in doc:
        doc = doc[: doc.index(BEGIN)] + section + doc[doc.index(END) + len(END):]
    else:
        doc = doc.rstrip() + "\n\n" + section + "\n"
    args.doc.write_text(doc)
    print(f"wrote {args.json} and {args.doc}")


if __name__ == "__main__":
    main()
