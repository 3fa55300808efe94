"""The adapters shipped in the package: complete, named as the CLI documents, and traceable to how they were made."""

import json

import pytest
from safetensors.torch import load_file

from pastalm.models import BUNDLED_ADAPTERS, ModelError, adapter_digest, adapter_tokens, resolve_adapter


@pytest.mark.parametrize("name", sorted(BUNDLED_ADAPTERS))
def test_shipped_adapter_is_complete(name):
    folder = BUNDLED_ADAPTERS[name]
    assert resolve_adapter(name, None) == folder
    cfg = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    # rows for the tokens it added to the vocabulary (pasta train sft --tag-tokens), one per token
    added = {k: weights.pop(k) for k in list(weights) if "trainable_tokens_delta" in k}
    assert all(v.shape[0] == len(adapter_tokens(folder)) for v in added.values())
    assert bool(added) == bool(adapter_tokens(folder)) == bool(cfg.get("trainable_token_indices"))
    # every LoRA module of the config has its A and B matrices, with the config's rank
    assert weights and all(min(v.shape) == cfg["r"] for v in weights.values())
    assert {k.replace("lora_A", "lora_B") for k in weights if "lora_A" in k} == {k for k in weights if "lora_B" in k}
    records = [r for r in ("pasta_train.json", "pasta_prefer.json") if (folder / r).is_file()]
    assert records, f"{folder} says nothing about how it was trained"


def test_reserve_pasta_adapter_is_the_v3_stage2_adapter():
    """'pasta' (what `pasta generate --layout reserve` uses; the default until 2026-12-07) is the stage-2 (lambda inf) adapter trained from the v3 SFT
    adapter, and its record describes the weights actually shipped (the digest ship_adapter.py wrote matches the
    file); it continues the stage-1 adapter, so both have the same LoRA modules, with other values. 'pasta-v2'
    (annotation v2) and 'pasta-v1' (the v1 stage-2 lambda-inf adapter) are the defaults before it."""
    from pastalm.models import auto_adapter

    folder = BUNDLED_ADAPTERS["pasta"]
    rec = json.loads((folder / "pasta_prefer.json").read_text())
    assert rec["config"]["from_adapter"].endswith("v3-sft2") and rec["round"]["lambda"] == "inf"
    assert rec["shipped"]["sha256"] == adapter_digest(folder)
    assert resolve_adapter(auto_adapter("auto", None, "reserve"), None) == folder
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
    """'pasta-linear' was trained in the linear layout, with the tags as tokens of their own (continued from an
    earlier adapter: the tag-token epochs, then the early-fork ones of docs/training.md); 'auto' means it wherever
    the linear layout is decoded (every backend's default), and 'pasta' where the reserve layout is asked for."""
    from pastalm.lang.tags import TAG_TOKENS
    from pastalm.models import auto_adapter
    from pastalm.settings import ModelSettings

    folder = BUNDLED_ADAPTERS["pasta-linear"]
    rec = json.loads((folder / "pasta_train.json").read_text())
    assert rec["config"]["layout"] == "linear" and rec["config"]["tag_tokens"]
    assert rec["config"]["init_adapter"] and rec["shipped"]["source"]  # continued from an adapter, provenance kept
    assert rec["shipped"]["sha256"] == adapter_digest(folder)
    assert adapter_tokens(folder) == TAG_TOKENS
    assert (auto_adapter("auto", None, "linear") == auto_adapter(None, None, None, "vllm")
            == auto_adapter("auto", None, "linear", "vllm") == "pasta-linear")
    # the linear layout is every backend's default since 2026-12-07, the transformers backend's too
    assert auto_adapter("auto", None) == auto_adapter(None, None, None, "hf") == "pasta-linear"
    assert auto_adapter("auto", None, "reserve") == auto_adapter("auto", None, "reserve", "hf") == "pasta"
    assert auto_adapter("pasta", None, "linear") == "pasta"  # a named adapter is kept
    assert auto_adapter("auto", "some/other-model", "linear") == "auto"  # another model: no shipped adapter
    assert resolve_adapter(auto_adapter("auto", None, "linear"), None) == folder
    assert resolve_adapter("auto", None) == folder
    assert resolve_adapter(auto_adapter("auto", None, "reserve"), None) == BUNDLED_ADAPTERS["pasta"]
    assert resolve_adapter(auto_adapter("auto", "some/other-model", "linear"), "some/other-model") is None
    assert ModelSettings().adapter == "auto"


