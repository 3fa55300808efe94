"""Stage 1 pipeline on tiny models: prompt sets, base answers, annotation + validation, SFT data and training."""

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pastalm.engine.reference import layout_forward, layout_mask
from pastalm.lang.layout import IGNORE, ReservePolicy
from pastalm.lang.render import render, validate
from pastalm.lang.parser import Stray, parse
from pastalm.testing import tiny_model
from pastalm.train.annotate import StructuralAnnotator, annotate_records, bucketed, check
from pastalm.train.data import LayoutCollator, build_example, weighted_loss
from pastalm.train.io import DataError, read_jsonl
from pastalm.train.prompts import PARALLEL_CATEGORIES, SERIAL_CATEGORIES, load_prompts, prompt_file

ROOT = Path(__file__).resolve().parent.parent
ANSWERS = ROOT / "data" / "smollm2-135m" / "answers.jsonl"

LIST_ANSWER = (
    "Here are some ways to sleep better:\n\n"
    "1. **Keep a schedule**: Go to bed and wake up at the same time every day, even on weekends.\n\n"
    "2. **Avoid screens**: Put your phone away an hour before bed; the light keeps you awake.\n\n"
    "3. **Cut caffeine**: Coffee after noon can stay in your body for many hours and delay sleep.\n\n"
    "By following these tips you will fall asleep faster."
)


# --- prompt sets -------------------------------------------------------------------------------------------
def test_prompt_sets_sizes_labels_and_disjointness():
    train, ev = load_prompts("train"), load_prompts("eval")
    assert len(train) >= 1000 and len(ev) >= 200
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in ev}
    assert not {(p["template"], p["topic"]) for p in train} & {(p["template"], p["topic"]) for p in ev}
    for rows in (train, ev):
        cats = {p["category"] for p in rows}
        assert cats == set(PARALLEL_CATEGORIES) | set(SERIAL_CATEGORIES)
        assert all(p["parallel"] == (p["category"] in PARALLEL_CATEGORIES) for p in rows)


def test_prompt_sets_load_with_datasets():
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(prompt_file("eval")), split="train")
    assert len(ds) == len(load_prompts("eval"))
    assert {"id", "prompt", "category", "parallel"} <= set(ds.column_names)


@pytest.mark.parametrize("content, problem", [
    ('{"prompt": "a"}\n{"prompt": ', "2: not valid JSON"),
    ('{"prompt": "a"}\n["x"]\n', "2: expected a JSON object"),
    ('{"prompt": "a"}\n\n{"text": "b"}\n', "3: missing field 'prompt'"),
    ('{"prompt": ""}\n', "1: field 'prompt' must be a non-empty string"),
])
def test_malformed_files_name_file_line_and_problem(tmp_path, content, problem):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as e:
        load_prompts(str(f))
    assert str(e.value).startswith(f"{f}:{problem}")


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")


# --- base answers ------------------------------------------------------------------------------------------
def test_batched_answers_equal_one_at_a_time_generate_and_resume(tmp_path, tokenizer):
    from pastalm.models import chat_prompt
    from pastalm.train.answers import generate_answers

    model = tiny_model("llama")
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(
        ["Give three tips to sleep better.", "What is 2 + 2?", "Compare apples and oranges in detail.", "Hi"])]
    out = tmp_path / "answers.jsonl"
    first = generate_answers(model, tokenizer, prompts[:2], out, batch_size=2, max_new_tokens=12,
                             repetition_penalty=1.0)
    again = generate_answers(model, tokenizer, prompts, out, batch_size=3, max_new_tokens=12, repetition_penalty=1.0)
    assert (first["answered"], again["answered"], again["skipped"]) == (2, 2, 2)
    rows = {r["id"]: r for r in read_jsonl(out)}
    assert set(rows) == {p["id"] for p in prompts}
    for p in prompts:
        ids = torch.tensor([chat_prompt(tokenizer, p["prompt"])])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(tokenizer.eos_token_id)]
        assert rows[p["id"]]["answer"] == tokenizer.decode(ref, skip_special_tokens=True)
        assert rows[p["id"]]["answer_tokens"] == len(ref)


