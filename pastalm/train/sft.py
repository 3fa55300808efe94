"""Stage 1: supervised fine-tuning on annotated answers with the layout's mask, positions and labels.

LoRA through PEFT by default (`full=True` trains every weight). The same function trains the sequential
baseline (`sequential=True`): the same answers with their tags removed, ordinary causal training, so that
a PASTA model and its baseline differ only in the annotation. The Hugging Face `Trainer` provides the
progress bar, periodic checkpoints and seeding; the run's settings and data counts are saved beside the
result as `pasta_train.json`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..lang.layout import IGNORE, ReservePolicy
from ..lang.tags import TAG_TOKENS
from transformers import Trainer, TrainingArguments, set_seed

from .data import LayoutCollator, LayoutDataset, build_weighted, weighted_loss
from .io import DataError, read_jsonl


@dataclass
class SFTConfig:
    data: str  # JSONL with prompt + annotated (from `pasta annotate`)
    output: str
    sequential: bool = False  # baseline: train on the rendered answers
    full: bool = False  # full fine-tuning instead of LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"])
    lora_top: int | None = None  # LoRA on the top N transformer layers only (None: all); the backward pass
    # then stops at the lowest adapted layer, which on a CPU roughly halves a step for N = half the layers
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 2
    lr: float = 2e-4
    warmup_ratio: float = 0.05
    max_length: int = 640  # examples longer than this (prompt + answer tokens) are skipped and counted
    reserve_scale: float = 1.0
    layout: str = "reserve"  # "linear": the layout vLLM runs (docs/spec.md section 3): scale 0, one example per re-laid sync
    seed: int = 0
    save_steps: int = 50
    logging_steps: int = 5
    limit: int | None = None
    system: str | None = None
    skip_truncated: bool = False  # drop answers the base model did not finish (`hit_limit` in the record)
    tag_weight: float = 1.0  # loss weight of predicting a tag token (see data.build_weighted)
    init_adapter: str | None = None  # continue training this adapter instead of starting a new one
    tag_tokens: bool = False  # add the tags to the vocabulary as one token each (lang.tags.TAG_TOKENS), and train
    # their embedding rows (and output rows, when not tied) with the adapter


def load_examples(path: str, limit: int | None = None, skip_truncated: bool = False) -> list[dict]:
    rows = read_jsonl(path, required={"prompt": str, "annotated": str})
    if skip_truncated:
        rows = [r for r in rows if not r.get("hit_limit")]
    return rows[:limit] if limit else rows


def build_dataset(tokenizer, rows: list[dict], cfg: SFTConfig, policy: ReservePolicy, eos_id: int):
    layouts, weights, skipped = [], [], 0
    for i, r in enumerate(rows):
        try:
            examples = build_weighted(tokenizer, r["prompt"], r["annotated"], policy, eos_id, cfg.system,
                                      cfg.sequential, cfg.tag_weight)
        except ValueError as e:
            raise DataError(f"{cfg.data}: record {i + 1} ({r.get('id', '?')}): {e}") from e
        if any(len(seq.input_ids) > cfg.max_length for seq, _ in examples):
            skipped += 1
            continue
        for seq, w in examples:
            layouts.append(seq)
            weights.append(w)
    if not layouts:
        raise DataError(f"{cfg.data}: no example fits --max-length {cfg.max_length}")
    return LayoutDataset(layouts, weights), skipped


class LayoutTrainer(Trainer):
    """The Trainer with the layout's loss: labels are already aligned per thread (not shifted), and each token
    carries a weight (all 1 unless --tag-weight), so the model's built-in shifted loss does not apply."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels, weights = inputs.pop("labels"), inputs.pop("label_weights")
        outputs = model(**inputs)
        loss = weighted_loss(outputs.logits, labels, weights)
        return (loss, outputs) if return_outputs else loss


