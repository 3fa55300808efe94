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
from ..lang.layout import IGNORE, ReservePolicy, SequenceLayout, layout_examples, tokenize_segments
from ..lang.render import CLOSE, PROMISE, SYNC_KIND, render
from ..models import chat_prompt


def build_example(tokenizer, prompt: str, annotated: str, policy: ReservePolicy, eos_id: int,
                  system: str | None = None, sequential: bool = False) -> SequenceLayout:
    """Layout of one training example (reserve layout); with `sequential`, the answer's tags are removed first."""
    if policy.linear:
        raise ValueError("build_example lays out one sequence; the linear layout splits an answer at its syncs: "
                         "use build_weighted")
    return build_weighted(tokenizer, prompt, annotated, policy, eos_id, system, sequential)[0][0]


def build_weighted(tokenizer, prompt: str, annotated: str, policy: ReservePolicy, eos_id: int,
                   system: str | None = None, sequential: bool = False,
                   tag_weight: float = 1.0) -> list[tuple[SequenceLayout, list[float]]]:
    """The examples of one answer (one, or one per re-laid sync in the linear layout: `layout_examples`), each with
    a loss weight per token: `tag_weight` where the token it is trained to predict belongs to a tag (promise,
    `</async>`, `<sync/>`), 1 elsewhere. Tags are a small share of an answer's tokens but carry every decision the
    interpreter acts on, so weighting them up teaches the format in fewer steps."""
    text = render(annotated) if sequential else annotated
    prompt_ids = chat_prompt(tokenizer, prompt, system)
    segs = tokenize_segments(tokenizer, text)
    tags = [s.kind in (PROMISE, CLOSE, SYNC_KIND) for s, ids in segs for _ in ids]
    out = []
    done = 0  # answer tokens laid out before this example's own
    for seq in layout_examples(prompt_ids, segs, policy, eos_id):
        own = len(seq.input_ids) - len(prompt_ids) - done  # this example's answer tokens, after its prompt
        is_tag = [False] * (len(seq.input_ids) - own) + tags[done:done + own]
        done += own
        weights = [1.0] * len(seq.input_ids)
        if tag_weight != 1.0:
            last_of: dict[int, int] = {}
            for i, t in enumerate(seq.thread):  # token i is the target of the previous token of its thread
                if t in last_of and is_tag[i]:
                    weights[last_of[t]] = tag_weight
                last_of[t] = i
        out.append((seq, weights))
    return out


class LayoutDataset(torch.utils.data.Dataset):
    """Precomputed layouts; items are dicts the Trainer can batch (`input_ids` lets it group by length)."""

    def __init__(self, layouts: list[SequenceLayout], weights: list[list[float]]):
        self.layouts = layouts
        self.weights = weights

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.layouts[i].input_ids, "layout": self.layouts[i], "weights": self.weights[i]}


@dataclass
class LayoutCollator:
    """Pads a batch of layouts: input ids, position ids, the (B, 1, L, L) additive mask, and labels.

    `labels[i]` is the token that token i is trained to predict (already shifted; it follows the layout's
    threads, not the serialized order), so the loss is `weighted_loss`, not the model's built-in shifted loss.
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
        out = {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "labels": labels}
        if "weights" in items[0]:
            w = torch.zeros((b, n), dtype=torch.float32)
            for k, it in enumerate(items):
                w[k, : len(it["weights"])] = torch.tensor(it["weights"])
            out["label_weights"] = w
        return out


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy over labelled tokens (weights from `build_weighted`)."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                         ignore_index=IGNORE, reduction="none")
    w = weights.reshape(-1).to(ce.device) * (labels.reshape(-1) != IGNORE).to(ce.device)
    return (ce * w).sum() / w.sum().clamp(min=1e-6)