# --- structural annotator ----------------------------------------------------------------------------------
def test_structural_annotates_a_list_with_sync_before_referring_text(tokenizer):
    ann = StructuralAnnotator().annotate("tips", LIST_ANSWER)
    assert render(ann) == LIST_ANSWER
    rep = validate(ann, original=LIST_ANSWER)
    assert rep.ok and rep.promises == 3 and rep.syncs == 1
    assert '<promise topic="keep' in ann and ann.index("<sync/>") < ann.index("By following")


def test_scheme_v3_is_v2_without_topics(tokenizer):
    """v3 writes the same leads, blocks and separators as v2 and only leaves the topic out of each promise."""
    v2 = StructuralAnnotator(scheme="v2").annotate("tips", LIST_ANSWER)
    v3 = StructuralAnnotator(scheme="v3").annotate("tips", LIST_ANSWER)
    assert "topic=" not in v3 and v3 == re.sub(r' topic="[^"]*"', "", v2)
    rep = validate(v3, original=LIST_ANSWER)
    assert rep.ok and rep.promises == 3
    assert check(v3, LIST_ANSWER, tokenizer).annotated.count('<promise tokens="') == 3


@pytest.mark.parametrize("answer", [
    "The capital of France is Paris.",
    "2 + 2 = 4.",
    "Roses are red,\nviolets are blue,\nsugar is sweet,\nand so are you.\n\nA second stanza,\nshort lines too.",
    "To compute 12 * 3:\n\n1. Multiply 10 by 3 to get 10 * 3 = 30, the first part.\n\n"
    "2. Multiply 2 by 3 and add it to the previous result: 30 + 6 = 36.\n",
    "Fruits:\n- Apple\n- Pear\n- Plum\n",
])
def test_structural_leaves_serial_answers_alone(answer):
    assert StructuralAnnotator().annotate("q", answer) == answer


_marker = st.sampled_from(["{n}. ", "{n}) ", "- ", "* ", "• "])
_words = st.lists(st.sampled_from(["sleep", "well", "tea", "**bold**:", "a", "b2", "x=1", "and", "é", "—", "the",
                                   '"q"', "<tag>", "daily", "keeps", "calm"]), min_size=3, max_size=30)


@st.composite
def list_answers(draw):
    intro = draw(st.sampled_from(["", "Here are some tips:\n\n", "Intro text.\n", "Pros:\n"]))
    marker = draw(_marker)
    sep = draw(st.sampled_from(["\n", "\n\n", "\n\n\n"]))
    n = draw(st.integers(1, 6))
    items = [marker.format(n=i + 1) + " ".join(draw(_words)) for i in range(n)]
    outro = draw(st.sampled_from(["", "\n", "\n\nIn summary, these help.", "\n\nThat is all.\n", "\n  indented"]))
    return intro + sep.join(items) + outro


