"""Turn layout spans into the 4D attention mask of one forward pass (training and inference share this)."""

from __future__ import annotations

import torch

from ..lang.layout import Span


def span_views(spans: list[Span], num_columns: int, columns: list | None = None) -> torch.Tensor:
    """One view row per query token, (Q, num_columns); a token's own column covers its thread up to itself.

    Column t is thread t, unless `columns` gives, per span, a map from its thread ids to columns (the shared cache
    of the batcher puts many requests' threads side by side). Python only walks each span's view once; the rows
    per token are expanded with tensor ops, since this runs at every decode step."""
    r, c, v, own, starts, counts = [], [], [], [], [], []
    for k, s in enumerate(spans):
        cmap = columns[k] if columns is not None else range(num_columns)
        for t, x in enumerate(s.view):
            if x:
                r.append(k)
                c.append(cmap[t])
                v.append(x)
        own.append(cmap[s.thread])
        starts.append(s.start)
        counts.append(len(s.positions))
    base = torch.zeros((len(spans), num_columns), dtype=torch.long)
    base[torch.tensor(r, dtype=torch.long), torch.tensor(c, dtype=torch.long)] = torch.tensor(v, dtype=torch.long)
    n = torch.tensor(counts, dtype=torch.long)
    views = base.repeat_interleave(n, dim=0)
    q = views.shape[0]
    within = torch.arange(q) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)  # index of the token in its span
    views[torch.arange(q), torch.repeat_interleave(torch.tensor(own, dtype=torch.long), n)] = (
        torch.repeat_interleave(torch.tensor(starts, dtype=torch.long), n) + within + 1)
    return views


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
