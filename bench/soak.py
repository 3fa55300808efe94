"""Soak test of `pasta serve`: many mixed requests at a fixed concurrency, then what the server did with them.

Starts the server itself (bundled model unless told otherwise, or `--model FOLDER`) so that it can read the server
process's memory, warms it up, then sends `--requests` requests from `--concurrency` clients at once, drawn in a
fixed, seeded mix:

- normal (non-streamed) and streamed chat requests: the innocent ones, which must all succeed;
- cancelled streams (read a few chunks, hang up) and disconnected non-streamed requests (send, hang up);
- malformed requests (bad JSON, wrong types, unknown model): each must get a 4xx JSON error;
- long prompts (`--long-tokens`, 4k by default): while one is in flight, the time to first token of short
  streamed requests is recorded separately.

Reports 5xx answers, failed innocent requests, malformed requests not answered with a 4xx JSON object, RSS after
warm-up (one pass of the whole mix) and after the soak (and their ratio, and the RSS every 5 s during the soak), p50/p95 time to first token of short requests alone and while a long
prompt is being prefilled, and the server's counts at the end (nothing running, no cache held). Prints a table and
writes bench/results/soak.json.

    python bench/soak.py [--requests 1000] [--concurrency 16] [--max-tokens 16] [--model FOLDER --dtype fp32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.serve_load import start_server  # noqa: E402
from pastalm.eval.speed import machine, timestamp  # noqa: E402

KINDS = {"normal": 30, "stream": 30, "cancel": 10, "disconnect": 10, "malformed": 15, "long": 5}
SHORT = ["Give three tips to sleep better.", "Name two fruits.", "What is 2 + 2?", "List three colours.",
         "Compare cats and dogs.", "Write a haiku about rain."]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def raw_post(base: str, path: str, body: bytes, hang_up_after: float | None = None) -> tuple[int, bytes]:
    """POST over a plain connection; with `hang_up_after`, close it after that many seconds without reading."""
    from urllib.parse import urlsplit

    u = urlsplit(base)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await writer.drain()
    if hang_up_after is not None:
        await asyncio.sleep(hang_up_after)
        writer.close()
        return 0, b""
    data = await reader.read()
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


async def run(args) -> dict:
    from openai import APIStatusError, AsyncOpenAI

    proc, url, model = start_server(args.server_args)
    base = url.rsplit("/v1", 1)[0]
    stats = {k: 0 for k in ("sent", "5xx", "innocent_failed", "malformed_not_4xx", "ok")}
    ttft_alone, ttft_long, failures = [], [], []
    long_in_flight = 0
    rng = random.Random(args.seed)
    long_prompt = " ".join(["word"] * args.long_tokens)
    client = AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    msgs = lambda p: [{"role": "user", "content": p}]  # noqa: E731

    async def stream(prompt: str, hang_up_after: int | None = None, **extra) -> float | None:
        t0, first, n = time.perf_counter(), None, 0
        s = await client.chat.completions.create(model=model, messages=msgs(prompt), max_tokens=args.max_tokens,
                                                 stream=True, **extra)
        async for ch in s:
            if first is None and ch.choices and ch.choices[0].delta.content:
                first = time.perf_counter() - t0
            n += 1
            if hang_up_after is not None and n >= hang_up_after:
                await s.close()
                break
        return first

    async def one(kind: str) -> None:
        nonlocal long_in_flight
        stats["sent"] += 1
        prompt = rng.choice(SHORT)
        status = 200
        try:
            if kind == "normal":
                await client.chat.completions.create(model=model, messages=msgs(prompt), max_tokens=args.max_tokens)
            elif kind == "stream":
                during_long = long_in_flight > 0
                first = await stream(prompt)
                if first is not None:
                    (ttft_long if during_long else ttft_alone).append(first)
            elif kind == "cancel":
                await stream(prompt, 2, extra_body={"ignore_eos": True})
            elif kind == "disconnect":
                body = json.dumps({"model": model, "messages": msgs(prompt), "max_tokens": args.max_tokens * 8,
                                   "ignore_eos": True}).encode()
                await raw_post(base, "/v1/chat/completions", body, hang_up_after=0.3)
            elif kind == "malformed":
                bad = rng.choice([b"{not json", json.dumps({"model": model, "messages": "hi"}).encode(),
                                  json.dumps({"model": model, "messages": msgs(prompt), "max_tokens": -3}).encode(),
                                  json.dumps({"model": "nope", "messages": msgs(prompt)}).encode(),
                                  b'{"model": "x", "messages": [{"role": "user", "content": "\\ud800"}]}'])
                status, body = await raw_post(base, "/v1/chat/completions", bad)
                try:
                    is_json_error = "error" in json.loads(body)
                except ValueError:
                    is_json_error = False
                if not (400 <= status < 500 and is_json_error):
                    stats["malformed_not_4xx"] += 1
            elif kind == "long":
                long_in_flight += 1
                try:
                    await client.chat.completions.create(model=model, messages=msgs(long_prompt), max_tokens=4)
                finally:
                    long_in_flight -= 1
        except APIStatusError as e:
            status = e.status_code
            failures.append(f"{kind}: {status} {e.message[:200]}")
        except Exception as e:  # noqa: BLE001 - a broken connection counts as a failure
            status = -1
            failures.append(f"{kind}: {type(e).__name__}: {str(e)[:200]}")
        stats["5xx"] += status >= 500
        if kind in ("normal", "stream", "long") and status != 200:
            stats["innocent_failed"] += 1
        elif status == 200:
            stats["ok"] += 1

    async def worker(queue: list[str]) -> None:
        while queue:
            await one(queue.pop())

    # warm-up: one pass of the whole mix (long prompts included), so that "after warm-up" is a server that has
    # seen every kind of request; its answers count like the soak's
    mix = [k for k, w in KINDS.items() for _ in range(w)]
    warm = rng.sample(mix, len(mix))
    await asyncio.gather(*(worker(warm) for _ in range(args.concurrency)))
    await asyncio.sleep(2)
    rss_warm = rss_mib(proc.pid)
    todo = [rng.choice(mix) for _ in range(args.requests)]
    samples: list[float] = []

    async def watch() -> None:  # the server's RSS every 5 s during the soak
        while True:
            samples.append(rss_mib(proc.pid))
            await asyncio.sleep(5)

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(todo) for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    watcher.cancel()
    await asyncio.sleep(2)
    import urllib.request

    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        health = json.loads(r.read())
    rss_end = rss_mib(proc.pid)
    await client.close()
    proc.terminate()
    proc.wait(timeout=30)
    return {"machine": machine(), "when": timestamp(), "args": dict(vars(args)), **stats,
            "wall_s": round(wall, 1), "rss_after_warmup_mib": round(rss_warm, 1),
            "rss_after_soak_mib": round(rss_end, 1), "rss_ratio": round(rss_end / rss_warm, 3),
            "rss_peak_during_soak_mib": round(max(samples), 1) if samples else None,
            "rss_at_quarters_of_soak_mib": [round(samples[int(q * (len(samples) - 1))], 1)
                                              for q in (0.25, 0.5, 0.75, 1.0)] if samples else None,
            "ttft_short_p50_s": pct(ttft_alone, 0.5), "ttft_short_p95_s": pct(ttft_alone, 0.95),
            "ttft_short_during_long_p50_s": pct(ttft_long, 0.5), "ttft_short_during_long_p95_s": pct(ttft_long, 0.95),
            "short_streams_during_long": len(ttft_long),
            "end_running": health.get("running"), "end_queued": health.get("queued"),
            "end_cache_slots": health.get("cache_slots"), "failures": failures[:20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--long-tokens", type=int, default=4000, help="words in a long prompt (about one token each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "soak.json")
    args, server_args = ap.parse_known_args()
    args.server_args = server_args + ["--max-prompt-tokens", str(4 * args.long_tokens + 100)]  # any tokenizer
    res = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in res["args"].items()}
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    for k, v in res.items():
        if k not in ("machine", "args"):
            print(f"{k:32} {v}")


if __name__ == "__main__":
    main()
