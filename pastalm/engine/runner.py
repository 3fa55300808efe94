"""One batched forward pass over an interleaved KV cache shared by every thread of every request (any HF
causal LM).

Every token of every thread is appended to one cache exactly once, in the order the engine feeds them.
A step feeds the pending tokens of each live thread together: explicit position ids and a 4D mask built from
the layout's views decide who sees what, so nothing is copied at a fork or recomputed at a sync. Each request's
threads have columns of their own in the views, so no query ever sees another request's slots.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from .interpreter import Feed
from .mask import additive_mask, span_views, visibility


def cache_kwarg(model) -> str:
    """Name of the forward's KV-cache argument: newer transformers call it `cache`, older `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SharedCache:
    """The KV cache all requests share, and the forward over it."""

    def __init__(self, model):
        self.model = model
        self.dtype = model.dtype
        self.cache = DynamicCache(config=model.config)
        self.slot_column = torch.empty(0, dtype=torch.long)  # (T,) global column of each slot's thread
        self.slot_index = torch.empty(0, dtype=torch.long)  # (T,) index of the slot's token in its thread
        self.num_columns = 0
        self._cache_kw = cache_kwarg(model)

    def column(self, req, thread: int) -> int:
        if thread not in req.columns:
            req.columns[thread] = self.num_columns
            self.num_columns += 1
        return req.columns[thread]

    @torch.inference_mode()
    def forward(self, feeds: list[tuple[object, Feed]]) -> torch.Tensor:
        """Append every feed's tokens; return logits (len(feeds), V) at each feed's last token."""
        for req, f in feeds:  # every column first, so that all view rows have the same width
            for t in range(len(f.span.view)):
                self.column(req, t)
            self.column(req, f.thread)
        ids, positions, cols, index, last = [], [], [], [], []
        for req, f in feeds:
            ids += f.ids
            positions += f.span.positions
            cols += [req.columns[f.thread]] * len(f.ids)
            index += range(f.span.start, f.span.start + len(f.ids))
            last.append(len(ids) - 1)
        # each request's threads sit in its own columns of the shared view matrix (Q, columns)
        views = span_views([f.span for _, f in feeds], self.num_columns, [req.columns for req, _ in feeds])
        self.slot_column = torch.cat([self.slot_column, torch.tensor(cols, dtype=torch.long)])
        self.slot_index = torch.cat([self.slot_index, torch.tensor(index, dtype=torch.long)])
        mask = additive_mask(visibility(views, self.slot_column, self.slot_index), self.dtype)
        dev = self.model.device  # the bookkeeping stays on the CPU; the model may be on a GPU (PASTA_DEVICE)
        out = self.model(
            input_ids=torch.tensor([ids], device=dev),
            position_ids=torch.tensor([positions], device=dev),
            attention_mask=mask.to(dev),
            **{self._cache_kw: self.cache},
            use_cache=True,
            logits_to_keep=torch.tensor(last, device=dev),
        )
        return out.logits[0].cpu()  # sampling uses CPU generators (seeded per thread)

    @property
    def num_slots(self) -> int:
        return int(self.slot_column.numel())

    def compact(self, live: list) -> int:
        """Drop the slots of every request not in `live`, renumber the columns; return the slots dropped."""
        keep_cols = sorted(c for r in live for c in r.columns.values())
        remap = torch.full((max(self.num_columns, 1),), -1, dtype=torch.long)
        remap[torch.tensor(keep_cols, dtype=torch.long)] = torch.arange(len(keep_cols))
        keep = remap[self.slot_column] >= 0 if self.num_slots else torch.zeros(0, dtype=torch.bool)
        dropped = int((~keep).sum())
        if dropped:
            where = keep.nonzero().squeeze(1)
            for layer in self.cache.layers:
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    w = where.to(layer.keys.device)
                    layer.keys = layer.keys.index_select(-2, w)
                    layer.values = layer.values.index_select(-2, w)
            self.slot_column = remap[self.slot_column[where]]
            self.slot_index = self.slot_index[where]
        for r in live:
            r.columns = {t: int(remap[c]) for t, c in r.columns.items()}
        self.num_columns = len(keep_cols)
        return dropped
