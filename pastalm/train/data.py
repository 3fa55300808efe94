"""SFT examples: an annotated answer becomes the token ids, positions, 4D mask and labels of the layout module.

Training and inference share one rule set (`pastalm.lang.layout`): `build_example` tokenizes an answer segment by
segment and calls `layout_segments`; `LayoutCollator` pads a batch and builds each example's mask with
`pastalm.engine.reference.layout_mask`, the same mask the engine's exactness tests compare against. The
sequential baseline uses the same code on the rendered answer (no tags): one text segment, a causal mask and
ordinary next-token labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.reference import layout_mask
from ..lang.layout import IGNORE, ReservePolicy, SequenceLayout, layout_segments, tokenize_segments
from ..lang.render import render
from ..models import chat_prompt


def build_example(tokenizer, prompt: str, annotated: str, policy: ReservePolicy, eos_id: int,
                  system: str | None = None, sequential: bool = False) -> SequenceLayout:
    """Layout of one training example; with `sequential`, the answer's tags are removed first (baseline)."""
    text = render(annotated) if sequential else annotated
    return layout_segments(chat_prompt(tokenizer, prompt, system), tokenize_segments(tokenizer, text), policy, eos_id)


class LayoutDataset(torch.utils.data.Dataset):
    """Precomputed layouts; items are dicts the Trainer can batch (`input_ids` lets it group by length)."""

    def __init__(self, layouts: list[SequenceLayout]):
        self.layouts = layouts

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.layouts[i].input_ids, "layout": self.layouts[i]}


@dataclass
class LayoutCollator:
    """Pads a batch of layouts: input ids, position ids, the (B, 1, L, L) additive mask, and labels.

    `labels[i]` is the token that token i is trained to predict (already shifted; it follows the layout's
    threads, not the serialized order), so the loss is `layout_loss`, not the model's built-in shifted loss.
    Padded rows attend only to themselves, so no softmax row is empty; their labels are IGNORE."""

    pad_id: int
    dtype: torch.dtype = torch.float32

    def __call__(self, items: list[dict]) -> dict:
        seqs: list[SequenceLayout] = [it["layout"] for it in items]
        n = max(len(s.input_ids) for s in seqs)
        b = len(seqs)
        ids = torch.full((b, n), self.pad_id, dtype=torch.long)
        pos = torch.zeros((b, n), dtype=torch.long)
        labels = torch.full((b, n), IGNORE, dtype=torch.long)
        mask = torch.full((b, 1, n, n), torch.finfo(self.dtype).min, dtype=self.dtype)
        for k, s in enumerate(seqs):
            m = len(s.input_ids)
            ids[k, :m] = torch.tensor(s.input_ids)
            pos[k, :m] = torch.tensor(s.positions)
            labels[k, :m] = torch.tensor(s.labels)
            mask[k, 0, :m, :m] = layout_mask(s, self.dtype)[0, 0]
            idx = torch.arange(m, n)
            mask[k, 0, idx, idx] = 0
        return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "labels": labels}


def layout_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of each token's logits against its (already aligned) label; mean over labelled tokens."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                           ignore_index=IGNORE, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE).sum()
    return loss / torch.as_tensor(count, device=loss.device).clamp(min=1)
