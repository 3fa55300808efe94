"""`pasta`: the command line. `pasta generate PROMPT` answers with asynchronous decoding on the bundled model."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _int_at_least(low: int):
    """argparse type: an integer >= low."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return n

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _nonneg_float(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v!r}")
    return x


def _probability(v: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        x = float(v)
    except ValueError:
        x = -1.0
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v!r}")
    return x


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pasta", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer prompts with asynchronous (PASTA) decoding")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' reads it from stdin")
    g.add_argument("--prompts", type=Path, help="answer many prompts: JSONL with a 'prompt' field, or one per line")
    g.add_argument("--model", help="HF model folder, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weights and compute dtype")
    g.add_argument("--system", help="system message for the chat template")
    g.add_argument("--sequential", action="store_true", help="turn async decoding off (the baseline)")
    g.add_argument("--force", type=Path, help="replay the annotated answer in this file instead of sampling")
    g.add_argument("--raw", action="store_true", help="print the annotated (serialized) form")
    g.add_argument("--stream", action="store_true", help="print the answer as it is decoded, in reading order")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt with text and measures")
    g.add_argument("--max-new-tokens", type=_positive_int, default=512)
    g.add_argument("--max-threads", type=_nonneg_int, default=8, help="live async threads (0: all inline)")
    g.add_argument("--async-factor", type=_nonneg_float, default=2.0,
                   help="an async block may write this many times its promised tokens")
    g.add_argument("--async-cap", type=_positive_int, default=512, help="hard cap on one async block's tokens")
    g.add_argument("--max-context", type=_positive_int, help="cache slots per request (default: the model's)")
    g.add_argument("--reserve-scale", type=_nonneg_float, default=1.0,
                   help="positions reserved per block: ceil(scale * tokens) + tag overhead; 0 reserves none")
    g.add_argument("--temperature", type=_nonneg_float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=_probability, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    return p


def read_prompts(args) -> list[str]:
    """The prompts to answer, from the argument, stdin, or --prompts."""
    if args.prompts is not None:
        if args.prompt is not None:
            raise ValueError("give either a PROMPT or --prompts FILE, not both")
        if not args.prompts.is_file():
            raise ValueError(f"--prompts: no such file '{args.prompts}'")
        prompts = []
        for n, line in enumerate(args.prompts.read_text().splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--prompts: line {n} is not valid JSON ({e.msg})") from None
                if not isinstance(obj.get("prompt"), str):
                    raise ValueError(f"--prompts: line {n} has no string 'prompt' field")
                prompts.append(obj["prompt"])
            else:
                prompts.append(line)
        if not prompts:
            raise ValueError(f"--prompts: '{args.prompts}' holds no prompt")
        return prompts
    if args.prompt is None:
        raise ValueError("no prompt; give PROMPT, '-' to read stdin, or --prompts FILE")
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text.strip():
        raise ValueError("the prompt is empty; give some text")
    return [text]


def generate(args) -> int:
    from .engine import Engine, GenerateConfig
    from .models import chat_prompt, load

    prompts = read_prompts(args)
    force = None
    if args.force is not None:
        if not args.force.is_file():
            raise ValueError(f"--force: no such file '{args.force}'")
        force = args.force.read_text()
    cfg = GenerateConfig(
        max_new_tokens=args.max_new_tokens, async_factor=args.async_factor, async_cap=args.async_cap,
        max_threads=args.max_threads, max_context=args.max_context, reserve_scale=args.reserve_scale,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, sequential=args.sequential)
    loaded = load(args.model, args.dtype)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.name)
    for prompt in prompts:
        ids = chat_prompt(loaded.tokenizer, prompt, args.system)
        on_text = None
        if args.stream and not args.json and not args.raw:
            on_text = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
        res = engine.generate(ids, cfg, force=force, on_text=on_text)
        if args.json:
            d = res.to_json()
            d["dtype"] = loaded.dtype
            print(json.dumps(d, ensure_ascii=False), flush=True)
            continue
        if on_text is None:
            print(res.raw if args.raw else res.text, flush=True)
        else:
            print(flush=True)
        print(f"[{res.mode}] {res.tokens} tokens + {res.tag_tokens} tag tokens, {res.threads} threads, "
              f"{res.decode_steps} steps, theoretical speedup {res.theoretical_speedup:.2f}x, {res.wall_s:.2f} s"
              + (f", limits hit: {', '.join(res.limits_hit)}" if res.limits_hit else ""), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here by default; HF_HUB_OFFLINE=0 opts back in
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .models import ModelError

    try:
        if args.command == "generate":
            return generate(args)
    except (ModelError, ValueError) as e:
        print(f"pasta: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
