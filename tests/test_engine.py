"""The exact engine against references: a full forward with the layout's mask, and HF `generate`."""

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.engine.reference import layout_forward
from pastalm.lang import ReservePolicy, layout_segments, tokenize_segments
from pastalm.models import chat_prompt

P = '<promise topic="{}" tokens="{}"/>'

ANSWERS = {
    "one_promise": "Tips:\n" + P.format("a", 6) + "<async>1. Keep a fixed schedule.</async><sync/> Done.",
    "three_then_sync": "Three ways.\n"
    + P.format("schedule", 8) + "<async>1. Keep a schedule.</async>\n"
    + P.format("screens", 5) + "<async>2. Avoid screens.</async>\n"
    + P.format("caffeine", 7) + "<async>3. Cut caffeine after noon.</async>\n<sync/>Together they help.",
    "text_between": "Intro. " + P.format("a", 4) + "<async>apples are red</async> and then "
    + P.format("b", 9) + "<async>oranges are orange</async> so<sync/> end.",
    "promise_sync_promise": "First " + P.format("x", 5) + "<async>the moon is bright</async><sync/> then "
    + P.format("y", 5) + "<async>the night is long</async><sync/> fin.",
    "no_final_sync": "Go: " + P.format("p", 8) + "<async>first, second</async> and "
    + P.format("q", 30) + "<async>third step</async> trailing main text",
}


def reference_logits(model, tokenizer, prompt_ids, answer, policy):
    seq = layout_segments(prompt_ids, tokenize_segments(tokenizer, answer), policy)
    return seq, layout_forward(model, seq)


def engine_for(model, tokenizer):
    return Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})


@pytest.mark.parametrize("scale", [0, 1, 10])
@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_forced_replay_matches_full_forward(model, tokenizer, name, scale):
    """Decoding thread by thread gives the logits of one full forward over the serialized sequence."""
    answer = ANSWERS[name]
    prompt = chat_prompt(tokenizer, "Give me some tips.")
    eng = engine_for(model, tokenizer)
    res = eng.generate(prompt, GenerateConfig(reserve_scale=scale, record_logits=True), force=answer)
    assert res.raw == answer
    assert res.threads == answer.count("<promise")
    seq, ref = reference_logits(model, tokenizer, prompt, answer, ReservePolicy.for_tokenizer(tokenizer, scale))
    where = {(t, i): k for k, (t, i) in enumerate(zip(seq.thread, seq.index))}
    # the engine computes logits at the last token of each feed: one per token it chose, plus the prompt's
    # last token and each forced <async>; every one of them has its place in the serialized sequence
    assert len(res.logits) >= len(seq.input_ids) - len(prompt) - 3 * res.threads
    for key, row in res.logits.items():
        torch.testing.assert_close(row, ref[where[key]], atol=2e-5, rtol=1e-4)


def test_layout_positions_scale1_are_plain(tokenizer):
    """With scale 1 and exact token counts the serialized positions are 0..L-1 (plain causal training)."""
    chunk = "1. Keep a schedule."
    answer = "Tips " + P.format("a", len(tokenizer.encode(chunk, add_special_tokens=False))) + "<async>" + chunk \
        + "</async><sync/> ok"
    seq = layout_segments([5, 6, 7], tokenize_segments(tokenizer, answer), ReservePolicy.for_tokenizer(tokenizer, 1))
    assert seq.positions == list(range(len(seq.input_ids)))


def test_greedy_without_tags_equals_hf_generate(model, tokenizer):
    """With no tags, greedy async and sequential decoding equal HF generate token for token: an answer that stops
    at EOS early and one that runs to the token limit."""
    n = 40
    eng = engine_for(model, tokenizer)
    lengths = []
    for question in ("Name a color.", "Tell me about rivers.", "Give tips."):
        prompt = chat_prompt(tokenizer, question)
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        ref = ref[0, len(prompt):].tolist()
        if ref and ref[-1] == tokenizer.eos_token_id:
            ref = ref[:-1]
        lengths.append(len(ref))
        for sequential in (False, True):
            res = eng.generate(prompt, GenerateConfig(max_new_tokens=n, sequential=sequential))
            assert res.threads == 0
            assert res.token_ids[0] == ref
    assert max(lengths) == n, "no reference ran to the limit: the comparison would be nearly empty"


