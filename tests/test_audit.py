"""Edge defects an outside audit of the linear layout and tag tokens found (issue 26): tags over 256 characters,
the linear layout's slot limit, a stray between a promise and its `<async>`, and a guard's reason against the
block's finish. Each test failed before its fix."""

from __future__ import annotations

import pytest

from pastalm.engine import Engine, GenerateConfig
from pastalm.engine.engine import thread_segments
from pastalm.lang.layout import layout_segments, tokenize_segments
from pastalm.lang.parser import Promise, Stray, StreamParser, Text, parse
from pastalm.lang.render import render
from pastalm.models import chat_prompt

LONG_TOPIC = "screens " * 34  # 272 characters: the promise is over 256
LONG_PROMISE = f'<promise topic="{LONG_TOPIC}" tokens="50"/>'
LONG_COUNT = '<promise tokens="' + "0" * 239 + '5"/>'


@pytest.mark.parametrize("tag", [LONG_PROMISE, LONG_COUNT, "<sync" + " " * 300 + "/>", "</async" + " x" * 150 + ">"])
@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_a_tag_over_256_characters_is_a_stray_whole(tag, piece):
    """L3, L5: a tag fragment over 256 characters is a stray up to its end, fed whole or in pieces; none of it is
    rendered, nothing is lost, and the text after it is text."""
    answer = "Intro: " + tag + "body <b>ok</b>\nnext"
    for role in ("serialized", "main"):
        p = StreamParser(role)
        events = []
        for i in range(0, len(answer), piece):
            events += p.feed(answer[i:i + piece])
        events += p.close()
        assert "".join(e.raw for e in events) == answer
        assert "".join(e.raw for e in events if isinstance(e, Stray)) == tag
        assert "".join(e.raw for e in events if isinstance(e, Text)) == "Intro: body <b>ok</b>\nnext"
        assert not any(isinstance(e, Promise) for e in events)
    assert render(answer) == "Intro: body <b>ok</b>\nnext"


def test_a_long_fragment_ends_before_a_tag_or_a_line_break():
    """The too-long fragment ends where any fragment does (L5): a promise right after it forks, and a line break
    after it is text."""
    cut = "<promise " + "a" * 300
    events = parse(cut + '<promise tokens="3"/><async>x</async>\nend')
    assert "".join(e.raw for e in events if isinstance(e, Stray)) == cut
    assert [e.raw for e in events if isinstance(e, Promise)] == ['<promise tokens="3"/>']
    assert render(cut + '<promise tokens="3"/><async>x</async>\nend') == "x\nend"
    assert render(cut + "\nline") == "\nline"


def test_a_promise_of_exactly_256_characters_still_forks():
    """The limit is 256 characters in all: a promise that long is a promise."""
    head, tail = '<promise topic="', '" tokens="7"/>'
    tag = head + "t" * (256 - len(head) - len(tail)) + tail
    assert len(tag) == 256
    events = parse("a" + tag + "<async>b</async>")
    assert [e for e in events if isinstance(e, Promise)][0].raw == tag
    assert render("a" + tag + "<async>b</async>") == "ab"


@pytest.mark.parametrize("tag", [LONG_PROMISE, LONG_COUNT])
def test_a_long_promise_forks_nothing_and_shows_nothing(model, tokenizer, tag):
    """Free decoding and forced replay agree: main writes the too-long promise as a stray, no block forks, and the
    rendered answer (streamed and final) has none of it."""
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    answer = "Tips: " + tag + "<async>rest well</async> done."
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    streamed = []
    for kw in ({"force": answer}, {"scripts": [enc(answer)]}):
        res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=400), on_text=streamed.append,
                           **kw)
        assert res.threads == 0
        assert res.text == "Tips: rest well done." == "".join(streamed)
        assert res.raw == answer
        streamed.clear()


def tiny_llama(positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=positions, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def test_the_linear_layouts_copies_do_not_count_against_the_models_positions(tokenizer):
    """Item 2: on a 160-position model an answer whose largest position is well inside it decodes to its end in
    the linear layout, although the re-laid history makes its cache slots outnumber the positions; the reserve
    layout gives the same text. An explicit `max_context` still bounds the slots (a memory limit)."""
    model = tiny_llama(160)
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    answer = ("Plan: " + '<promise tokens="20"/><async>pack a tent and some good food</async>'
              + '<promise tokens="20"/><async>check the map and the sky twice</async><sync/> Go.')
    prompt = chat_prompt(tokenizer, "Hi")
    positions = []
    real = model.forward

    def forward(*a, **kw):
        positions.append(int(kw["position_ids"].max()))
        return real(*a, **kw)

    model.forward = forward
    res = eng.generate(prompt, GenerateConfig(layout="linear", max_new_tokens=400), force=answer)
    assert max(positions) < 140
    assert res.limits_hit == [] and res.finish[0] == "script"
    assert res.text == render(answer)
    assert res.text == eng.generate(prompt, GenerateConfig(layout="reserve", max_new_tokens=400), force=answer).text
    # the old default (slots bounded by the model's 160 positions) ended it at the sync: the copy of the history
    # is what passes 160; a memory bound the user sets still counts every slot, copies included
    capped = eng.generate(prompt, GenerateConfig(layout="linear", max_new_tokens=400, max_context=160), force=answer)
    assert capped.limits_hit == ["context"] and capped.text != res.text
    assert res.text.startswith(capped.text)


def test_a_stray_between_a_promise_and_its_async_keeps_the_block_in_replay_as_in_training(model, tokenizer):
    """Item 7: one rule (docs/spec.md section 4): a stray has no effect, so the block after it is its promise's,
    in the training layout and in forced replay alike."""
    answer = 'Go <promise tokens="5"/><sync><async>body text</async> end.'
    # training: the chunk is laid out in the block's column (thread 1)
    segs = tokenize_segments(tokenizer, answer)
    lay = layout_segments(chat_prompt(tokenizer, "Hi"), segs)
    body = tokenizer.encode("body text", add_special_tokens=False)
    block_ids = [i for i, t in zip(lay.input_ids, lay.thread) if t == 1]
    assert block_ids[-len(body) - 1:-1] == body or body[0] in block_ids
    assert "".join(s.text for s in thread_segments(answer)[1]) == "body text</async>"
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=200), force=answer)
    assert res.threads == 1
    assert (1, "body text") in [(p["thread"], p["text"]) for p in res.pieces]
    assert res.text == render(answer) == "Go body text end."


def test_a_token_that_ends_a_stray_promise_and_closes_the_block_reports_one_reason():
    """When one token completes a stray promise fragment in a block and also closes it, `finish` and `limits_hit`
    name the same reason: the block guard, which ended it first."""
    from pastalm.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    both = '"/></async>'
    tok.add_tokens([both])
    model = tiny_model("llama", vocab_size=len(tok) + 8)
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    main = enc('Go <promise tokens="9"/> end.')
    block = enc('a <promise tokens="3') + [tok.convert_tokens_to_ids(both)]
    res = eng.generate(chat_prompt(tok, "Hi"), GenerateConfig(max_new_tokens=100), scripts=[main, block])
    assert res.threads == 1
    assert res.finish[1] == "block_guard" and "block_guard(thread 1)" in res.limits_hit
    assert "close" not in res.finish[1:]
