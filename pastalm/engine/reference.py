"""One full forward pass over a finished serialized sequence with the layout's mask and positions.

This is what training computes, and the reference the engine's incremental decoding must match.
"""

from __future__ import annotations

import torch

from ..lang.layout import SequenceLayout
from .mask import additive_mask, span_views, visibility


def layout_mask(seq: SequenceLayout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 1, L, L) additive mask of a serialized sequence, from its layout."""
    num_threads = max(seq.thread) + 1
    views = span_views(seq.spans, num_threads)  # (L, num_threads)
    allowed = visibility(views, torch.tensor(seq.thread), torch.tensor(seq.index))
    return additive_mask(allowed, dtype)


@torch.inference_mode()
def layout_forward(model, seq: SequenceLayout) -> torch.Tensor:
    """Logits (L, V) of the whole sequence in one forward pass."""
    out = model(
        input_ids=torch.tensor([seq.input_ids]),
        position_ids=torch.tensor([seq.positions]),
        attention_mask=layout_mask(seq, model.dtype),
    )
    return out.logits[0]