def test_thread_does_not_see_what_it_must_not(model, tokenizer):
    """Changing block 2's text changes neither block 1's logits nor main's before the sync."""
    prompt = chat_prompt(tokenizer, "Tips please.")
    head = "Intro " + P.format("a", 6) + "<async>keep a fixed schedule</async> mid " + P.format("b", 6)
    a = head + "<async>avoid screens</async> more main text<sync/> end"
    b = head + "<async>compare apples and oranges at noon</async> more main text<sync/> end"
    eng = engine_for(model, tokenizer)
    cfg = GenerateConfig(record_logits=True)
    la = eng.generate(prompt, cfg, force=a).logits
    lb = eng.generate(prompt, cfg, force=b).logits
    block1 = [k for k in la if k[0] == 1]
    assert block1 and all(torch.equal(la[k], lb[k]) for k in block1)
    main_segs = [ids for seg, ids in tokenize_segments(tokenizer, a) if seg.kind in ("text", "promise", "sync")]
    n_before_sync = sum(len(ids) for ids in main_segs[:-2])  # main's tokens before its <sync/>
    main_before = [k for k in la if k[0] == 0 and len(prompt) <= k[1] < len(prompt) + n_before_sync]
    assert len(main_before) > 5
    for k in main_before:
        torch.testing.assert_close(la[k], lb[k], atol=1e-6, rtol=1e-6)
    # ... but main after the sync does see block 2
    after = max(k[1] for k in la if k[0] == 0)
    assert not torch.allclose(la[(0, after)], lb[(0, after)])


def test_async_budget_ends_thread_and_keeps_text(model, tokenizer):
    """A block over its budget ends cleanly, is reported, and its text is kept; main goes on."""
    prompt = chat_prompt(tokenizer, "Tips please.")
    chunk = "keep a fixed schedule and avoid screens and cut caffeine"
    answer = "Intro " + P.format("a", 2) + "<async>" + chunk + "</async><sync/> end"
    eng = engine_for(model, tokenizer)
    res = eng.generate(prompt, GenerateConfig(async_factor=1.0, async_cap=4), force=answer)
    assert "async_budget(thread 1)" in res.limits_hit
    assert res.finish[1] == "budget"
    written = tokenizer.decode(res.token_ids[1][len(tokenizer.encode("<async>", add_special_tokens=False)):])
    assert written and chunk.startswith(written)
    assert res.text == "Intro " + written + " end"
    assert res.raw.endswith("<async>" + written + "</async><sync/> end")


def test_max_new_tokens_and_max_threads(model, tokenizer):
    """max_new_tokens ends every thread with text kept; promises past max_threads are decoded inline."""
    prompt = chat_prompt(tokenizer, "Tips please.")
    answer = ANSWERS["three_then_sync"]
    eng = engine_for(model, tokenizer)
    res = eng.generate(prompt, GenerateConfig(max_new_tokens=25), force=answer)
    assert "max_new_tokens" in res.limits_hit
    n_open = len(tokenizer.encode("<async>", add_special_tokens=False))
    assert sum(len(t) for t in res.token_ids) - n_open * res.threads == 25
    assert answer.startswith(res.raw.split("<async>")[0])
    full = eng.generate(prompt, GenerateConfig(), force=answer)
    res = eng.generate(prompt, GenerateConfig(max_threads=0), force=answer)
    assert res.threads == 0 and "max_threads" in res.limits_hit
    assert res.raw == answer and res.text == full.text
    # two promises back to back: the second finds the first block still live
    answer = P.format("a", 20) + "<async>compare apples and oranges at noon</async>" + P.format("b", 5) + \
        "<async>red</async><sync/> end"
    res = eng.generate(prompt, GenerateConfig(max_threads=1), force=answer)
    assert res.threads == 1 and "max_threads" in res.limits_hit and res.raw == answer


