"""Base answers: the base model's own greedy answers to the training prompts, cached as JSONL.

Answers are generated in padded batches with HF `generate` (left padding, greedy), which on 2 CPU cores is
about an order of magnitude more tokens per second than one request at a time. The cache is resumable: a
rerun skips prompt ids already in the output file. Prompts are taken round-robin over categories, so that any
prefix of the run (an interrupted or time-boxed one) is a balanced sample.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import chat_prompt
from .io import append_jsonl, read_jsonl


def done_ids(path: Path) -> set[str]:
    if not path.exists():
        return set()
    return {r["id"] for r in read_jsonl(path, required={"id": str, "answer": str})}


@torch.inference_mode()
def answer_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, system: str | None = None,
                 repetition_penalty: float = 1.0):
    """Greedy answers to a batch of prompts; returns [(text, n_tokens, hit_limit)]."""
    ids = [chat_prompt(tokenizer, p, system) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    out = model.generate(input_ids=input_ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, repetition_penalty=repetition_penalty)
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or []) | {tokenizer.eos_token_id}
    res = []
    for row in out[:, width:].tolist():
        n = next((i for i, t in enumerate(row) if t in eos), None)
        hit = n is None
        toks = row if hit else row[:n]
        res.append((tokenizer.decode(toks, skip_special_tokens=True), len(toks), hit))
    return res


def generate_answers(model, tokenizer, prompts: list[dict], out: Path, batch_size: int = 16,
                     max_new_tokens: int = 320, system: str | None = None,
                     repetition_penalty: float = 1.1) -> dict:
    """Answer every prompt not yet in `out`, appending records as batches finish. Returns counts and time."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    have = done_ids(out)
    todo = [p for p in prompts if p["id"] not in have]
    by_cat: dict[str, list[dict]] = {}
    for p in todo:
        by_cat.setdefault(p.get("category", ""), []).append(p)
    queues = [sorted(v, key=lambda p: p["id"]) for _, v in sorted(by_cat.items())]
    todo = [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]
    t0 = time.perf_counter()
    tokens = hits = 0
    with tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="base answers", unit="prompt") as bar:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            for rec, (text, n, hit) in zip(batch, answer_batch(model, tokenizer, [p["prompt"] for p in batch],
                                                                max_new_tokens, system, repetition_penalty)):
                append_jsonl(out, {**rec, "answer": text, "answer_tokens": n, "hit_limit": hit})
                tokens += n
                hits += hit
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
    return {"answered": len(todo), "skipped": len(prompts) - len(todo), "tokens": tokens, "hit_limit": hits,
            "seconds": time.perf_counter() - t0}
