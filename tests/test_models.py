"""The adapters shipped in the package: complete, named as the CLI documents, and traceable to how they were made."""

import json

import pytest
from safetensors.torch import load_file

from pastalm.models import BUNDLED_ADAPTERS, ModelError, adapter_digest, resolve_adapter


@pytest.mark.parametrize("name", sorted(BUNDLED_ADAPTERS))
def test_shipped_adapter_is_complete(name):
    folder = BUNDLED_ADAPTERS[name]
    assert resolve_adapter(name, None) == folder
    cfg = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    # every LoRA module of the config has its A and B matrices, with the config's rank
    assert weights and all(min(v.shape) == cfg["r"] for v in weights.values())
    assert {k.replace("lora_A", "lora_B") for k in weights if "lora_A" in k} == {k for k in weights if "lora_B" in k}
    records = [r for r in ("pasta_train.json", "pasta_prefer.json") if (folder / r).is_file()]
    assert records, f"{folder} says nothing about how it was trained"


def test_default_pasta_adapter_is_the_v3_stage2_adapter():
    """'pasta' (what `pasta generate` uses by default) is the stage-2 (lambda inf) adapter trained from the v3 SFT
    adapter, and its record describes the weights actually shipped (the digest ship_adapter.py wrote matches the
    file); it continues the stage-1 adapter, so both have the same LoRA modules, with other values. 'pasta-v2'
    (annotation v2) and 'pasta-v1' (the v1 stage-2 lambda-inf adapter) are the defaults before it."""
    folder = BUNDLED_ADAPTERS["pasta"]
    rec = json.loads((folder / "pasta_prefer.json").read_text())
    assert rec["config"]["from_adapter"].endswith("v3-sft2") and rec["round"]["lambda"] == "inf"
    assert rec["shipped"]["sha256"] == adapter_digest(folder)
    assert resolve_adapter("auto", None) == folder
    v3 = load_file(str(folder / "adapter_model.safetensors"))
    stage1 = load_file(str(BUNDLED_ADAPTERS["pasta-stage1"] / "adapter_model.safetensors"))
    assert v3.keys() == stage1.keys()
    assert all(v3[k].shape == stage1[k].shape for k in stage1)
    assert any(not v3[k].float().allclose(stage1[k].float()) for k in stage1)
    v2 = json.loads((BUNDLED_ADAPTERS["pasta-v2"] / "pasta_train.json").read_text())
    assert v2["config"]["data"].endswith("annotated-v2.jsonl")
    assert v2["shipped"]["sha256"] == adapter_digest(BUNDLED_ADAPTERS["pasta-v2"])
    v1 = json.loads((BUNDLED_ADAPTERS["pasta-v1"] / "pasta_prefer.json").read_text())
    assert v1["round"]["lambda"] == "inf" and v1["shipped"]["sha256"] == adapter_digest(BUNDLED_ADAPTERS["pasta-v1"])


def test_the_linear_layout_gets_the_adapter_trained_in_it():
    """'pasta-linear' was trained in the linear layout (SFT and stage 2); 'auto' means it wherever the linear
    layout is decoded (asked for, or the vLLM backend's default), and 'pasta' elsewhere."""
    from pastalm.models import auto_adapter
    from pastalm.settings import ModelSettings

    folder = BUNDLED_ADAPTERS["pasta-linear"]
    rec = json.loads((folder / "pasta_prefer.json").read_text())
    assert rec["config"]["layout"] == "linear" and rec["round"]["lambda"] == "inf"
    assert rec["shipped"]["sha256"] == adapter_digest(folder)
    assert rec["config"]["from_adapter"].endswith("v4-sft")
    assert (auto_adapter("auto", None, "linear") == auto_adapter(None, None, None, "vllm")
            == auto_adapter("auto", None, "linear", "vllm") == "pasta-linear")
    assert auto_adapter("auto", None) == auto_adapter("auto", None, "reserve") == "pasta"
    assert auto_adapter("pasta", None, "linear") == "pasta"  # a named adapter is kept
    assert auto_adapter("auto", "some/other-model", "linear") == "auto"  # another model: no shipped adapter
    assert resolve_adapter(auto_adapter("auto", None, "linear"), None) == folder
    assert resolve_adapter("auto", None) == BUNDLED_ADAPTERS["pasta"]
    assert resolve_adapter(auto_adapter("auto", "some/other-model", "linear"), "some/other-model") is None
    assert ModelSettings().adapter == "auto"


def test_unknown_adapter_name_says_what_to_give(tmp_path):
    with pytest.raises(ModelError, match="pasta-stage1"):
        resolve_adapter(str(tmp_path / "nope"), None)
