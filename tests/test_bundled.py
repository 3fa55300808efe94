"""Slow tests on the real bundled model (SmolLM2-135M-Instruct from its GGUF file): `pytest -m slow`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.engine.reference import layout_forward
from pastalm.lang import ReservePolicy, layout_segments, tokenize_segments
from pastalm.models import chat_prompt, load

pytestmark = pytest.mark.slow

PROMPT = "Give three tips to sleep better."


@pytest.fixture(scope="module")
def bundled():
    return load(None, "fp32")


def test_cli_greedy_sequential_equals_hf_generate(bundled):
    """`pasta generate --sequential` (greedy) writes what HF generate writes for the same prompt."""
    n = 48
    out = subprocess.run(
        [sys.executable, "-m", "pastalm.cli", "generate", PROMPT, "--sequential", "--json", "--dtype", "fp32",
         "--max-new-tokens", str(n), "--adapter", "none"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    tok, model = bundled.tokenizer, bundled.model
    ids = chat_prompt(tok, PROMPT)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):]
    assert got["text"] == tok.decode(ref, skip_special_tokens=True)
    assert got["mode"] == "sequential" and got["threads"] == 0 and got["prompt_tokens"] == len(ids)


@pytest.mark.parametrize("scale", [0, 1, 10])
def test_forced_three_chunks_match_full_forward(bundled, scale):
    """Forced replay of a 3-chunk answer on the real model equals the full forward with the layout's mask."""
    tok, model = bundled.tokenizer, bundled.model
    answer = ("Here are three tips.\n"
              '<promise topic="schedule" tokens="12"/><async>1. Keep a fixed sleep schedule, even on weekends.</async>\n'
              '<promise topic="screens" tokens="10"/><async>2. Avoid screens for an hour before bed.</async>\n'
              '<promise topic="caffeine" tokens="8"/><async>3. Cut caffeine after noon.</async>\n'
              "<sync/>Together these habits help you fall asleep.")
    prompt = chat_prompt(tok, PROMPT)
    eng = Engine(model, tok, "bundled")
    res = eng.generate(prompt, GenerateConfig(reserve_scale=scale, record_logits=True), force=answer)
    assert res.raw == answer and res.threads == 3
    seq = layout_segments(prompt, tokenize_segments(tok, answer), ReservePolicy.for_tokenizer(tok, scale))
    ref = layout_forward(model, seq)
    where = {(t, i): k for k, (t, i) in enumerate(zip(seq.thread, seq.index))}
    assert len(res.logits) >= len(seq.input_ids) - len(prompt) - 3 * res.threads
    for key, row in res.logits.items():
        torch.testing.assert_close(row, ref[where[key]], atol=2e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def shipped():
    from pastalm.models import BUNDLED_ADAPTERS

    if not (BUNDLED_ADAPTERS["pasta"] / "adapter_config.json").is_file():
        pytest.skip("no PASTA adapter is shipped in this checkout (see docs/training.md)")
    return load(None, "fp32", "pasta")


@pytest.fixture(scope="module", params=["pasta", "pasta-linear", "pasta-v2", "pasta-v1", "pasta-stage1"])
def any_shipped(request):
    """Each shipped PASTA adapter: the default (v2), the v1 stage-2 one and the stage-1 one both came from."""
    return request.param, load(None, "fp32", request.param)


@pytest.fixture(scope="module")
def shipped_linear():
    from pastalm.models import BUNDLED_ADAPTERS

    if not (BUNDLED_ADAPTERS["pasta-linear"] / "adapter_config.json").is_file():
        pytest.skip("no linear-layout PASTA adapter is shipped in this checkout (see docs/training.md)")
    return load(None, "fp32", "pasta-linear")


def test_cli_default_is_the_shipped_pasta_adapter(shipped_linear):
    """`pasta generate` with no --adapter decodes with the shipped PASTA adapter of the default (linear) layout,
    `pasta-linear`: on a prompt it answers without promises, it writes what HF generate writes with the merged
    adapter. (With promises the two differ by design: the interpreter forces `<async>` after a promise, HF generate
    does not.)"""
    n = 32
    fact = "What is the capital of Norway?"
    out = subprocess.run(
        [sys.executable, "-m", "pastalm.cli", "generate", fact, "--sequential", "--json", "--dtype", "fp32",
         "--max-new-tokens", str(n)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["model"].endswith("+smollm2-135m-pasta-linear")
    tok, model = shipped_linear.tokenizer, shipped_linear.model
    ids = chat_prompt(tok, fact)
    # HF generate stops at the same tokens as the engine: EOS and the ChatML turn markers (the v3 adapter
    # sometimes ends an answer with `<|im_start|>`, docs/spec.md section 4)
    from pastalm.models import stop_ids

    ref = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(stop_ids(tok, model.generation_config)))[0, len(ids):]
    assert got["raw"] == tok.decode(ref, skip_special_tokens=True) and got["threads"] == 0


@pytest.mark.parametrize("prompt, parallel", [
    ("Give me five tips for staying productive when working from home.", True),
    ("List four healthy breakfast ideas and say a little about each.", True),
    ("What is 17 + 25?", False),
    ("What is the capital of Norway?", False),
])
def test_shipped_adapter_forks_on_lists_and_not_on_facts(any_shipped, prompt, parallel, request):
    """Each shipped adapter writes valid promises (decoded in parallel) for a list ask and none for a fact. The v2
    and v3 adapters decode with the runaway guards, the v1 ones as they were measured, without them (v1 repeats
    topics: the repeat guard ends its lists early, docs/results.md)."""
    from pastalm.lang.render import render, validate

    name, shipped = any_shipped
    guards = name in ("pasta", "pasta-linear", "pasta-v2")
    eng = Engine(shipped.model, shipped.tokenizer, "pasta")
    layout = "linear" if name == "pasta-linear" else "reserve"  # each in the layout it was trained in
    res = eng.generate(chat_prompt(shipped.tokenizer, prompt),
                       GenerateConfig(max_new_tokens=400, repeat_guard=guards, block_guard=guards, layout=layout))
    rep = validate(res.raw)
    if any(h in ("repeated_topic", "max_promises") for h in res.limits_hit):
        assert render(res.raw).startswith(res.text)  # the lead of the refused item is not rendered
    else:
        assert render(res.raw) == res.text
    if parallel:
        assert rep.promises >= 2 and res.threads >= 2 and res.theoretical_speedup > 1.3, res.raw
    else:
        assert res.threads == 0 and rep.promises == 0, res.raw


def test_readme_quick_start_forks(bundled):
    """The README's first command answers with the shipped adapter in parallel: it forks, and no tag shows."""
    out = subprocess.run(
        [sys.executable, "-m", "pastalm.cli", "generate", "Give three tips to sleep better.", "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["threads"] >= 2 and got["theoretical_speedup"] > 1.2, got["raw"]
    assert "<" not in got["text"] and "1." in got["text"] and "2." in got["text"]
