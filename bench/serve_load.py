"""Load benchmark of `pasta serve`: 1, 4 and 8 concurrent clients over the evaluation prompts.

Starts the server (bundled model and its default adapter unless told otherwise) in a subprocess on 127.0.0.1,
then for each concurrency level sends the same prompts through the official `openai` client, streamed, with
that many clients at once. Per level: aggregate completion tokens per second (all tokens / wall time of the
level), p50/p95 latency and time to first token, and the ratio of aggregate throughput to the 1-client level
measured in the same run. Prints a table, writes bench/results/serve_load.json and the section of
docs/benchmarks.md between its markers.

    python bench/serve_load.py [--prompts 16] [--max-tokens 128] [--levels 1,4,8]

With --backends hf,vllm (run it with the vLLM environment's python: `.venv-vllm/bin/python bench/serve_load.py
--backends hf,vllm`), it instead starts one server per backend in turn (the same model, adapter and layout: linear,
which both decode) and measures --clients concurrent streamed clients on each: aggregate *rendered* tokens per second
(the streamed text, tokenized; tags never reach a client), the ratio to the first backend, and, after the level,
that disconnects free everything: that many clients open a stream, read a few chunks and hang up, and the time until
/health shows no running request and, on vLLM, vLLM's own running and waiting counts at 0.
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
    first, usage, text = None, None, []
    for ch in c.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                        max_tokens=max_tokens, stream=True, temperature=0):
        if first is None and ch.choices and ch.choices[0].delta.content:
            first = time.perf_counter()
        if ch.choices and ch.choices[0].delta.content:
            text.append(ch.choices[0].delta.content)
        usage = ch.usage or usage
    t1 = time.perf_counter()
    u = usage.model_dump()
    return {"latency_s": t1 - t0, "ttft_s": (first or t1) - t0, "tokens": u["completion_tokens"], "text": "".join(text),
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
    return {"texts": [r["text"] for r in rows], "clients": clients, "requests": len(rows), "wall_s": wall, "tokens": toks,
            "tokens_per_s": toks / wall, "latency_p50_s": statistics.median(r["latency_s"] for r in rows),
            "latency_p95_s": pct([r["latency_s"] for r in rows], 0.95),
            "ttft_p50_s": statistics.median(r["ttft_s"] for r in rows),
            "ttft_p95_s": pct([r["ttft_s"] for r in rows], 0.95),
            "threads_mean": sum(r["threads"] for r in rows) / len(rows)}


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        return json.loads(r.read())


def disconnects(url: str, model: str, clients: int) -> float:
    """`clients` streams opened at once, each closed after 3 chunks; seconds until the server holds nothing."""
    from openai import OpenAI

    def drop(i: int) -> None:
        c = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
        s = c.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Write story {i}."}],
                                      max_tokens=400, stream=True, extra_body={"ignore_eos": True})
        for k, _ in enumerate(s):
            if k == 3:
                break
        s.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(drop, range(clients)))
    t0 = time.perf_counter()
    base = url.rsplit("/v1", 1)[0]
    while True:
        h = health(base)
        if h["running"] == 0 and h["queued"] == 0 and h.get("vllm_running", 0) == 0 and h.get("vllm_waiting", 0) == 0:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > 120:
            raise RuntimeError(f"disconnected requests still held after 120 s: {h}")
        time.sleep(0.05)


def compare_backends(args, prompts: list[str]) -> None:
    from pastalm.models import load_tokenizer

    tok = load_tokenizer()
    rows = []
    for backend in args.backends.split(","):
        proc, url, model = start_server(["--backend", backend, "--layout", "linear", *args.server_args.split()])
        try:
            one(url, model, "Say hello.", 8)  # warm-up
            one(url, model, "Give two tips to stay focused.", args.max_tokens)
            r = level(url, model, prompts, args.clients, args.max_tokens)
            r["rendered_tokens"] = sum(len(tok.encode(x, add_special_tokens=False)) for x in r.pop("texts"))
            r["rendered_per_s"] = r["rendered_tokens"] / r["wall_s"]
            r["freed_after_disconnects_s"] = disconnects(url, model, args.clients)
            r["health_after"] = health(url.rsplit("/v1", 1)[0])
            r["backend"] = backend
            rows.append(r)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    for r in rows:
        r["vs_first"] = r["rendered_per_s"] / rows[0]["rendered_per_s"]
    info = {**machine(), "when": timestamp(), "prompts": len(prompts), "clients": args.clients,
            "max_tokens": args.max_tokens, "server_args": args.server_args}
    out = args.json.with_name("serve_backends.json")
    out.write_text(json.dumps({"info": info, "backends": rows}, indent=1) + "\n")
    lines = [f"| backend | clients | requests | rendered tok/s (aggregate) | vs {rows[0]['backend']} | latency p50 / p95 (s) "
             "| first token p50 / p95 (s) | threads / request | all freed after disconnects (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['clients']} | {r['requests']} | {r['rendered_per_s']:.1f} | "
                     f"{r['vs_first']:.2f}x | {r['latency_p50_s']:.1f} / {r['latency_p95_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | {r['threads_mean']:.1f} | "
                     f"{r['freed_after_disconnects_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.doc is not None:
        b, e = "<!-- serve_backends:begin -->", "<!-- serve_backends:end -->"
        section = (f"{b}\nWritten by `.venv-vllm/bin/python bench/serve_load.py --backends {args.backends} --clients "
                   f"{args.clients} --prompts {len(prompts)} --max-tokens {args.max_tokens}` ({info['when']}, "
                   f"{info['processor']}, torch {info['torch']}): `pasta serve --backend B --layout linear` with the "
                   f"bundled model and shipped adapter, {len(prompts)} eval prompts streamed by {args.clients} clients "
                   f"at once, greedy.\n\n{table}\n{e}")
        doc = args.doc.read_text()
        doc = doc[: doc.index(b)] + section + doc[doc.index(e) + len(e):] if b in doc else doc.rstrip() + "\n\n" + section + "\n"
        args.doc.write_text(doc)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16, help="evaluation prompts (stratified by category)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--server-args", default="", help="extra `pasta serve` flags, e.g. '--adapter none'")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "serve_load.json")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--backends", help="compare these backends instead (e.g. hf,vllm; see above)")
    ap.add_argument("--clients", type=int, default=8, help="with --backends: concurrent clients")
    args = ap.parse_args(argv)
    per_cat = max(1, -(-args.prompts // 12))
    prompts = [p["prompt"] for p in stratified(load_prompts("eval"), per_cat)][: args.prompts]
    if args.backends:
        return compare_backends(args, prompts)
    proc, url, model = start_server(args.server_args.split())
    try:
        one(url, model, "Say hello.", 8)  # warm-up
        results = [level(url, model, prompts, int(c), args.max_tokens) for c in args.levels.split(",")]
        for r in results:
            r.pop("texts")
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