def test_context_limit_ends_cleanly(model, tokenizer):
    """Running out of context ends the request, reports it, and keeps what was written."""
    prompt = chat_prompt(tokenizer, "Tips please.")
    eng = engine_for(model, tokenizer)
    res = eng.generate(prompt, GenerateConfig(max_context=len(prompt) + 12), force=ANSWERS["three_then_sync"])
    assert res.limits_hit == ["context"]
    assert ANSWERS["three_then_sync"].startswith(res.raw[: len("Three ways.")])
    assert sum(len(t) for t in res.token_ids) <= 12 + 1  # the last token written never took a slot


def test_sampling_is_reproducible(model, tokenizer):
    """The same seed gives the same answer; another seed gives another one."""
    prompt = chat_prompt(tokenizer, "Write something.")
    eng = engine_for(model, tokenizer)
    cfg = dict(max_new_tokens=30, temperature=1.0, top_p=0.9)
    a = eng.generate(prompt, GenerateConfig(seed=1, **cfg))
    b = eng.generate(prompt, GenerateConfig(seed=1, **cfg))
    c = eng.generate(prompt, GenerateConfig(seed=2, **cfg))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize("temperature,top_p", [(1e-300, 1.0), (1e-6, 0.9), (1.0, 1e-300), (5e-324, 5e-324)])
def test_tiny_temperature_or_top_p_is_greedy_not_nan(model, tokenizer, temperature, top_p):
    """A temperature of 1e-300 overflowed the logits into NaN probabilities (issue 15): now it decodes greedily,
    token for token as temperature 0 does; a tiny top_p keeps only the most likely token, also greedy."""
    from pastalm.engine.sampler import sample, thread_generator

    logits = torch.randn(tokenizer.vocab_size, generator=torch.Generator().manual_seed(0)) * 30
    assert sample(logits, temperature, top_p, thread_generator(0, 0)) == int(torch.argmax(logits))
    prompt = chat_prompt(tokenizer, "Write something.")
    eng = engine_for(model, tokenizer)
    greedy = eng.generate(prompt, GenerateConfig(max_new_tokens=20))
    tiny = eng.generate(prompt, GenerateConfig(max_new_tokens=20, temperature=temperature, top_p=top_p, seed=3))
    assert tiny.token_ids == greedy.token_ids


def test_forced_sequential_gives_same_answer(model, tokenizer):
    """Sequential replay of an annotated answer writes the same text in one thread."""
    prompt = chat_prompt(tokenizer, "Tips please.")
    eng = engine_for(model, tokenizer)
    answer = ANSWERS["three_then_sync"]
    seq = eng.generate(prompt, GenerateConfig(sequential=True), force=answer)
    par = eng.generate(prompt, GenerateConfig(), force=answer)
    assert seq.raw == par.raw == answer and seq.text == par.text
    assert seq.threads == 0 and par.threads == 3
    assert par.decode_steps < seq.decode_steps
    assert par.theoretical_speedup > 1.0 == seq.theoretical_speedup


def test_streaming_is_in_reading_order(model, tokenizer):
    """Streamed pieces concatenate to the rendered answer."""
    prompt = chat_prompt(tokenizer, "Tips please.")
    pieces = []
    res = engine_for(model, tokenizer).generate(prompt, GenerateConfig(), force=ANSWERS["text_between"],
                                                on_text=pieces.append)
    assert "".join(pieces) == res.text and len(pieces) > 3


def test_span_views_rows_by_hand():
    """Each query token's view row: the span's view in its threads' columns, and its own column covering its
    thread up to itself; with a column map, the same values land in the mapped columns."""
    from pastalm.engine.mask import span_views
    from pastalm.lang.layout import Span

    spans = [Span(0, 4, [10, 11], (0,)),  # main, tokens 4 and 5 of its thread
             Span(1, 0, [12], (3, 0)),  # a block seeing main's first 3 tokens
             Span(2, 2, [], (5, 0, 0)),  # an empty span adds no row
             Span(2, 2, [13], (5, 1, 0))]  # another block seeing 5 of main and 1 of block 1
    want = [[5, 0, 0, 0], [6, 0, 0, 0], [3, 1, 0, 0], [5, 1, 3, 0]]
    assert span_views(spans, 4).tolist() == want
    cmap = [{0: 3}, {0: 3, 1: 0}, {0: 3, 1: 0, 2: 1}, {0: 3, 1: 0, 2: 1}]  # thread -> column, per span
    assert span_views(spans, 4, cmap).tolist() == [[r[1], r[2], 0, r[0]] for r in want]


