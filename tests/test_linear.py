"""The linear layout (docs/spec.md section 3), checked against its definition: every thread's context is one
linear token sequence at consecutive positions, so the logits the engine computes for a token must equal a plain
causal forward (no mask, default positions) over that sequence. The sequences are derived here from the annotated
answer alone: main's tokens; a block's is main's through its promise plus its own; after a sync, main's is the whole
answer so far in reading order (blocks right after their promises) followed by main's next tokens."""

from __future__ import annotations

import re

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.models import chat_prompt

TAG = re.compile(r'<promise[^>]*/>|<async>|</async>|<sync/>')
P = '<promise tokens="{}"/>'
ANSWERS = {
    "sync_mid": "Intro: " + P.format(6) + "<async>one two</async> and " + P.format(8)
                + "<async>three four five</async><sync/> so after the sync main reads both.",
    "two_syncs": "A " + P.format(5) + "<async>alpha</async><sync/> then B " + P.format(5)
                 + "<async>beta gamma</async> mid " + P.format(4) + "<async>delta</async><sync/> end.",
    "no_sync": "List: " + P.format(6) + "<async>first item</async>\n" + P.format(6) + "<async>second</async> tail",
    "sync_no_block": "Plain text <sync/> and more text.",
}


def linear_contexts(tok, prompt_ids: list[int], annotated: str) -> dict[tuple[int, int], list[int]]:
    """(thread, index of the token in its thread) -> the linear context that ends with that token."""
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    segs, pos = [], 0
    for m in TAG.finditer(annotated):
        if m.start() > pos:
            segs.append(("text", annotated[pos:m.start()]))
        segs.append(("tag", m.group()))
        pos = m.end()
    if pos < len(annotated):
        segs.append(("text", annotated[pos:]))
    out: dict[tuple[int, int], list[int]] = {}
    serial = list(prompt_ids)  # everything written, in reading order
    main = list(prompt_ids)  # main's context
    main_n = len(prompt_ids)
    for i in range(len(prompt_ids)):
        out[(0, i)] = prompt_ids[: i + 1]
    blocks, block, ctx, n = 0, None, None, 0
    for kind, text in segs:
        ids = enc(text)
        if kind == "tag" and text == "<async>":
            blocks += 1
            block, ctx, n = blocks, list(main), 0  # main through its promise
        if block is not None:
            for t in ids:
                ctx.append(t)
                serial.append(t)
                out[(block, n)] = list(ctx)
                n += 1
            if text == "</async>":
                block = None
            continue
        for k, t in enumerate(ids):
            if text == "<sync/>" and k == len(ids) - 1:
                main = list(serial)  # the sync's last token: main's history re-laid in reading order
            main.append(t)
            serial.append(t)
            out[(0, main_n)] = list(main)
            main_n += 1
    return out


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_linear_layout_is_a_plain_forward_of_each_threads_sequence(model, tokenizer, name):
    tok = tokenizer
    prompt_ids = chat_prompt(tok, "Tell me two things.")
    cfg = GenerateConfig(layout="linear", record_logits=True, max_new_tokens=400)
    res = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id}).generate(prompt_ids, cfg, force=ANSWERS[name])
    assert not res.limits_hit and res.raw == ANSWERS[name]
    ref = linear_contexts(tok, prompt_ids, ANSWERS[name])
    written = sum(len(ids) for ids in res.token_ids)
    forced = len(tok.encode("<async>", add_special_tokens=False))  # a block's forced tags go in one feed
    assert len(res.logits) == 1 + written - res.threads * (forced - 1)  # one record per feed
    with torch.no_grad():
        for key, logits in res.logits.items():
            ctx = ref[key]
            want = model(input_ids=torch.tensor([ctx])).logits[0, -1]
            assert torch.allclose(logits, want, atol=1e-4), (key, (logits - want).abs().max())


