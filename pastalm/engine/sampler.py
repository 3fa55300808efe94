"""Next-token choice for one thread: greedy, or temperature + top-p with the thread's own generator."""

from __future__ import annotations

import functools

import torch


def thread_seed(seed: int, thread: int) -> int:
    """The seed of one thread's sampling: each thread's samples depend only on the request's seed and its own
    history (both backends derive their per-thread seeds from this)."""
    return (int(seed) * 1_000_003 + thread * 7_919) % (2**63 - 1)


def thread_generator(seed: int, thread: int) -> torch.Generator:
    """A generator per thread (`thread_seed`)."""
    return torch.Generator().manual_seed(thread_seed(seed, thread))


MIN_TEMPERATURE = 1e-5  # below this sampling is greedy (as vLLM does): 1 / 1e-300 overflows into NaN probabilities


@functools.lru_cache(maxsize=64)
def _index(ids: tuple[int, ...]) -> torch.Tensor:
    """Token ids as an index tensor, made once per set (a request's banned ids are one tuple)."""
    return torch.tensor(ids, dtype=torch.long)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
           banned: tuple[int, ...] = ()) -> int:
    """Pick a token from one row of logits (V,), never one of `banned`. A temperature below MIN_TEMPERATURE is
    greedy; probabilities are computed in float64, and a row that still gives no finite distribution falls back to
    greedy. `logits` is left as it is (the log-probabilities a request reports are the model's own)."""
    if temperature < MIN_TEMPERATURE:
        tok = int(torch.argmax(logits))
        if tok in banned:  # rare: only then is a masked copy of the row made
            tok = int(torch.argmax(logits.index_fill(0, _index(banned), float("-inf"))))
        return tok
    z = logits.double() / temperature  # a new tensor: masked in place
    if banned:
        z[_index(banned)] = float("-inf")
    probs = torch.softmax(z, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # NaN or inf logits
        return int(torch.argmax(z))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_info(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the k most likely tokens with theirs, under the model's own
    distribution (before temperature and top_p, as vLLM reports them by default)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    if not k:
        return float(lp[token]), []
    top = torch.topk(lp, k)
    return float(lp[token]), list(zip(top.indices.tolist(), top.values.tolist()))
