"""Write an HF Llama-architecture folder (the cached folder `models.prepare` makes: the adapter merged, the tag
tokens added) as a GGUF file that llama.cpp loads, for `--backend llamacpp`.

Only what llama.cpp needs to run the model is written: the hyperparameters, the tensors under llama.cpp's names
(the query and key projections permuted from HF's rotary layout to GGUF's, as llama.cpp's own converter does) and
the tokenizer's vocabulary (tokens, merges, token types, special ids). pastalm tokenizes with the HF tokenizer and
hands llama.cpp token ids, so llama.cpp's own tokenizer settings never decide anything here. Written as float32
(exact, for tests) or float16; `quantize` turns it into a smaller type with llama.cpp's quantizer (Q4_1, the
bundled model's own type, keeps a benchmark against llama.cpp on the bundled GGUF like for like).
"""

from __future__ import annotations

import json
from pathlib import Path

GGUF_TYPES = {"f32": 0, "f16": 1, "q4_1": 3, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_* for these


def _permute(w, n_head: int):
    # HF keeps each head's rotary halves apart; GGUF interleaves them (llama.cpp's converter does the same)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export(folder: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Write `folder` (an HF Llama folder with safetensors weights) as the GGUF `out` in `dtype` ('f32' or 'f16')."""
    import gguf
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder, out = Path(folder), Path(out)
    cfg = AutoConfig.from_pretrained(folder)
    if cfg.model_type != "llama":
        raise ValueError(f"--backend llamacpp: the GGUF export handles the llama architecture (SmolLM2's), not "
                         f"{cfg.model_type!r}; convert the model with llama.cpp's convert_hf_to_gguf.py")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"GGUF export dtype {dtype!r}: use 'f32' or 'f16' (then `quantize` for others)")
    tok = AutoTokenizer.from_pretrained(folder)
    weights: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    if not weights:
        raise ValueError(f"{folder}: no safetensors weights to export")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    vocab = weights["model.embed_tokens.weight"].shape[0]

    tmp = out.with_name(out.name + ".part")  # written next to its final name, then moved: no half file left
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(folder.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or
                               (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(vocab)
    w.add_file_type(GGUF_TYPES[dtype])

    # the vocabulary, padded to the embedding's rows (a model may have more rows than tokens)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    added = set(tok.added_tokens_decoder)
    toks, types = [], []
    for i in range(vocab):
        t = tokens[i] if i < len(tokens) and tokens[i] is not None else f"[PAD{i}]"
        toks.append(t)
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.NORMAL if i < len(tokens) else gguf.TokenType.UNUSED)
    model = json.loads(tok.backend_tokenizer.to_str()).get("model", {})
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for name, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{name}_token_id")(int(value))
    w.add_add_bos_token(False)

    np_dtype = np.float32 if dtype == "f32" else np.float16

    def put(name: str, t, keep32: bool = False):
        a = t.to(torch.float32).numpy()
        w.add_tensor(name, a if keep32 or a.ndim == 1 else a.astype(np_dtype))

    put("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"], keep32=True)
        put(f"blk.{i}.attn_q.weight", _permute(weights[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        put(f"blk.{i}.attn_k.weight", _permute(weights[p + "self_attn.k_proj.weight"], n_kv))
        put(f"blk.{i}.attn_v.weight", weights[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", weights[p + "post_attention_layernorm.weight"], keep32=True)
        put(f"blk.{i}.ffn_gate.weight", weights[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", weights[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"])
    put("output_norm.weight", weights["model.norm.weight"], keep32=True)
    if "lm_head.weight" in weights and not getattr(cfg, "tie_word_embeddings", False):
        put("output.weight", weights["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out


def quantize(src: str | Path, out: str | Path, kind: str = "q4_1", threads: int = 0) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python): `src` GGUF to `out` in `kind` ('q4_1', 'q8_0', 'f16')."""
    import llama_cpp as L

    if kind not in GGUF_TYPES:
        raise ValueError(f"GGUF type {kind!r}: use one of {', '.join(GGUF_TYPES)}")
    params = L.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[kind]
    params.nthread = threads
    if kind == "q4_1":  # as in the bundled GGUF: the embedding (also the output, tied) stays Q8_0; in Q4_1 the
        # rows of rare tokens (the tag tokens a PASTA adapter writes) lose the margin that decides a fork
        params.token_embedding_type = params.output_tensor_type = 8  # GGML_TYPE_Q8_0
    tmp = Path(str(out) + ".part")
    if L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
    tmp.replace(out)
    return Path(out)
