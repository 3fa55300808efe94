"""Turn layout spans into the 4D attention mask of one forward pass (training and inference share this)."""

from __future__ import annotations

import torch

from ..lang.layout import Span


def span_views(spans: list[Span], num_threads: int) -> torch.Tensor:
    """One view row per query token, (Q, num_threads); a token's own column covers its thread up to itself."""
    rows = []
    for s in spans:
        base = list(s.view) + [0] * (num_threads - len(s.view))
        for i in range(len(s.positions)):
            row = list(base)
            row[s.thread] = s.start + i + 1
            rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


def visibility(views: torch.Tensor, slot_thread: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    """Boolean (Q, T): query q may attend to cache slot x iff slot_index[x] < views[q, slot_thread[x]]."""
    q = views.shape[0]
    limit = views.gather(1, slot_thread.unsqueeze(0).expand(q, -1))  # (Q, T)
    return slot_index.unsqueeze(0) < limit


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Q, T) booleans -> (1, 1, Q, T) additive float mask (0 where allowed, dtype min elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]  # (B=1, heads=1, Q, T)