def test_linear_equals_reserve_at_scale_0_until_a_sync(model, tokenizer):
    """Without a sync the two layouts are the same: the reserve layout at scale 0 gives the same logits."""
    tok = tokenizer
    prompt_ids = chat_prompt(tok, "Tell me two things.")
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    a = eng.generate(prompt_ids, GenerateConfig(layout="linear", record_logits=True), force=ANSWERS["no_sync"])
    b = eng.generate(prompt_ids, GenerateConfig(reserve_scale=0, record_logits=True), force=ANSWERS["no_sync"])
    assert a.logits.keys() == b.logits.keys()
    for k in a.logits:
        assert torch.allclose(a.logits[k], b.logits[k], atol=1e-5)


def test_linear_layout_refuses_a_reserve_scale():
    with pytest.raises(ValueError, match="reserves no positions"):
        GenerateConfig(layout="linear", reserve_scale=1.0)
    with pytest.raises(ValueError, match="layout must be one of"):
        GenerateConfig(layout="diagonal")


@pytest.mark.parametrize("config,expected", [
    (GenerateConfig(), "linear"),
    (GenerateConfig(reserve_scale=0.5), "reserve"),
    (GenerateConfig(reserve_scale=0), "reserve"),
    (GenerateConfig(layout="linear"), "linear"),
])
def test_the_backend_and_the_positions_policy_agree_on_the_layout(model, tokenizer, config, expected):
    """What the transformers backend decodes (`Engine.check`) and the positions it reserves (`policy`) follow the
    same rule: a given layout, else the reserve layout where a reserve scale is given, else linear."""
    from pastalm.engine import Engine

    assert Engine(model, tokenizer).check(config).layout == expected
    policy = config.policy(tokenizer)
    assert policy.linear == (expected == "linear")
    assert policy.scale == (config.reserve_scale or 0.0)
    assert config.resolved_layout(("linear",)) == (config.layout or "linear")  # a linear-only backend (vLLM, llama.cpp)


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_linear_training_examples_are_the_same_contexts(model, tokenizer, name):
    """Training in the linear layout (`layout_examples`: one example per re-laid sync): every labelled token sees
    exactly one of the contexts the definition gives, at positions 0..n-1, its logits in the example's full forward
    equal a plain forward of that context, and its label is that context's next token (or EOS at the end)."""
    from pastalm.engine.reference import layout_forward, layout_mask
    from pastalm.lang import ReservePolicy, tokenize_segments
    from pastalm.lang.layout import IGNORE, layout_examples

    tok = tokenizer
    prompt_ids = chat_prompt(tok, "Tell me two things.")
    ref = linear_contexts(tok, prompt_ids, ANSWERS[name])
    contexts = {tuple(c) for c in ref.values()}
    sync_last = tok.encode("<sync/>", add_special_tokens=False)[-1]
    policy = ReservePolicy.for_tokenizer(tok, layout="linear")
    examples = layout_examples(prompt_ids, tokenize_segments(tok, ANSWERS[name]), policy, tok.eos_token_id)
    assert len(examples) == 1 + {"sync_mid": 1, "two_syncs": 2}.get(name, 0)
    labelled = 0
    for seq in examples:
        logits = layout_forward(model, seq)
        allowed = layout_mask(seq)[0, 0] == 0
        for i, label in enumerate(seq.labels):
            if label == IGNORE:
                continue
            seen = sorted(allowed[i].nonzero().flatten().tolist(), key=lambda j: seq.positions[j])
            ctx = tuple(seq.input_ids[j] for j in seen)
            assert ctx in contexts and [seq.positions[j] for j in seen] == list(range(len(seen)))
            # the next token of the same thread; the token before a sync's last one predicts it in main's own
            # context, though that last token itself is then fed in the re-laid one
            assert label in (tok.eos_token_id, sync_last) or ctx + (label,) in contexts
            with torch.no_grad():
                want = model(input_ids=torch.tensor([list(ctx)])).logits[0, -1]
            assert torch.allclose(logits[i], want, atol=1e-4)
            labelled += 1
    answer_tokens = len(tok.encode(ANSWERS[name].replace("<async>", ""), add_special_tokens=False))
    assert labelled >= answer_tokens // 2  # most of the answer is trained (tags and text)
