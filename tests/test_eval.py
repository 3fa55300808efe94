"""`pasta eval`: win-rate arithmetic, judges (a real local HTTP endpoint for the openai one), the proxy judge,
Skeleton-of-Thought (point parsing, expansion through the fork machinery against a full forward), and the
command end to end with resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.engine.reference import layout_forward
from pastalm.eval import sot as sot_module
from pastalm.eval.judges import (
    Answer,
    HFJudge,
    OpenAIJudge,
    PairwiseJudge,
    ProxyJudge,
    chunks_of,
    lc_win_rate,
    looping,
    parse_verdict,
    win_rate,
)
from pastalm.eval.sot import parse_points, sot_generate
from pastalm.lang import ReservePolicy
from pastalm.lang.layout import Layout, SequenceLayout
from pastalm.lang.tags import promise_tag
from pastalm.models import chat_prompt

# -- arithmetic ----------------------------------------------------------------------------------------------------


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.0, 0.5, 1.0]) == {"n": 4, "win_rate": 0.625, "wins": 2, "ties": 1, "losses": 1}
    assert win_rate([0.75, 0.25])["win_rate"] == 0.5
    assert math.isnan(win_rate([])["win_rate"])


def test_lc_win_rate_without_length_difference_is_the_win_rate():
    scores = [1, 1, 0, 0.5, 1]
    r = lc_win_rate(scores, [10] * 5, [10] * 5)
    assert r["lc_win_rate"] == pytest.approx(0.7)
    assert r["theta"][0] == pytest.approx(math.log(0.7 / 0.3))


def test_lc_win_rate_removes_a_pure_length_effect():
    """8 answers longer than the reference win 6 of 8; 4 shorter ones win 1 of 4. Raw win rate 7/12; the
    two-group logistic model is saturated, so theta_0 = (logit .75 + logit .25) / 2 = 0: LC win rate 0.5, and
    theta_1 = logit(.75) / tanh(10 / std(d))."""
    scores = [1] * 6 + [0] * 2 + [1] + [0] * 3
    cand = [110] * 8 + [90] * 4
    ref = [100] * 12
    assert win_rate(scores)["win_rate"] == pytest.approx(7 / 12)
    r = lc_win_rate(scores, cand, ref)
    d = torch.tensor([10.0] * 8 + [-10.0] * 4)
    sd = float(d.std(unbiased=False))
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)
    assert r["theta"][1] == pytest.approx(math.log(3) / math.tanh(10 / sd), rel=1e-6)


def test_lc_win_rate_keeps_a_preference_that_is_not_length():
    """Same lengths pattern, but the candidate wins 3 of 4 in both groups: LC = raw = 0.75."""
    scores = [1, 1, 1, 0] * 2 + [1, 1, 1, 0]
    r = lc_win_rate(scores, [110] * 8 + [90] * 4, [100] * 12)
    assert r["lc_win_rate"] == pytest.approx(0.75, abs=1e-6)
    assert r["theta"][1] == pytest.approx(0.0, abs=1e-6)


class FixedJudge(PairwiseJudge):
    """P(first better) = quality of the first answer vs the second, plus a position bias."""

    def __init__(self, bias: float, good: str = "GOOD"):
        self.bias = bias
        self.good = good

    def prob_first(self, instruction, first, second):
        base = 0.5 + 0.3 * ((self.good in first) - (self.good in second))
        return min(1.0, max(0.0, base + self.bias)), {}


def test_both_orders_cancel_position_bias():
    ref, same, better = Answer("plain answer"), Answer("another plain answer"), Answer("GOOD answer")
    assert FixedJudge(0.3).judge("q", ref, same).score == pytest.approx(0.5)  # pure bias: a tie
    assert FixedJudge(-0.2).judge("q", ref, same).score == pytest.approx(0.5)
    # with a real preference the bias still cancels: first order 0.8 + 0.15, second order 1 - (0.2 + 0.15)
    v = FixedJudge(0.15).judge("q", ref, better)
    assert v.score == pytest.approx(0.8)
    assert v.details["candidate_first"] == pytest.approx(0.95) and v.details["candidate_second"] == pytest.approx(0.65)


@pytest.mark.parametrize("reply, want", [("A", 1.0), ("B", 0.0), (" b.", 0.0), ("Answer A is better", 1.0),
                                         ("(B)", 0.0), ("Neither", None), ("", None)])
def test_parse_verdict(reply, want):
    assert parse_verdict(reply) == want


# -- the openai judge against a real local endpoint -----------------------------------------------------------------

fastapi = pytest.importorskip("fastapi")
from fastapi import FastAPI, Request  # noqa: E402


def judge_app(requests: list[dict]):
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        requests.append(body)
        user = body["messages"][-1]["content"]
        first = user.split("## Answer A\n", 1)[1].split("## Answer B\n", 1)[0]
        letter = "A" if (body["model"] == "biased" or "GOOD" in first) else "B"
        choice = {"index": 0, "message": {"role": "assistant", "content": letter}, "finish_reason": "stop"}
        if body["model"] == "soft":  # log-probabilities: 0.9 on the letter it picks
            other = "B" if letter == "A" else "A"
            choice["logprobs"] = {"content": [{"token": letter, "logprob": math.log(0.9), "bytes": None,
                                               "top_logprobs": [
                                                   {"token": letter, "logprob": math.log(0.9), "bytes": None},
                                                   {"token": other, "logprob": math.log(0.1), "bytes": None}]}]}
        return {"id": "j", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [choice],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


@pytest.fixture(scope="module")
def judge_server():
    from pastalm.testing import local_server

    requests: list[dict] = []
    with local_server(judge_app(requests)) as url:
        yield f"{url}/v1", requests


def test_openai_judge_over_http(judge_server, monkeypatch):
    url, requests = judge_server
    monkeypatch.setenv("PASTA_TEST_JUDGE_KEY", "sk-test")
    ref, cand = Answer("a plain answer"), Answer("a GOOD answer")
    v = OpenAIJudge(url, "content", "PASTA_TEST_JUDGE_KEY").judge("Say something.", ref, cand)
    assert v.score == 1.0
    # asked twice, candidate first then second, with the AlpacaEval-style prompt
    firsts = [r["messages"][-1]["content"].split("## Answer A\n")[1].split("\n")[0] for r in requests[-2:]]
    assert firsts == ["a GOOD answer", "a plain answer"]
    assert all(r["temperature"] == 0 and "Say something." in r["messages"][-1]["content"] for r in requests[-2:])
    assert OpenAIJudge(url, "content").judge("q", cand, ref).score == 0.0
    assert OpenAIJudge(url, "biased").judge("q", ref, cand).score == 0.5  # "always A" cancels out
    assert OpenAIJudge(url, "soft").judge("q", ref, cand).score == pytest.approx(0.9)


# -- the hf judge --------------------------------------------------------------------------------------------------


def test_hf_judge_reads_the_two_letter_probabilities(model, tokenizer):
    judge = HFJudge(model, tokenizer)
    p, d = judge.prob_first("Give tips.", "Sleep early.", "Eat well.")
    from pastalm.eval.judges import JUDGE_PROMPT, JUDGE_SYSTEM

    ids = chat_prompt(tokenizer, JUDGE_PROMPT.format(instruction="Give tips.", first="Sleep early.",
                                                     second="Eat well."), JUDGE_SYSTEM)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    a, b = tokenizer.encode("A", add_special_tokens=False)[0], tokenizer.encode("B", add_special_tokens=False)[0]
    want = torch.softmax(torch.stack([logits[a], logits[b]]), 0)[0].item()
    assert p == pytest.approx(want, abs=1e-5)
    v = judge.judge("Give tips.", Answer("Eat well."), Answer("Sleep early."))
    assert v.score == pytest.approx((p + 1 - judge.prob_first("Give tips.", "Eat well.", "Sleep early.")[0]) / 2)


# -- the proxy judge -----------------------------------------------------------------------------------------------

ITEMS = ["1. Keep a fixed bedtime and wake time, even on weekends.",
         "2. Put your phone away an hour before you go to bed.",
         "3. Avoid coffee and tea after lunch."]
CLEAN = "Here are three tips:\n\n" + "\n\n".join(ITEMS)


def pieces(*chunks: tuple[str, str]) -> list[dict]:
    return [{"thread": i, "text": t, "finish": f} for i, (t, f) in enumerate(chunks)]


@pytest.fixture(scope="module")
def proxy():
    return ProxyJudge()


def test_proxy_judge_penalizes_duplicated_and_truncated_chunks(proxy):
    ref = Answer(CLEAN)
    clean = Answer(CLEAN, pieces(("Here are three tips:\n\n", "eos"), (ITEMS[0] + "\n\n", "close"),
                                 (ITEMS[1] + "\n\n", "close"), (ITEMS[2], "close")))
    dup_text = "Here are three tips:\n\n" + ITEMS[0] + "\n\n" + ITEMS[1] + "\n\n" + ITEMS[1].replace("2.", "3.")
    dup = Answer(dup_text, pieces(("Here are three tips:\n\n", "eos"), (ITEMS[0] + "\n\n", "close"),
                                  (ITEMS[1] + "\n\n", "close"), (ITEMS[1].replace("2.", "3."), "close")))
    cut = ITEMS[1][:24]
    trunc = Answer("Here are three tips:\n\n" + ITEMS[0] + "\n\n" + cut + "\n\n" + ITEMS[2],
                   pieces(("Here are three tips:\n\n", "eos"), (ITEMS[0] + "\n\n", "close"), (cut + "\n\n", "budget"),
                          (ITEMS[2], "close")))
    s_clean, s_dup, s_trunc = (proxy.judge("Tips?", ref, a) for a in (clean, dup, trunc))
    assert s_clean.score > 0.95 and s_clean.details["repetition"] == 0 and s_clean.details["degenerate"] == 0
    assert s_dup.details["repetition"] > 0 and s_dup.score < s_clean.score - 0.2
    assert s_trunc.details["truncated_chunks"] == 1 and s_trunc.score < s_clean.score - 0.2
    # the same text with no pieces is one chunk per paragraph, none truncated
    assert proxy.judge("Tips?", ref, Answer(CLEAN)).score == pytest.approx(s_clean.score, abs=1e-6)


def test_proxy_parts():
    assert looping("the cat sat on the mat " * 6)
    assert not looping(CLEAN)
    ch = chunks_of(Answer("x", pieces(("a\n\nb", "budget"), ("", "close"))))
    assert [(c["text"], c["truncated"], c["empty"]) for c in ch] == [("a", False, False), ("b", True, False),
                                                                     ("", False, True)]


# -- Skeleton-of-Thought -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skeleton, want", [
    ("1. Sleep early\n2. Eat well\n3. Exercise", ["Sleep early", "Eat well", "Exercise"]),
    ("Sure! Here is the skeleton:\n\n1) **Sleep** early.\n2) Eat well:\n\nHope this helps!",
     ["Sleep early.", "Eat well"]),
    ("- Sleep\n* Eat\n• Move\n+ Rest", ["Sleep", "Eat", "Move", "Rest"]),
    ("Step 1: Preheat oven\nStep 2: Mix flour\n(3) Bake", ["Preheat oven", "Mix flour", "Bake"]),
    ("1. Sleep\n1. Sleep\n2.\n3. Eat", ["Sleep", "Eat"]),  # repeats and empty items dropped
    ("No list here, just prose about sleeping.", []),
    ("1. " + " ".join(["word"] * 30), [" ".join(["word"] * 12)]),
    ("**1. Plan ahead**\n**2. Stay calm**", ["Plan ahead", "Stay calm"]),
])
def test_parse_points_on_messy_skeletons(skeleton, want):
    assert parse_points(skeleton) == want


def test_parse_points_stops_at_max():
    assert parse_points("\n".join(f"{i}. point {i}" for i in range(1, 20)), max_points=5) == [
        f"point {i}" for i in range(1, 6)]


def test_scaffold_expansion_matches_full_forward(model, tokenizer):
    """SoT's expansion: main's promises are written in one step, each block starts with its forced header and
    then decodes freely; every logit equals one full forward over the same layout (blocks see main's script,
    never each other)."""
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    prompt = chat_prompt(tokenizer, "Expand the points.")
    script = tokenizer.encode(promise_tag("p1", 6) + promise_tag("p2", 6), add_special_tokens=False)
    heads = [tokenizer.encode("1. Sleep:", add_special_tokens=False),
             tokenizer.encode("\n2. Eat:", add_special_tokens=False)]
    cfg = GenerateConfig(max_new_tokens=200, record_logits=True)
    res = eng.generate(prompt, cfg, scripts=[script] + heads, scaffold=True)
    assert res.threads == 2 and res.mode == "scaffold-async"
    open_ids = tokenizer.encode("<async>", add_special_tokens=False)
    for k in (1, 2):
        toks = res.token_ids[k]
        assert toks[: len(open_ids) + len(heads[k - 1])] == open_ids + heads[k - 1]
        assert len(toks) > len(open_ids) + len(heads[k - 1])  # it went on decoding after its header
    assert res.token_ids[0] == script
    # reference: the same layout built by hand, one full forward
    lay, seq = Layout(ReservePolicy.for_tokenizer(tokenizer, 1.0)), SequenceLayout(input_ids=[])

    def add(thread, ids):
        span = lay.append(thread, len(ids))
        seq.spans.append(span)
        seq.input_ids.extend(ids)
        seq.thread.extend([thread] * len(ids))
        seq.index.extend(range(span.start, span.start + len(ids)))
        seq.positions.extend(span.positions)

    add(0, prompt + script)
    tids = [lay.fork(6), lay.fork(6)]
    for k, tid in enumerate(tids, start=1):
        add(tid, res.token_ids[k])
    ref = layout_forward(model, seq)
    where = {(t, i): j for j, (t, i) in enumerate(zip(seq.thread, seq.index))}
    block_rows = [key for key in res.logits if key[0] > 0]
    assert len(block_rows) >= sum(len(res.token_ids[k]) for k in (1, 2)) - 2 * len(open_ids)
    for key, row in res.logits.items():
        torch.testing.assert_close(row, ref[where[key]], atol=2e-5, rtol=1e-4)
    # main's script took one decode step, not one per token
    assert res.decode_steps <= 1 + max(len(res.token_ids[k]) for k in (1, 2)) + 1


def test_sot_generate_assembles_points_in_order(model, tokenizer, monkeypatch):
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    monkeypatch.setattr(sot_module, "parse_points", lambda text, n: ["Sleep early", "Eat well", "Move daily"])
    r = sot_generate(eng, "Give three tips.", GenerateConfig(max_new_tokens=120), point_tokens=8)
    assert not r.fallback and r.threads == 3 and r.points == ["Sleep early", "Eat well", "Move daily"]
    i1, i2, i3 = (r.text.index(h) for h in ("1. Sleep early:", "\n2. Eat well:", "\n3. Move daily:"))
    assert i1 == 0 and i1 < i2 < i3
    assert [p["text"] for p in r.pieces] and "".join(p["text"] for p in r.pieces).strip() == r.text
    assert r.theoretical_speedup > 1.0 and r.wall_s >= r.skeleton_wall_s
    assert "<promise" not in r.text


def test_sot_without_points_falls_back_to_sequential(model, tokenizer, monkeypatch):
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    monkeypatch.setattr(sot_module, "parse_points", lambda text, n: [])
    cfg = GenerateConfig(max_new_tokens=30)
    r = sot_generate(eng, "What is 2+2?", cfg)
    ref = eng.generate(chat_prompt(tokenizer, "What is 2+2?"), GenerateConfig(max_new_tokens=30, sequential=True))
    assert r.fallback and r.threads == 0 and r.text == ref.text


# -- the command end to end ----------------------------------------------------------------------------------------


PROMPTS = [{"id": "t1", "prompt": "Give three tips to sleep better.", "category": "tips"},
           {"id": "a1", "prompt": "What is 2+2?", "category": "arithmetic"},
           {"id": "c1", "prompt": "Compare apples and oranges.", "category": "comparison"}]


def test_pasta_eval_end_to_end_and_resume(folder, tmp_path, capsys, monkeypatch):
    from pastalm.cli import main

    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    argv = ["eval", "--prompts", str(src), "--out", str(out), "--model", str(folder), "--max-new-tokens", "24",
            "--sot-skeleton-tokens", "16", "--quiet"]
    assert main(argv) == 0
    for name in ("results.jsonl", "judgments.jsonl", "summary.json", "report.md", "pareto.png", "run.json",
                 "alpaca_eval/sequential.json", "alpaca_eval/pasta.json", "alpaca_eval/sot.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["mode"]) for r in rows) == sorted((p["id"], m) for p in PROMPTS
                                                                for m in ("sequential", "pasta", "sot", "reference"))
    for r in rows:
        assert {"answer", "raw", "tokens", "tag_tokens", "decode_steps", "threads", "wall_s", "limits_hit"} <= set(r)
    summary = json.loads((out / "summary.json").read_text())
    per = summary["groups"]["all"]
    assert per["sequential"]["wall_speedup_gmean"] == pytest.approx(1.0)
    assert set(per) == {"sequential", "pasta", "sot", "reference"} and all(s["prompts"] == 3 for s in per.values())
    assert summary["groups"]["parallel"]["pasta"]["prompts"] == 2
    # judged against the reference mode (here the same weights as sequential, so the same greedy answers)
    assert summary["reference_mode"] == "reference"
    assert per["sequential"]["judged"] == 3 and per["sequential"]["content"] == pytest.approx(1.0, abs=1e-4)
    assert "judged" not in per["reference"]
    alpaca = json.loads((out / "alpaca_eval" / "pasta.json").read_text())
    assert [a["instruction"] for a in alpaca] == [p["prompt"] for p in PROMPTS]
    assert set(alpaca[0]) == {"instruction", "output", "generator", "dataset"}
    assert "| wall-clock speedup (gmean) |" in (out / "report.md").read_text()
    before = (out / "results.jsonl").read_text(), (out / "judgments.jsonl").read_text()

    # a second run redoes nothing: generating or judging anything now would fail
    def boom(*a, **k):
        raise AssertionError("resumed run generated again")

    monkeypatch.setattr(Engine, "generate", boom)
    monkeypatch.setattr(ProxyJudge, "judge", boom)
    assert main(argv) == 0
    assert ((out / "results.jsonl").read_text(), (out / "judgments.jsonl").read_text()) == before
    capsys.readouterr()
    # other settings in the same folder are refused
    assert main(argv[:-1] + ["--temperature", "0.7", "--quiet"]) == 2
    assert "other settings (generate.temperature)" in capsys.readouterr().err
    # a folder made before a setting existed resumes when the run uses that setting's default, and only then
    run = json.loads((out / "run.json").read_text())
    del run["generate"]["max_promises"]
    (out / "run.json").write_text(json.dumps(run))
    assert main(argv) == 0
    assert main(argv[:-1] + ["--max-promises", "3", "--quiet"]) == 2
    assert "other settings (generate.max_promises)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--modes", "pasta,fast"], "unknown mode(s) fast"),
    (["--modes", "pasta"], "must include 'sequential'"),
    (["--judge", "openai"], "--judge openai needs --judge-url"),
])
def test_eval_bad_settings_are_one_clear_line(folder, tmp_path, capsys, extra, message):
    from pastalm.cli import main

    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(PROMPTS[0]) + "\n")
    assert main(["eval", "--prompts", str(src), "--out", str(tmp_path / "o"), "--model", str(folder), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_several_adapters_are_one_mode_each(folder, tmp_path, capsys):
    """A frontier in one run: --adapter LABEL=A,LABEL=B gives modes pasta:LABEL, each with its own model."""
    from peft import LoraConfig, get_peft_model

    from pastalm.cli import main
    from pastalm.testing import tiny_model

    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=512, target_modules=["v_proj", "o_proj"],
                                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps(PROMPTS[0]) + "\n")
    out = tmp_path / "out"
    assert main(["eval", "--prompts", str(src), "--out", str(out), "--model", str(folder), "--modes",
                 "sequential,pasta", "--adapter", f"plain=none,tuned={tmp_path / 'lora'}", "--judge", "none",
                 "--max-new-tokens", "12", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["mode"] for r in rows) == ["pasta:plain", "pasta:tuned", "sequential"]
    by = {r["mode"]: r for r in rows}
    assert by["pasta:plain"]["answer"] == by["sequential"]["answer"]  # same weights, greedy, nothing forked
    assert by["pasta:tuned"]["model"].endswith("+lora") and by["pasta:tuned"]["answer"] != by["sequential"]["answer"]
    per = json.loads((out / "summary.json").read_text())["groups"]["all"]
    assert set(per) == {"sequential", "pasta:plain", "pasta:tuned"}
    assert sorted(p.name for p in (out / "alpaca_eval").iterdir()) == ["pasta-plain.json", "pasta-tuned.json",
                                                                       "sequential.json"]


# -- the speed/quality frontier ------------------------------------------------------------------------------------


def test_pareto_front_and_fastest_at_quality(tmp_path):
    from pastalm.eval.harness import _points, fastest_at_quality, pareto_front, pareto_png, report_md

    per = {"sequential": {"quality": 0.80, "prompts": 4},
           "pasta:stage1": {"wall_speedup_gmean": 1.8, "quality": 0.40, "prompts": 4},
           "pasta:a": {"wall_speedup_gmean": 1.9, "quality": 0.45, "prompts": 4},  # beats stage1 on both
           "pasta:b": {"wall_speedup_gmean": 1.5, "quality": 0.60, "prompts": 4},  # slower, better
           "pasta:c": {"wall_speedup_gmean": 1.4, "quality": 0.55, "prompts": 4},  # dominated by b
           "pasta:d": {"wall_speedup_gmean": 1.9, "quality": 0.30, "prompts": 4},  # tie in speed with a, worse
           "pasta:e": {"wall_speedup_gmean": 2.5, "quality": float("nan"), "prompts": 4}}  # not judged: left out
    pts = _points(per)
    assert "pasta:e" not in pts and pts["sequential"] == (1.0, 0.80)
    assert pareto_front(pts) == ["sequential", "pasta:b", "pasta:a"]
    assert fastest_at_quality(per, "pasta:stage1") == "pasta:a"
    # stage1 itself wins when nothing at its quality is faster
    assert fastest_at_quality({**per, "pasta:a": {**per["pasta:a"], "quality": 0.39}}, "pasta:stage1") == "pasta:stage1"
    assert fastest_at_quality(per, "pasta:missing") is None

    summary = {"timestamp": "t", "judge": "proxy", "groups": {"all": per},
               "machine": {"machine": "m", "processor": "p", "threads": 2, "torch": "x"},
               "config": {"modes": list(per), "generate": {"max_new_tokens": 8, "temperature": 0.0,
                                                          "max_threads": 8, "async_factor": 1.0}}}
    md = report_md(summary)
    assert "| all | `sequential`, `pasta:b`, `pasta:a` | `pasta:a` |" in md
    pareto_png(summary, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_paired_bootstrap():
    from pastalm.eval.speed import geomean, paired_bootstrap

    # every prompt twice as fast and 0.1 better: no spread, so the interval is the point
    s = paired_bootstrap([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], [0.5, 0.2, 0.7], [0.6, 0.3, 0.8])
    assert s["speed_ratio"] == pytest.approx(2.0) and s["speed_ratio_ci"] == pytest.approx([2.0, 2.0])
    assert s["quality_diff"] == pytest.approx(0.1) and s["quality_diff_ci"] == pytest.approx([0.1, 0.1])
    # spread: the point estimate is the geometric mean of the per-prompt ratios, inside its interval
    ref, mode = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 1.0, 3.0, 1.0, 4.0]
    s = paired_bootstrap(ref, mode, [0.0] * 5, [0.1, -0.1, 0.0, 0.2, 0.0], n_boot=500)
    assert s["speed_ratio"] == pytest.approx(geomean([r / m for r, m in zip(ref, mode)]))
    assert s["speed_ratio_ci"][0] < s["speed_ratio"] < s["speed_ratio_ci"][1]
    assert s["quality_diff_ci"][0] < 0.04 < s["quality_diff_ci"][1]
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0], [1.0, 2.0], [0.0], [0.0])


# -- fair quality: the reference and sample modes, per-mode options --------------------------------------------------


def test_every_mode_is_judged_against_the_reference(folder, tmp_path):
    """With a `reference` mode, sequential is judged like every other mode (not against itself); `sample` is a
    second, sampled sequential answer whose paired difference is the noise floor; `LABEL=A?opt=v` decodes that
    PASTA mode with its own options."""
    from peft import LoraConfig, get_peft_model

    from pastalm.cli import main
    from pastalm.testing import tiny_model

    lora = get_peft_model(tiny_model("llama"), LoraConfig(r=4, lora_alpha=512, target_modules=["v_proj", "o_proj"],
                                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "out"
    assert main(["eval", "--prompts", str(src), "--out", str(out), "--model", str(folder), "--modes",
                 "sequential,pasta,reference,sample", "--adapter", "p=none,g=none?max_promises=1&repeat_guard=true",
                 "--reference-adapter", str(tmp_path / "lora"), "--max-new-tokens", "16", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    by = {(r["id"], r["mode"]): r for r in rows}
    assert {m for _, m in by} == {"sequential", "pasta:p", "pasta:g", "reference", "sample"}
    assert any(by[(p["id"], "sample")]["answer"] != by[(p["id"], "sequential")]["answer"] for p in PROMPTS)
    assert by[("t1", "reference")]["model"].endswith("+lora")
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert {j["ref"] for j in judgments} == {"reference"}
    assert sorted({j["mode"] for j in judgments}) == ["pasta:g", "pasta:p", "sample", "sequential"]
    summary = json.loads((out / "summary.json").read_text())
    per = summary["groups"]["all"]
    assert per["sequential"]["content"] < 0.999  # a different model's answer: content is measured, not 1
    assert summary["config"]["mode_options"] == {"pasta:g": {"max_promises": 1, "repeat_guard": True}}
    assert json.loads((out / "run.json").read_text())["mode_options"]["pasta:g"] == {"max_promises": 1,
                                                                                    "repeat_guard": True}
    noise = per["sample"]["vs_sequential"]
    assert noise["prompts"] == 3 and noise["quality_diff_ci"][0] <= noise["quality_diff"] <= noise["quality_diff_ci"][1]
    for mode in per:
        assert set(per[mode]["defects"]) >= {"tag_leak", "runaway", "glued", "numbering", "duplicate_items", "any"}
    report = (out / "report.md").read_text()
    assert "## Against the sequential baseline" in report and "Noise floor" in report
    assert "| `pasta:g` | tag leaks |" in report


def test_adapter_options_are_checked():
    from pastalm.cli import _adapter_options

    assert _adapter_options("a=x?repeat_guard=0&max_promises=3,b=y") == {
        "a": ("x", {"repeat_guard": False, "max_promises": 3}), "b": ("y", {})}
    with pytest.raises(ValueError, match="unknown decoding option 'speed'"):
        _adapter_options("a=x?speed=9")
    with pytest.raises(ValueError, match="max_promises='many'"):
        _adapter_options("a=x?max_promises=many")


# -- visible defects ---------------------------------------------------------------------------------------------

from pastalm.eval.defects import (  # noqa: E402
    DEFECTS, cut_chunks, defects, duplicate_items, empty_items, glued, numbering_broken, runaway, tag_leak)


def test_defects_on_the_answers_of_issue_13():
    """The defects the issue quotes are found, and a clean answer has none."""
    assert tag_leak('...can help improve<promise topic="improved" tokens="50')
    assert tag_leak('...can help improve topic="improved" tokens="50')
    assert not tag_leak("Use <b>bold</b> and a < b.")
    assert glued("...with a deli.2. **Buy Used Items:** Look", [])
    assert glued("x", [{"thread": 1, "text": "about language"}, {"thread": 2, "text": "Another thing"}])
    assert not glued("x", [{"thread": 0, "text": "1. **Sleep**:"}, {"thread": 1, "text": " Keep a schedule."},
                           {"thread": 0, "text": "\n\n2."}, {"thread": 2, "text": ", then rest."}])
    assert numbering_broken("\n".join(f"{n}. **Item {n}**: text" for n in (1, 2, 4, 4, 4, 6, 5)))
    assert not numbering_broken("1. a\n2. b\n3. c\n\nThen:\n1. d\n2. e")
    buy = "\n".join(f"{n}. **Buy Used Items:** Look around the store." for n in range(1, 5))
    assert duplicate_items(buy) == 3
    assert duplicate_items("1. **Sleep**: keep a fixed schedule every day.\n2. **Light**: dim the lamps at night.") == 0
    raw = 'Tips:\n1. **Buy**:<promise topic="buy" tokens="9"/><async> in bulk.</async>\n2. **Buy**:<promise topic="buy'
    assert runaway(raw, ["max_new_tokens"]) and not runaway(raw, []) and not runaway("plain text", ["max_new_tokens"])
    clean = "Three tips:\n\n1. **Sleep**: Keep a fixed schedule.\n\n2. **Light**: Dim the lights.\n\nRest well."
    d = defects(clean, clean, [{"thread": 0, "text": clean, "finish": "eos"}], [])
    assert not any(d[k] for k in DEFECTS) and "empty_item" in DEFECTS


def test_a_chunk_the_block_guard_ended_mid_sentence_is_cut():
    """Issue 24, eval-0014 on llama.cpp: a block wrote a promise, the block guard ended it, and the reader got
    `1. **Salt**: Salt is one of the most`. That is a cut chunk like one its budget ended; a block that closed, or
    a guard ending after a full sentence, is not; main's pieces never count."""
    head = {"thread": 0, "text": "Spices:\n\n1. **Salt**:", "finish": "eos"}
    for finish in ("block_guard", "budget"):
        assert cut_chunks([head, {"thread": 1, "text": " Salt is one of the most", "finish": finish}]) == 1
    assert cut_chunks([head, {"thread": 1, "text": " Salt is one of the most", "finish": "close"}]) == 0
    assert cut_chunks([head, {"thread": 1, "text": " Salt preserves food.", "finish": "block_guard"}]) == 0
    assert cut_chunks([{"thread": 0, "text": "Salt is one of the most", "finish": "block_guard"}]) == 0
    text = head["text"] + " Salt is one of the most"
    d = defects(text, text, [head, {"thread": 1, "text": " Salt is one of the most", "finish": "block_guard"}],
                ["block_guard(thread 1)"])
    assert d["cut_chunk"] and d["cut_chunks"] == 1


def test_empty_item_is_a_lead_without_body():
    """What a runaway guard leaves (`6. Conclusion:`) is an empty item; an item whose sub-items follow is not."""
    assert empty_items("Ways:\n\n1. **Buy**: in bulk.\n\n2. **Plan**: your meals.\n\n3. **Buy**:") == 1
    assert empty_items("1. Use coupons: save.\n2. Shop local: buy fresh.\n6. Conclusion:") == 1
    assert empty_items("1. **A**:\n2. **B**: ok\n3. c") == 1
    assert empty_items("1. **Step 1**:\n   - sub a\n   - sub b\n2. **Step 2**: ok") == 0
    assert empty_items("1. Sleep: keep a schedule.\n2. Light: dim the lamps.") == 0
    assert empty_items("Only one item:\n1. **A**:") == 0  # not a list
