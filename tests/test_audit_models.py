"""Issue 26, items 3 and 4: a tag-token adapter on a base tokenizer that already has other added tokens, and the
model cache key when a base folder's tokenizer changes. Each test failed on main before the fix."""

import json
import shutil

import pytest
import torch

from pastalm.lang.tags import TAG_TOKENS
from pastalm.models import ModelError, add_tokens, load, load_adapter, prepare, save_adapter, token_rows
from pastalm.testing import tiny_model, tiny_tokenizer

TEXT = "Tips: " + TAG_TOKENS[1] + "<async>sleep early</async>" + TAG_TOKENS[0] + "<async>no screens</async><sync/> ok"


def _tag_adapter(path, arch="llama"):
    """A LoRA adapter that added the tags to the plain tiny tokenizer (ids 384..396), with trained-looking rows."""
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model(arch), tiny_tokenizer()
    ids = add_tokens(model, tok, TAG_TOKENS)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            trainable_token_indices=token_rows(model, ids)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    save_adapter(lora, path, TAG_TOKENS)
    return path, ids


def _logits(model, tok, tag_ids):
    """Logits over the plain vocabulary and the tag tokens' columns (in TAG_TOKENS order) at every position of
    TEXT; the tags must be one token each."""
    ids = tok.encode(TEXT)
    assert sum(i in tag_ids for i in ids) == 7
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0]
    return torch.cat([out[:, :384], out[:, tag_ids]], dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head (two rows per tag) and tied
def test_a_tag_token_adapter_on_a_tokenizer_with_other_added_tokens_gets_its_rows_at_the_new_ids(tmp_path, arch):
    """The rows were trained for ids 384..396; a base tokenizer with one more added token gives the tags 385..397.
    The adapter must put each row on its own tag (peft alone wrote them one id off: logits differed by about 0.7)."""
    adapter, trained_ids = _tag_adapter(tmp_path / "adapter", arch)
    ref = load_adapter(tiny_model(arch), tiny_tokenizer(), adapter).eval()
    ref_tok = tiny_tokenizer()
    ref_tok.add_tokens(TAG_TOKENS)
    want = _logits(ref, ref_tok, trained_ids)

    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])  # another project's token, added before the tags
    model = tiny_model(arch)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    got_model = load_adapter(model, tok, adapter).eval()
    new_ids = tok.convert_tokens_to_ids(TAG_TOKENS)
    assert new_ids == [i + 1 for i in trained_ids]
    got = _logits(got_model, tok, new_ids)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_the_merged_folder_of_a_shifted_base_decodes_as_the_adapter_was_trained(tmp_path):
    """The same through `load` (the converted, merged folder every backend loads)."""
    adapter, trained_ids = _tag_adapter(tmp_path / "adapter")
    base = tmp_path / "base"
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.save_pretrained(base)
    tok.save_pretrained(base)
    m = load(str(base), "fp32", str(adapter))
    ref = load_adapter(tiny_model("llama"), tiny_tokenizer(), adapter).eval()
    ref_tok = tiny_tokenizer()
    ref_tok.add_tokens(TAG_TOKENS)
    got = _logits(m.model, m.tokenizer, m.tokenizer.convert_tokens_to_ids(TAG_TOKENS))
    assert torch.allclose(got, _logits(ref, ref_tok, trained_ids), atol=1e-5)


def test_an_adapter_whose_rows_do_not_match_its_tokens_is_refused(tmp_path):
    adapter, _ = _tag_adapter(tmp_path / "adapter")
    (adapter / "pasta_tokens.json").write_text(json.dumps({"added_tokens": TAG_TOKENS[:-1]}))
    with pytest.raises(ModelError, match="12 tokens"):
        load_adapter(tiny_model("llama"), tiny_tokenizer(), adapter)


def test_a_changed_base_tokenizer_converts_again(folder, tmp_path, monkeypatch):
    """The cache key covers the tokenizer files: a base folder whose tokenizer changed (an added token, another chat
    template) no longer maps to the folder converted with the old tokenizer."""
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("PASTA_CACHE", str(tmp_path / "cache"))
    base = shutil.copytree(folder, tmp_path / "base")
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    first = prepare(str(base), str(tmp_path / "adapter"))[0]
    assert prepare(str(base), str(tmp_path / "adapter"))[0] == first

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(base)
    second = prepare(str(base), str(tmp_path / "adapter"))[0]
    assert second != first
    assert AutoTokenizer.from_pretrained(second).chat_template == tok.chat_template
    assert AutoTokenizer.from_pretrained(first).chat_template != tok.chat_template