@st.composite
def paragraph_answers(draw):
    paras = [" ".join(draw(st.lists(st.sampled_from(["word", "longer", "sentence.", "these", "é"]), min_size=1,
                                    max_size=60))) for _ in range(draw(st.integers(1, 6)))]
    return draw(st.sampled_from(["\n\n", "\n\n\n", "\n"])).join(paras) + draw(st.sampled_from(["", "\n"]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(list_answers(), paragraph_answers(), st.text(max_size=300),
                 st.text(alphabet="<>/ asyncpromise=\"1\n-.", max_size=80)))
def test_structural_is_lossless_and_valid_property(answer):
    tokenizer = _tok()
    ann = StructuralAnnotator().annotate("q", answer)
    res = check(ann, answer, tokenizer, bucket=10)
    if any(isinstance(e, Stray) for e in parse(answer)):
        # tag-like text in the answer itself (docs/spec.md L5): never trained on (the model would learn to write
        # broken tags), and never rendered, so no annotation of it can be lossless
        assert res.annotated is None and "malformed-tag" in res.reasons
        return
    assert render(ann) == answer
    assert res.annotated is not None, res.reasons
    assert render(res.annotated) == answer


_TOK = []


def _tok():
    if not _TOK:
        from pastalm.testing import tiny_tokenizer

        _TOK.append(tiny_tokenizer())
    return _TOK[0]


@pytest.mark.skipif(not ANSWERS.exists(), reason="shipped base answers not present")
def test_structural_is_lossless_on_every_shipped_training_answer():
    rows = read_jsonl(ANSWERS, required={"prompt": str, "answer": str})
    assert len(rows) >= 1000
    kept, counts = annotate_records(rows, StructuralAnnotator(), _tok(), bucket=10, progress=False)
    assert len(kept) == len(rows), counts  # nothing rejected: the structural annotator is exact by construction
    for r in kept:
        assert render(r["annotated"]) == r["answer"]
    assert counts["kept-parallel"] >= 0.4 * len(rows)


# --- validation --------------------------------------------------------------------------------------------
def test_check_rewrites_token_counts_to_the_real_chunk_length(tokenizer):
    ann = StructuralAnnotator().annotate("tips", LIST_ANSWER)
    exact = check(ann, LIST_ANSWER, tokenizer, bucket=0).annotated
    from pastalm.lang.render import segments

    segs = segments(exact)
    for i, s in enumerate(segs):
        if s.kind == "promise":
            assert s.tokens == len(tokenizer.encode(segs[i + 2].text, add_special_tokens=False))
            assert segs[i + 3].kind == "close"
    bucket = check(ann, LIST_ANSWER, tokenizer, bucket=10).annotated
    assert [s.tokens for s in segments(bucket) if s.kind == "promise"] == \
        [bucketed(s.tokens, 10) for s in segs if s.kind == "promise"]
    assert all(s.tokens % 10 == 0 for s in segments(bucket) if s.kind == "promise")


@pytest.mark.parametrize("mutate, reason", [
    (lambda a: a.replace("weekends", "weekend5"), "not-lossless"),
    (lambda a: a.replace("<async>", "", 1), "promise-without-block"),
    (lambda a: a[: a.rindex("</async>")] + a[a.rindex("</async>") + len("</async>"):], "unclosed-block"),
    (lambda a: re.sub(r"<async>(.*?)</async>", r"<async></async>\1", a, count=1, flags=re.S), "empty-block"),
    (lambda a: a.replace("<sync/>", "<sync>"), "malformed-tag"),
])
def test_check_rejects_broken_annotations(tokenizer, mutate, reason):
    good = StructuralAnnotator().annotate("tips", LIST_ANSWER)
    assert check(good, LIST_ANSWER, tokenizer).annotated is not None
    res = check(mutate(good), LIST_ANSWER, tokenizer)
    assert res.annotated is None and reason in res.reasons


def test_annotate_records_counts_rejects_and_keeps_serial(tokenizer):
    class Bad:
        name = "bad"

        def annotate(self, prompt, answer):
            return answer + "!" if prompt == "break" else StructuralAnnotator().annotate(prompt, answer)

    rows = [{"prompt": "tips", "answer": LIST_ANSWER}, {"prompt": "break", "answer": LIST_ANSWER},
            {"prompt": "fact", "answer": "Paris."}]
    kept, counts = annotate_records(rows, Bad(), tokenizer, progress=False)
    assert [r["prompt"] for r in kept] == ["tips", "fact"]
    assert counts["kept-parallel"] == 1 and counts["kept-serial"] == 1
    assert counts["rejected"] == 1 and counts["rejected: not-lossless"] == 1


# --- SFT data ----------------------------------------------------------------------------------------------
def _examples(tokenizer, policy):
    ann = check(StructuralAnnotator().annotate("tips", LIST_ANSWER), LIST_ANSWER, tokenizer).annotated
    eos = tokenizer.eos_token_id
    return [build_example(tokenizer, "Give tips to sleep.", ann, policy, eos),
            build_example(tokenizer, "What is 2 + 2?", "2 + 2 = 4.", policy, eos),
            build_example(tokenizer, "Give tips to sleep.", ann, policy, eos, sequential=True)]


@pytest.mark.parametrize("scale", [0.0, 1.0, 10.0])
def test_collator_reproduces_the_layout_exactly(tokenizer, scale):
    policy = ReservePolicy.for_tokenizer(tokenizer, scale)
    seqs = _examples(tokenizer, policy)
    batch = LayoutCollator(tokenizer.pad_token_id)([{"layout": s} for s in seqs])
    n = batch["input_ids"].shape[1]
    for k, s in enumerate(seqs):
        m = len(s.input_ids)
        assert batch["input_ids"][k, :m].tolist() == s.input_ids
        assert batch["position_ids"][k, :m].tolist() == s.positions
        assert batch["labels"][k, :m].tolist() == s.labels
        assert torch.equal(batch["attention_mask"][k, 0, :m, :m], layout_mask(s)[0, 0])
        assert (batch["labels"][k, m:] == IGNORE).all()
        assert (batch["attention_mask"][k, 0, :m, m:] < 0).all()  # nobody sees padding
    assert n == max(len(s.input_ids) for s in seqs)


def test_sequential_example_is_ordinary_causal_training(tokenizer):
    seq = _examples(tokenizer, ReservePolicy.for_tokenizer(tokenizer, 1.0))[2]
    n = len(seq.input_ids)
    assert seq.positions == list(range(n))
    assert torch.equal(layout_mask(seq)[0, 0] == 0, torch.ones(n, n, dtype=torch.bool).tril())
    from pastalm.models import chat_prompt

    p = len(chat_prompt(tokenizer, "Give tips to sleep."))
    assert seq.labels[p - 1:-1] == seq.input_ids[p:] and seq.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(seq.input_ids[p:]) == LIST_ANSWER


def test_padded_batch_loss_equals_the_full_forward_reference(tokenizer, model):
    policy = ReservePolicy.for_tokenizer(tokenizer, 1.0)
    seqs = _examples(tokenizer, policy)
    batch = LayoutCollator(tokenizer.pad_token_id)([{"layout": s} for s in seqs])
    labels = batch.pop("labels")
    batch.pop("label_weights", None)
    with torch.no_grad():
        out = model(**batch)
    total, count = 0.0, 0
    for k, s in enumerate(seqs):
        ref = layout_forward(model, s)
        m = len(s.input_ids)
        torch.testing.assert_close(out.logits[k, :m], ref, atol=2e-5, rtol=1e-4)
        lab = torch.tensor(s.labels)
        keep = lab != IGNORE
        total += torch.nn.functional.cross_entropy(ref[keep], lab[keep], reduction="sum").item()
        count += int(keep.sum())
    ones = torch.ones_like(labels, dtype=torch.float)
    torch.testing.assert_close(weighted_loss(out.logits, labels, ones).item(), total / count, atol=1e-4, rtol=1e-4)


# --- training ----------------------------------------------------------------------------------------------
def _write_sft_data(path: Path, tokenizer, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        ans = LIST_ANSWER.replace("weekends", f"day {i}")
        rows.append({"prompt": f"Give tips to sleep ({i}).",
                     "annotated": check(StructuralAnnotator().annotate("", ans), ans, tokenizer).annotated})
    rows.append({"prompt": "What is 2 + 2?", "annotated": "4"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("sequential", [False, True])
def test_short_lora_run_lowers_the_loss_and_trains_every_lora_weight(tmp_path, tokenizer, sequential):
    from pastalm.train.sft import SFTConfig, train_sft

    model = tiny_model("qwen2")
    data = _write_sft_data(tmp_path / "sft.jsonl", tokenizer)
    cfg = SFTConfig(data=str(data), output=str(tmp_path / "out"), sequential=sequential, max_steps=24,
                    batch_size=4, grad_accum=1, lr=3e-2, logging_steps=4, save_steps=12, lora_r=4, lora_alpha=8)
    from peft import LoraConfig

    summary = train_sft(model, tokenizer, cfg)
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1 and losses[-1] == min(losses), losses
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    # LoRA B starts at zero: every B being non-zero means every adapter pair was trained.
    bs = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(bs) == 2 * 7 and all(v.abs().sum() > 0 for v in bs.values())
    # every A moved from its initialisation (same seed -> same init)
    from peft import get_peft_model as gpm
    from transformers import set_seed

    set_seed(cfg.seed)
    fresh = gpm(tiny_model("qwen2"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=cfg.lora_targets,
                                                task_type="CAUSAL_LM"))
    init = {k.replace(".default", ""): v for k, v in fresh.state_dict().items() if "lora_A" in k}
    moved = [k for k, v in weights.items() if "lora_A" in k and not torch.equal(v, init[k])]
    assert len(moved) == 2 * 7, (len(moved), list(init)[:2], list(weights)[:2])
    saved = json.loads((tmp_path / "out" / "pasta_train.json").read_text())
    assert saved["config"]["sequential"] == sequential and saved["examples"] == 13
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-12").is_dir()


def test_tag_weights_mark_exactly_the_predictions_of_tag_tokens(tokenizer):
    from pastalm.lang.render import segments
    from pastalm.train.data import build_weighted

    policy = ReservePolicy.for_tokenizer(tokenizer, 1.0)
    ann = check(StructuralAnnotator().annotate("tips", LIST_ANSWER), LIST_ANSWER, tokenizer).annotated
    seq, w = build_weighted(tokenizer, "Tips?", ann, policy, tokenizer.eos_token_id, tag_weight=3.0)[0]
    # Every weighted position predicts a tag token of its own thread; every tag token (but <async>) is predicted.
    tag_ids = set()
    for s in segments(ann):
        if s.kind in ("promise", "close", "sync"):
            tag_ids.update(tokenizer.encode(s.text, add_special_tokens=False))
    weighted = [i for i, x in enumerate(w) if x == 3.0]
    assert weighted and all(seq.labels[i] in tag_ids for i in weighted)
    n_tag = sum(len(tokenizer.encode(s.text, add_special_tokens=False)) for s in segments(ann)
                if s.kind in ("promise", "close", "sync"))
    assert len(weighted) == n_tag
    plain, w1 = build_weighted(tokenizer, "Tips?", ann, policy, tokenizer.eos_token_id)[0]
    assert plain.labels == seq.labels and set(w1) == {1.0}
    logits = torch.randn(1, len(seq.labels), len(tokenizer))
    labels = torch.tensor([seq.labels])
    keep = labels[0] != IGNORE
    ce = torch.nn.functional.cross_entropy(logits[0][keep], labels[0][keep], reduction="none")
    wt = torch.tensor(w)[keep]
    torch.testing.assert_close(weighted_loss(logits, labels, torch.tensor([w])), (ce * wt).sum() / wt.sum())


@pytest.mark.parametrize("flags, message", [({"init_adapter": "some/adapter"}, "--init-adapter continues"),
                                            ({"tag_tokens": True}, "--tag-tokens trains")])
def test_full_fine_tuning_refuses_lora_only_options_before_any_work(tmp_path, tokenizer, flags, message):
    """--full with --init-adapter or --tag-tokens is refused first: before the model's vocabulary is touched and
    before the data is read (the data file here does not exist)."""
    from pastalm.train.sft import SFTConfig, train_sft

    model = tiny_model("qwen2")
    rows = model.get_input_embeddings().weight.shape[0]
    cfg = SFTConfig(data=str(tmp_path / "missing.jsonl"), output=str(tmp_path / "out"), full=True, **flags)
    with pytest.raises(ValueError, match=message):
        train_sft(model, tokenizer, cfg)
    assert model.get_input_embeddings().weight.shape[0] == rows  # no rows were added for tags