def test_unknown_adapter_name_says_what_to_give(tmp_path):
    with pytest.raises(ModelError, match="pasta-stage1"):
        resolve_adapter(str(tmp_path / "nope"), None)


# --- the cache of converted model folders --------------------------------------------------------------------


def _tiny_adapter(path, alpha=8):
    from peft import LoraConfig, get_peft_model

    from pastalm.testing import tiny_model

    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    lora.save_pretrained(path)
    return path


def test_the_same_files_at_another_path_share_one_converted_folder(folder, tmp_path, monkeypatch):
    """The cache is keyed on content: a model folder copied elsewhere (a second venv, a fresh clone) reuses the
    converted folder, while a changed adapter config converts again. (Keying on paths had filled a disk with 274
    copies of the same few models.)"""
    import shutil

    from pastalm.models import cache_entries, prepare

    monkeypatch.setenv("PASTA_CACHE", str(tmp_path / "cache"))
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    adapter = _tiny_adapter(tmp_path / "adapter")
    first = prepare(str(folder), str(adapter))[0]
    assert prepare(str(copy), str(adapter))[0] == first
    moved = shutil.copytree(adapter, tmp_path / "adapter-copy")
    assert prepare(str(folder), str(moved))[0] == first
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    assert prepare(str(folder), str(moved))[0] != first
    assert len(cache_entries()) == 2


def _fake_entry(root, name, mb, used):
    import os

    d = root / "models" / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * (mb << 20))
    (d / "pasta-source.json").write_text(json.dumps({"name": name}))
    os.utime(d / "pasta-source.json", (used, used))
    return d


def test_prune_deletes_least_recently_used_until_under_the_limit(tmp_path, monkeypatch):
    import os

    from pastalm.models import cache_entries, prune_cache

    monkeypatch.setenv("PASTA_CACHE", str(tmp_path))
    old, mid, new = (_fake_entry(tmp_path, n, 2, t) for n, t in (("old", 1000), ("mid", 2000), ("new", 3000)))
    stale = tmp_path / "models" / ".tmp-interrupted"
    stale.mkdir()
    os.utime(stale, (0, 0))
    assert [e.folder for e in cache_entries()] == [old, mid, new]
    assert prune_cache(None) == [] and old.is_dir() and not stale.exists()  # no limit: only the interrupted one
    removed = prune_cache((4 << 20) + 4096, keep=old)  # 6 MB kept under 4: one goes, and it may not be `old`
    assert [e.folder for e in removed] == [mid]
    assert old.is_dir() and new.is_dir() and not mid.exists()
    assert [e.folder for e in prune_cache(0)] == [old, new] and cache_entries() == []


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_cache_limit_says_what_to_give(value, monkeypatch):
    from pastalm.models import cache_limit

    monkeypatch.setenv("PASTA_CACHE_MAX_GB", value)
    with pytest.raises(ModelError, match="PASTA_CACHE_MAX_GB"):
        cache_limit()


def test_cache_command_lists_then_clears(tmp_path, monkeypatch, capsys):
    from pastalm.cli import main

    monkeypatch.setenv("PASTA_CACHE", str(tmp_path))
    monkeypatch.setenv("PASTA_CACHE_MAX_GB", "0.003")  # 3 MB
    for name, t in (("a", 1000), ("b", 2000)):
        _fake_entry(tmp_path, name, 2, t)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "2 converted model folders" in out and out.index(" a\n") < out.index(" b\n")
    assert main(["cache", "--prune"]) == 0
    assert "removed" in capsys.readouterr().out and not (tmp_path / "models" / "a").exists()
    assert main(["cache", "--clear"]) == 0
    assert "0 converted model folders" in capsys.readouterr().out