@pytest.mark.parametrize("sequential", [False, True])
def test_logprobs_are_the_models_own_for_each_rendered_token(model, tokenizer, sequential):
    """Without tags: one entry per token of the answer, whose log-probability and top alternatives are those of a
    plain full forward over prompt + answer (sampling at temperature 1 does not change them: they are the model's
    own distribution)."""
    eng = engine_for(model, tokenizer)
    prompt = chat_prompt(tokenizer, "Tell me about rivers.")
    res = eng.generate(prompt, GenerateConfig(max_new_tokens=30, temperature=1.0, seed=2, logprobs=3,
                                              sequential=sequential))
    ids = res.token_ids[0]
    assert len(ids) == 30 and [e["id"] for e in res.logprobs] == ids
    assert "".join(e["text"] for e in res.logprobs) == res.text
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), -1)
    for i, e in enumerate(res.logprobs):
        row = ref[len(prompt) + i - 1]
        assert e["logprob"] == pytest.approx(float(row[e["id"]]), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t for t, _ in e["top"]] == top.indices.tolist()
        assert [v for _, v in e["top"]] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("layout", ["reserve", "linear"])
def test_logprobs_follow_the_rendered_answer_in_reading_order(model, tokenizer, layout):
    """With forks: the entries' texts join to the rendered answer (no tag text, blocks in reading order); tokens
    the model chose (the blocks', here) carry their log-probability (greedy: the top alternative is the token
    itself); main's replayed tokens carry none."""
    from pastalm.engine import scripts_for

    eng = engine_for(model, tokenizer)
    answer = "Tips:\n" + P.format("a", 4) + "<async>x</async>\n" + P.format("b", 4) + "<async>y</async>\n<sync/>End."
    main = scripts_for(tokenizer, answer)[0]
    res = eng.generate(chat_prompt(tokenizer, "Give tips."), GenerateConfig(layout=layout, async_cap=5, logprobs=2),
                       scripts=[main, [], []], scaffold=True)
    assert res.threads == 2 and res.text.startswith("Tips:\n") and res.text.endswith("\nEnd.")
    assert "".join(e["text"] for e in res.logprobs) == res.text
    chose = [e for e in res.logprobs if e["logprob"] is not None]
    assert {e["thread"] for e in chose} == {1, 2}
    open_n = len(tokenizer.encode("<async>", add_special_tokens=False))
    for j in (1, 2):
        ids = [e["id"] for e in chose if e["thread"] == j]
        block = res.token_ids[j][open_n:]
        # every token of the block, in order, but one at its end that wrote only part of a character (this random
        # model's blocks end so before their EOS: the raw form and the rendered text drop it too)
        assert ids == block[:len(ids)] and len(block) - len(ids) <= 1 and len(ids) >= 2
        assert tokenizer.decode(ids) in res.text
    assert all(e["top"][0][0] == e["id"] and e["top"][0][1] == pytest.approx(e["logprob"]) for e in chose)
    shown = "".join(e["text"] for e in res.logprobs if e["logprob"] is None)
    assert shown == "Tips:\n\n\nEnd."  # main's own text, without its tags


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (1.0, 0.5)])
def test_sample_never_picks_a_banned_token_and_leaves_the_row_as_it_was(temperature, top_p):
    """`sample(..., banned)` (the block guard's mask) never returns a banned id, even when the banned ids hold
    almost all the probability, greedy or sampled; and the row it was given is unchanged (the reported
    log-probabilities are the model's own)."""
    from pastalm.engine.sampler import sample, thread_generator

    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    banned = (3, 7, 11)
    logits[list(banned)] = 50.0
    before = logits.clone()
    g = thread_generator(0, 0)
    picks = {sample(logits, temperature, top_p, g, banned) for _ in range(200)}
    assert not picks & set(banned)
    assert sample(logits, temperature, top_p, g) in banned  # without the mask the banned ids win
    assert torch.equal(logits, before)
    if temperature == 0.0:
        masked = logits.clone()
        masked[list(banned)] = float("-inf")
        assert picks == {int(torch.argmax(masked))}
