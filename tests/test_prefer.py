"""Stage 2 (BoNBoN): the loss against hand computation, pair building, one tiny round, and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pastalm.eval.judges import Verdict
from pastalm.lang.layout import IGNORE
from pastalm.train import prefer as prefer_module
from pastalm.train.prefer import PreferConfig, bonbon_loss, build_pairs, ipo_logps, run_prefer, sequence_logps


def test_bonbon_loss_by_hand():
    # pair 1: h = (-10 - -11) - (-12 - -11) = 2; target 1/(2*0.25) = 2 -> IPO 0; loss = 0.5 * 2.0 = 1.0
    # pair 2: h = (-5 - -5) - (-6 - -5) = 1; IPO (1 - 2)^2 = 1; loss = 0.5 * 3.0 + 0.5 * 1 = 2.0
    loss = bonbon_loss(torch.tensor([-10.0, -5.0]), torch.tensor([-12.0, -6.0]), torch.tensor([-11.0, -5.0]),
                       torch.tensor([-11.0, -5.0]), torch.tensor([2.0, 3.0]), alpha=0.5, beta=0.25)
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2)
    # alpha 1: likelihood only; alpha 0: IPO only
    one = bonbon_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                      torch.tensor([1.5]), alpha=1.0, beta=0.5)
    zero = bonbon_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                       torch.tensor([1.5]), alpha=0.0, beta=0.5)
    assert one.item() == pytest.approx(1.5) and zero.item() == pytest.approx(1.0)


def test_sequence_logps_sum_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, IGNORE, 3, IGNORE], [IGNORE, IGNORE, IGNORE, 4]])
    total, nll = sequence_logps(logits, labels)
    lp = torch.log_softmax(logits, -1)
    assert total[0].item() == pytest.approx((lp[0, 0, 1] + lp[0, 2, 3]).item(), abs=1e-6)
    assert total[1].item() == pytest.approx(lp[1, 3, 4].item(), abs=1e-6)
    assert nll[0].item() == pytest.approx(-total[0].item() / 2, abs=1e-6)
    mean, _ = ipo_logps(logits, labels, "mean")  # the IPO term's log-probability: per token, or summed
    assert mean.tolist() == pytest.approx([(lp[0, 0, 1] + lp[0, 2, 3]).item() / 2, lp[1, 3, 4].item()], abs=1e-6)
    assert torch.equal(ipo_logps(logits, labels, "sum")[0], total)
    with pytest.raises(ValueError, match="ipo_norm"):
        PreferConfig(output="x", from_adapter="pasta", ipo_norm="avg")


def s(pid, k, speed, quality, valid=True, raw=None):
    return {"id": pid, "prompt": f"prompt {pid}", "sample": k, "theoretical_speedup": speed, "quality": quality,
            "valid": valid, "raw": raw if raw is not None else f"{pid}-{k}"}


def test_pairs_best_against_worst_with_ties_and_invalid_samples():
    samples = [
        s("a", 0, 1.0, 0.9), s("a", 1, 2.0, 0.5), s("a", 2, 3.0, 0.1, valid=False),  # invalid: loses, never wins
        s("b", 0, 1.5, 0.5), s("b", 1, 1.5, 0.5),  # a tie: skipped
        s("c", 0, 4.0, 0.9, valid=False), s("c", 1, 3.0, 0.9, valid=False),  # no valid sample: skipped
        s("d", 0, 1.2, 0.7),  # one sample: skipped
        s("e", 0, 1.0, 0.4, raw="same"), s("e", 1, 1.0, 0.6, raw="same"),  # same text: skipped as a tie
    ]
    pairs, st = build_pairs(samples, lam=1.0)
    assert [(p["id"], p["winner_sample"], p["loser_sample"]) for p in pairs] == [("a", 1, 2)]
    assert st == {"prompts": 5, "pairs": 1, "skipped_tie": 2, "skipped_no_valid": 1, "skipped_single": 1,
                  "invalid_samples": 3}
    # with lambda = 4 quality weighs more: a/0 (1.0 + 3.6 = 4.6) beats a/1 (2.0 + 2.0 = 4.0)
    pairs, _ = build_pairs(samples, lam=4.0)
    assert pairs[0]["winner_sample"] == 0
    # lambda = inf: quality first, speed breaks ties
    pairs, _ = build_pairs([s("x", 0, 1.0, 0.8), s("x", 1, 3.0, 0.8), s("x", 2, 5.0, 0.2)], lam=math.inf)
    assert (pairs[0]["winner_sample"], pairs[0]["loser_sample"]) == (1, 2)


class LengthJudge:
    """A deterministic stand-in judge for the tiny model's random text: quality from the answer's length."""

    name, pairwise = "length", False

    def judge(self, instruction, reference, candidate):
        return Verdict((len(candidate.text) % 11) / 10, {})


@pytest.fixture
def tiny_setup(tmp_path):
    from peft import LoraConfig, get_peft_model

    from pastalm.testing import tiny_model, tiny_tokenizer

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    tok = tiny_tokenizer()
    tok.save_pretrained(folder)
    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "stage1")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "category": "tips"}) + "\n"
                               for i, p in enumerate(["Give tips.", "List fruits.", "Compare cats and dogs."])))
    return folder, tmp_path / "stage1", prompts


@pytest.mark.parametrize("layout", ["reserve", "linear"])
def test_one_tiny_round_trains_and_resumes(tiny_setup, tmp_path, monkeypatch, layout):
    from safetensors.torch import load_file, save_file

    folder, stage1, prompts = tiny_setup
    cfg = PreferConfig(output=str(tmp_path / "out"), from_adapter=str(stage1), prompts=str(prompts),
                       baseline_adapter="none", model=str(folder), dtype="fp32", samples=3, lambdas=[1.0],
                       rounds=1, temperature=1.0, top_p=1.0, max_new_tokens=16, batch_requests=9, lr=1e-2,
                       batch_size=1, grad_accum=1, layout=layout)
    stats = run_prefer(cfg, progress=False, judge=LengthJudge())
    st = stats["lambda-1/round-1"]
    assert st["pairs"] >= 1 and st["steps"] == st["pairs"] and all(math.isfinite(x) for x in st["last_losses"])
    out = tmp_path / "out"
    samples = [json.loads(line) for line in (out / "round-1-samples.jsonl").read_text().splitlines()]
    assert len(samples) == 9 and {x["sample"] for x in samples} == {0, 1, 2}
    pairs = [json.loads(line) for line in (out / "lambda-1" / "round-1" / "pairs.jsonl").read_text().splitlines()]
    by_sample = {(x["id"], x["sample"]): x for x in samples}  # each side is trained on its own decode's trace
    assert pairs and all(p["winner_trace"] == by_sample[(p["id"], p["winner_sample"])]["trace"] for p in pairs)
    assert len({x["raw"] for x in samples if x["id"] == "p0"}) > 1  # different seeds, different answers
    before = load_file(str(stage1 / "adapter_model.safetensors"))
    after = load_file(str(out / "lambda-1" / "round-1" / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every LoRA weight moved
    round_log = json.loads((out / "lambda-1" / "round-1" / "round.json").read_text())
    assert len(round_log["history"]) == st["steps"] and "loss" in round_log["history"][0]
    made = json.loads((out / "lambda-1" / "round-1" / "adapter" / "pasta_prefer.json").read_text())
    assert made["config"]["lambdas"] == ["1"] and made["round"] == st
    table = (out / "report.md").read_text().splitlines()
    assert len(table) == 3 and table[2].startswith(f"| 1 | 1 | {st['pairs']} | ")

    # resuming: nothing is sampled or trained again
    def boom(*a, **k):
        raise AssertionError("resumed run redid work")

    monkeypatch.setattr(prefer_module, "train_pairs", boom)
    monkeypatch.setattr(prefer_module, "sample_answers", boom)
    monkeypatch.setattr(prefer_module, "reference_answers", lambda *a, **k: {})
    assert run_prefer(cfg, progress=False, judge=LengthJudge()) == stats
    # other settings in the same folder are refused
    cfg.temperature = 0.5
    with pytest.raises(ValueError, match="other settings"):
        run_prefer(cfg, progress=False, judge=LengthJudge())
    # so is the same --from name pointing at other weights (as when a new 'pasta' adapter is shipped)
    cfg.temperature = 1.0
    w = load_file(str(stage1 / "adapter_model.safetensors"))
    save_file({k: v + 1 for k, v in w.items()}, str(stage1 / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="other weights"):
        run_prefer(cfg, progress=False, judge=LengthJudge())


def test_greedy_candidate_is_the_greedy_answer(tmp_path):
    """With greedy_candidate, sample 0 of every prompt is exactly what greedy decoding (pasta eval, the server)
    gives, batched with the sampled ones; the other samples stay seeded temperature samples."""
    from pastalm.engine import Engine, GenerateConfig
    from pastalm.models import chat_prompt
    from pastalm.testing import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    engine = Engine(tiny_model("llama").eval(), tok, "tiny")
    prompts = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(["Give tips.", "List fruits."])]
    refs = {p["id"]: {"answer": "x", "pieces": []} for p in prompts}
    cfg = PreferConfig(output=str(tmp_path), from_adapter="x", samples=3, temperature=1.0, top_p=1.0,
                       greedy_candidate=True, max_new_tokens=12, batch_requests=6)
    rows = prefer_module.sample_answers(engine, prompts, cfg, tmp_path / "s.jsonl", LengthJudge(), refs,
                                        progress=False)
    assert [r["greedy"] for r in rows] == [True, False, False] * 2
    for p in prompts:
        greedy = engine.generate(chat_prompt(tok, p["prompt"], None), GenerateConfig(max_new_tokens=12))
        mine = [r for r in rows if r["id"] == p["id"]]
        assert mine[0]["raw"] == greedy.raw
        sampled = engine.generate(chat_prompt(tok, p["prompt"], None),
                                  GenerateConfig(max_new_tokens=12, temperature=1.0, seed=1))
        assert mine[1]["raw"] == sampled.raw


def test_an_answers_log_probability_sums_its_rows(model, tokenizer):
    """Stage 2 batches winners and losers together; in the linear layout an answer is one row per re-laid sync.
    Each answer's log-probability from the padded, mixed batch equals the sum over its examples computed one by
    one without padding (`layout_forward`), in both layouts."""
    from pastalm.engine.reference import layout_forward
    from pastalm.train.data import LayoutCollator
    from pastalm.train.prefer import _pair_batch, pair_layouts

    p = '<promise tokens="{}"/>'
    two_syncs = ("A " + p.format(5) + "<async>alpha</async><sync/> then B " + p.format(5) + "<async>beta gamma"
                 "</async> mid " + p.format(4) + "<async>delta</async><sync/> end.")
    one_sync = "Intro: " + p.format(6) + "<async>one two</async><sync/> so main reads it."
    pairs = [{"prompt": "Tell me two things.", "winner": two_syncs, "loser": one_sync},
             {"prompt": "Hi", "winner": "Plain answer.", "loser": "List: " + p.format(6) + "<async>first</async> x"}]
    collate = LayoutCollator(tokenizer.eos_token_id, torch.float32)
    for layout, rows in (("linear", [3, 1, 2, 1]), ("reserve", [1, 1, 1, 1])):
        cfg = PreferConfig(output="x", from_adapter="pasta", layout=layout, max_length=10_000)
        items, skipped = pair_layouts(tokenizer, pairs, cfg)
        answers = [it["w"] for it in items] + [it["l"] for it in items]
        assert skipped == 0 and [len(a) for a in answers] == rows
        batch, owner = _pair_batch(collate, items, model)
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch).logits
        summed, nll = ipo_logps(logits, labels, "sum", owner)
        mean, _ = ipo_logps(logits, labels, "mean", owner)
        for a, seqs in enumerate(answers):
            total, n = 0.0, 0
            for seq in seqs:
                with torch.no_grad():
                    lp = torch.log_softmax(layout_forward(model, seq).float(), -1)
                for i, label in enumerate(seq.labels):
                    if label != IGNORE:
                        total, n = total + lp[i, label].item(), n + 1
            assert summed[a].item() == pytest.approx(total, abs=1e-3)
            assert nll[a].item() == pytest.approx(-total / n, abs=1e-5)
            assert mean[a].item() == pytest.approx(total / n, abs=1e-5)
    with pytest.raises(ValueError, match="layout"):
        PreferConfig(output="x", from_adapter="pasta", layout="diagonal")


def _slot_logits(monkeypatch):
    """Record the logits the transformers runner computed at every feed's last token, keyed by its layout slot
    (column, index in column): the key `Trace` uses for the token those logits chose."""
    from pastalm.engine.runner import SharedCache

    seen: dict[tuple[int, int], torch.Tensor] = {}
    real = SharedCache.forward

    def forward(self, feeds):
        out = real(self, feeds)
        for k, (_, f) in enumerate(feeds):
            seen[(f.span.thread, f.span.start + len(f.ids) - 1)] = out[k].float().clone()
        return out

    monkeypatch.setattr(SharedCache, "forward", forward)
    return seen


@pytest.mark.parametrize("layout", ["reserve", "linear"])
def test_the_trace_is_the_decode_as_a_training_example(model, tokenizer, monkeypatch, layout):
    """Item 15: stage 2 trains on what was sampled. The trace of a decode, as a training example, holds each
    thread's chosen token ids (a block cut by its budget gets no `</async>`; free blocks keep their sampled ids), and
    a full forward over it with the collator's mask and positions gives, at every labelled slot, the logits the
    engine decoded with: training scores exactly the answer that was sampled."""
    from pastalm.engine import Engine, GenerateConfig, scripts_for
    from pastalm.lang.layout import trace_layout
    from pastalm.models import chat_prompt
    from pastalm.train.data import LayoutCollator

    seen = _slot_logits(monkeypatch)
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    p = '<promise tokens="{}"/>'
    answer = ("Tips: " + p.format(2) + "<async>one two three four five</async> and " + p.format(3)
              + "<async>short</async><sync/> Done.")
    prompt = chat_prompt(tokenizer, "Give tips.")
    close = tokenizer.encode("</async>", add_special_tokens=False)
    open_n = len(tokenizer.encode("<async>", add_special_tokens=False))
    runs = {  # forced replay with a budget cut; a scaffold whose blocks sample freely after a forced prefix
        "forced": dict(config=GenerateConfig(layout=layout, async_cap=3, max_new_tokens=100, record_trace=True),
                       scripts=scripts_for(tokenizer, answer)),
        "sampled": dict(config=GenerateConfig(layout=layout, async_cap=6, max_new_tokens=100, temperature=1.0,
                                              seed=5, record_trace=True),
                        scripts=[scripts_for(tokenizer, answer)[0], [], []], scaffold=True),
    }
    collate = LayoutCollator(tokenizer.pad_token_id, torch.float32)
    for name, kw in runs.items():
        seen.clear()
        res = eng.generate(prompt, **kw)
        assert res.threads == 2, name
        seq = trace_layout(res.trace)
        assert sorted(zip(seq.thread, seq.index)) == sorted(set(zip(seq.thread, seq.index)))  # each slot once
        for j in (1, 2):  # blocks 1 and 2 are columns 1 and 2 in both layouts (both fork before the sync)
            got = [lab for c, i, lab in sorted(zip(seq.thread, seq.index, seq.labels)) if c == j and lab != IGNORE]
            chosen = res.token_ids[j][open_n:]
            if res.finish[j] == "eos":
                chosen = chosen + [tokenizer.eos_token_id]
            assert got == chosen, (name, j)
        assert res.finish[1] == "budget" and res.token_ids[1][-len(close):] != close  # no </async> it never wrote
        batch = collate([{"layout": seq}])
        assert batch["labels"][0].tolist() == seq.labels
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"]).logits[0]
        labelled = [(k, (c, i)) for k, (c, i, lab) in enumerate(zip(seq.thread, seq.index, seq.labels))
                    if lab != IGNORE]
        assert len(labelled) >= 10
        for k, slot in labelled:
            torch.testing.assert_close(logits[k], seen[slot], atol=2e-4, rtol=1e-4)
