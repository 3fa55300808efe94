"""The transformers runner: one batched forward pass over an interleaved KV cache shared by every thread of every
request (any HF causal LM), then sampling with each thread's own generator.

Every token of every thread is appended to one cache exactly once, in the order the engine feeds them.
A step feeds the pending tokens of each live thread together: explicit position ids and a 4D mask built from
the layout's views decide who sees what, so nothing is copied at a fork or recomputed at a sync (in the reserve
layout; the linear layout's sync feeds the re-laid history into a new column). Each request's columns are
columns of their own in the views, so no query ever sees another request's slots. Requests join and leave between
steps; the slots of a finished or cancelled request are dropped from the cache once they make up most of it.
"""

from __future__ import annotations

import ctypes
import inspect

import torch
from transformers import DynamicCache

from .interpreter import Feed
from .mask import additive_mask, span_views, visibility
from .sampler import sample, thread_generator, token_info


def cache_kwarg(model) -> str:
    """Name of the forward's KV-cache argument: newer transformers call it `cache`, older `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SharedCache:
    """The KV cache all requests share, and the forward over it."""

    def __init__(self, model):
        self.model = model
        self.dtype = model.dtype
        self.cache = DynamicCache(config=model.config)
        self.slot_column = torch.empty(0, dtype=torch.long)  # (T,) global column of each slot
        self.slot_index = torch.empty(0, dtype=torch.long)  # (T,) index of the slot in its column
        self.num_columns = 0
        self._cache_kw = cache_kwarg(model)

    def column(self, req, col: int) -> int:
        if col not in req.columns:
            req.columns[col] = self.num_columns
            self.num_columns += 1
        return req.columns[col]

    @torch.inference_mode()
    def forward(self, feeds: list[tuple[object, Feed]]) -> torch.Tensor:
        """Append every feed's tokens; return logits (len(feeds), V) at each feed's last token."""
        for req, f in feeds:  # every column first, so that all view rows have the same width
            for c in range(len(f.span.view)):
                self.column(req, c)
        ids, positions, cols, index, last = [], [], [], [], []
        for req, f in feeds:
            ids += f.ids
            positions += f.span.positions
            cols += [req.columns[f.span.thread]] * len(f.ids)
            index += range(f.span.start, f.span.start + len(f.ids))
            last.append(len(ids) - 1)
        # each request's columns sit in columns of their own in the shared view matrix (Q, columns)
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


TRIM_SLOTS = 1024  # dropping this many cache slots at once hands the freed memory back (`trim_memory`)


def trim_memory() -> None:
    """Give free heap memory back to the system (glibc's malloc_trim; a no-op elsewhere). The KV cache grows by
    reallocation each step, so a burst of long prompts leaves freed blocks behind that glibc would otherwise keep:
    the server's resident memory then stays at its peak (docs/serving.md, "Soak")."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def choose(req, f, logits, chosen: dict) -> None:
    """After a forward: keep the feed's last logits where the request records them, and choose the token of a thread
    that wants one (greedy, or sampled with the thread's seeded generator) into `chosen`. Shared by the runners that
    compute logits themselves (transformers, llama.cpp), so both choose by the same rules."""
    if req.logits is not None:
        req.logits[(f.thread, f.last)] = logits.float().clone()
    if f.thread in req.waiting and req.interp.scripted(f.thread) is None and req.error is None:
        try:  # one request's sampling settings must not fail the others
            if f.thread not in req.generators:
                req.generators[f.thread] = thread_generator(req.config.seed, f.thread)
            tok = chosen[(req.id, f.thread)] = sample(logits, req.config.temperature, req.config.top_p,
                                                      req.generators[f.thread], req.interp.banned(f.thread))
            if req.config.logprobs is not None:
                req.token_info[f.thread] = token_info(logits, tok, req.config.logprobs)
        except Exception as e:  # noqa: BLE001 - reported as this request's failure by the step loop
            req.error = f"sampling failed: {type(e).__name__}: {e}"


class HFRunner:
    """The `Runner` of the transformers backend: every request's feeds in one forward over the shared cache, then
    each wanting thread's token from its logits (greedy, or sampled with the thread's seeded generator)."""

    step_tokens = 512  # prompt tokens one step feeds at most (chunked prefill); decoding is never held
    busy_tokens = 128  # ... while any request decodes: a step's time is mostly its prefill piece

    def __init__(self, model):
        self.model = model
        self.cache = SharedCache(model)

    def step(self, work: list) -> dict[tuple[int, int], int]:
        feeds = [(req, f) for req, fs in work for f in fs]
        chosen: dict[tuple[int, int], int] = {}
        if not feeds:
            return chosen
        logits = self.cache.forward(feeds)
        for k, (req, f) in enumerate(feeds):
            choose(req, f, logits[k], chosen)
        return chosen

    def release(self, gone: list, live: list, now: bool = False) -> None:
        """Drop the slots of finished requests once they outweigh a quarter of the live ones (or `now`); after
        dropping many, hand the freed memory back to the system."""
        if not live:
            if self.cache.num_slots:
                dropped = self.cache.num_slots
                self.cache = SharedCache(self.model)
                if dropped >= TRIM_SLOTS:
                    trim_memory()
            return
        used = sum(r.interp.num_slots for r in live)
        # dead slots still cost every step (each query's attention spans the whole shared cache): drop them once they
        # are a quarter of the live ones (a compaction copies the cache once, as a step's append does)
        if now or self.cache.num_slots - used > max(256, used // 4):
            if self.cache.compact(live) >= TRIM_SLOTS:
                trim_memory()

    def stats(self) -> dict:
        return {"cache_slots": self.cache.num_slots}