def train_sft(model, tokenizer, cfg: SFTConfig, callbacks=None) -> dict:
    """Fine-tune `model` (in place; wrapped with LoRA unless cfg.full) and save the result to cfg.output."""
    from ..models import add_tokens, adapter_tokens, load_adapter, save_adapter, token_rows

    set_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.full and cfg.init_adapter:
        raise ValueError("--init-adapter continues a LoRA adapter; it cannot be combined with --full")
    if cfg.full and cfg.tag_tokens:
        raise ValueError("--tag-tokens trains the new rows with a LoRA adapter; it cannot be combined with --full")
    # tokens the adapter continued from added, and the tags when asked: before the data is tokenized
    prior = adapter_tokens(cfg.init_adapter)
    added = list(dict.fromkeys(prior + (TAG_TOKENS if cfg.tag_tokens else [])))
    trainable = token_rows(model, add_tokens(model, tokenizer, added))
    policy = ReservePolicy.for_tokenizer(tokenizer, cfg.reserve_scale, cfg.layout)
    eos_id = tokenizer.eos_token_id
    rows = load_examples(cfg.data, cfg.limit, cfg.skip_truncated)
    dataset, skipped = build_dataset(tokenizer, rows, cfg, policy, eos_id)
    if cfg.init_adapter and added == prior:  # nothing new to add to it (load_adapter's add_tokens: already there)
        model = load_adapter(model, tokenizer, cfg.init_adapter, trainable=True)
    elif cfg.init_adapter:  # the adapter's LoRA, and rows for the added tokens (theirs, where it had them)
        from peft import PeftConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        conf = PeftConfig.from_pretrained(cfg.init_adapter)
        conf.inference_mode, conf.trainable_token_indices = False, trainable
        model = get_peft_model(model, conf)
        state = get_peft_model_state_dict(model, save_embedding_layers=False)  # new rows: as add_tokens began them
        state.update(load_file(str(Path(cfg.init_adapter) / "adapter_model.safetensors")))
        set_peft_model_state_dict(model, state)
    elif not cfg.full:
        from peft import LoraConfig, get_peft_model

        layers = None
        if cfg.lora_top:
            n = model.config.num_hidden_layers
            if not 0 < cfg.lora_top <= n:
                raise ValueError(f"--lora-top must be in 1..{n} (the model's layers), got {cfg.lora_top}")
            layers = list(range(n - cfg.lora_top, n))
        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                 lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_targets,
                                                 layers_to_transform=layers, task_type="CAUSAL_LM",
                                                 trainable_token_indices=trainable))
    model.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup_ratio, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=2, seed=cfg.seed,
        report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length", dataloader_num_workers=0,
    )
    trainer = LayoutTrainer(model=model, args=args, train_dataset=dataset,
                            data_collator=LayoutCollator(pad, next(model.parameters()).dtype), callbacks=callbacks)
    t0 = time.perf_counter()
    # A rerun into the same folder resumes from its last checkpoint (optimizer and data order included).
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    with warnings.catch_warnings():  # with added tokens, the checkpoints keep the resized embeddings whole (for
        # resuming), and peft warns at each one
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`")
        result = trainer.train(resume_from_checkpoint=str(ckpts[-1]) if ckpts else None)
    seconds = time.perf_counter() - t0
    if cfg.full:
        model.save_pretrained(str(out))
    else:
        save_adapter(model, out, added)
    tokenizer.save_pretrained(str(out))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    labelled = sum(sum(l != IGNORE for l in s.labels) for s in dataset.layouts)
    summary = {
        "config": asdict(cfg), "policy": asdict(policy), "examples": len(dataset), "skipped_too_long": skipped,
        "labelled_tokens": labelled, "steps": result.global_step, "seconds": round(seconds, 1),
        "train_loss": result.training_loss, "first_losses": losses[:3], "last_losses": losses[-3:],
        "log_history": trainer.state.log_history,
    }
    (out / "pasta_train.json").write_text(json.dumps(summary, indent=2))
    return summary
