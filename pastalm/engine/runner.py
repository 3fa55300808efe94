"""One batched forward pass over a request's interleaved KV cache (any HF causal LM).

Every token of every thread is appended to one cache exactly once, in the order the engine feeds them.
A step feeds the pending tokens of each live thread together: explicit position ids and a 4D mask built from
the layout's views decide who sees what, so nothing is copied at a fork or recomputed at a sync.
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


class HFRunner:
    """The KV cache of one request and the forward over it; returns the last logits of each feed."""

    def __init__(self, model):
        self.model = model
        self.dtype = model.dtype
        self.cache = DynamicCache(config=model.config)
        self.slot_thread = torch.empty(0, dtype=torch.long)  # (T,) thread of each cache slot
        self.slot_index = torch.empty(0, dtype=torch.long)  # (T,) index of the slot's token in its thread
        self._cache_kw = cache_kwarg(model)

    @torch.inference_mode()
    def forward(self, feeds: list[Feed], num_threads: int) -> torch.Tensor:
        """Append every feed's tokens to the cache; return logits (len(feeds), V) at each feed's last token."""
        ids, positions, threads, index, last = [], [], [], [], []
        for f in feeds:
            ids += f.ids
            positions += f.span.positions
            threads += [f.thread] * len(f.ids)
            index += range(f.span.start, f.span.start + len(f.ids))
            last.append(len(ids) - 1)
        self.slot_thread = torch.cat([self.slot_thread, torch.tensor(threads)])
        self.slot_index = torch.cat([self.slot_index, torch.tensor(index)])
        views = span_views([f.span for f in feeds], num_threads)  # (Q, num_threads)
        mask = additive_mask(visibility(views, self.slot_thread, self.slot_index), self.dtype)  # (1, 1, Q, T)
        out = self.model(
            input_ids=torch.tensor([ids]),
            position_ids=torch.tensor([positions]),
            attention_mask=mask,
            **{self._cache_kw: self.cache},
            use_cache=True,
            logits_to_keep=torch.tensor(last),
        )
        return out.logits[0]  # (len(feeds), V)
