"""The runaway guards (docs/spec.md, "Limits"): `max_promises` and `repeat_guard` end main at the promise that
trips them; the blocks already forked finish, nothing is lost from the raw form, and `limits_hit` says why."""

from __future__ import annotations

import pytest

from pastalm.engine.interpreter import Interpreter, Limits
from pastalm.lang import ReservePolicy, render

from test_leaks import drive, thread_texts

RUNAWAY = ('Ways:\n\n1. **Buy**:<promise topic="buy" tokens="5"/><async> in bulk.</async>\n\n'
           '2. **Plan**:<promise topic="plan" tokens="6"/><async> your meals.</async>\n\n'
           '3. **Buy**:<promise topic="Buy " tokens="5"/><async> used items.</async>\n\n'
           '4. **Cook**:<promise topic="cook" tokens="5"/><async> at home.</async>')


def replay(tokenizer, limits: Limits) -> Interpreter:
    scripts = [tokenizer.encode(t, add_special_tokens=False) for t in thread_texts(RUNAWAY, False)]
    interp = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                         {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), limits, False, scripts)
    drive(interp)
    return interp


def test_no_guard_replays_everything(tokenizer):
    interp = replay(tokenizer, Limits(repeat_guard=False, block_guard=False))
    assert interp.rendered(complete=True) == render(RUNAWAY)
    assert len(interp.threads) == 5 and interp.limits_hit == []


@pytest.mark.parametrize("limits,reason", [(Limits(), "repeated_topic"),
                                           (Limits(max_promises=2, repeat_guard=False), "max_promises")])
def test_guard_ends_main_at_the_promise(tokenizer, limits, reason):
    """The third promise repeats the first's topic (case and spaces aside) and is the third: either guard ends main
    there. The two blocks already forked are complete; main's text up to the promise stays."""
    interp = replay(tokenizer, limits)
    assert interp.limits_hit == [reason]
    assert len(interp.threads) == 3  # main and the two blocks before the guard
    assert interp.main.finish == reason
    assert [t.finish for t in interp.threads[1:]] == ["close", "close"]
    # the refused item's lead is not shown (it was never streamed either); the raw form keeps it
    assert interp.rendered(complete=True) == "Ways:\n\n1. **Buy**: in bulk.\n\n2. **Plan**: your meals.\n\n"
    assert "".join(p["text"] for p in interp.pieces()) == interp.rendered(complete=True)
    assert interp.hidden_text() == "3. **Buy**:"  # not counted as rendered tokens either
    assert interp.raw().endswith('3. **Buy**:<promise topic="Buy " tokens="5"/>')


def test_guard_limits_validate():
    with pytest.raises(ValueError, match="max_promises"):
        Limits(max_promises=0)


def test_block_guard_ends_a_block_that_promises(tokenizer):
    """A block that writes a promise (a stray: only main forks) ends there with the guard; without it the block
    goes on. Either way the promise is kept raw and never shown."""
    answer = ('Tips:\n1. **Buy**:<promise topic="buy" tokens="90"/><async> Buy:<promise topic="buy" tokens="9"/>'
              ' Buy: more</async>\n\nDone.')
    texts = thread_texts(answer, False)
    scripts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    for guard, chunk in ((False, " Buy: Buy: more"), (True, " Buy:")):
        interp = Interpreter(tokenizer, tokenizer.encode("Tips?", add_special_tokens=False), {tokenizer.eos_token_id},
                             ReservePolicy.for_tokenizer(tokenizer), Limits(block_guard=guard), False, scripts)
        drive(interp)
        assert interp.threads[1].text() == chunk
        assert interp.rendered(complete=True) == "Tips:\n1. **Buy**:" + chunk + "\n\nDone."
        assert ("block_guard(thread 1)" in interp.limits_hit) == guard
        assert '<promise topic="buy" tokens="9"/>' in interp.raw().split("<async>", 1)[1]


def test_repeat_guard_keys_a_topicless_promise_on_its_lead(tokenizer):
    """Scheme v3 writes `<promise tokens="N"/>`: the repeat guard compares the lead on the promise's line instead
    (list marker, markup, case and punctuation aside), so `3. *buy*:` repeats `1. **Buy**:`."""
    topicless = RUNAWAY.replace('topic="Buy " ', "").replace(' topic="buy"', "").replace(' topic="plan"', "") \
        .replace(' topic="cook"', "").replace("3. **Buy**:", "3. *buy* :")
    assert "topic" not in topicless
    scripts = [tokenizer.encode(t, add_special_tokens=False) for t in thread_texts(topicless, False)]
    interp = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                         {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), Limits(), False, scripts)
    drive(interp)
    assert interp.limits_hit == ["repeated_topic"] and len(interp.threads) == 3
    assert interp.rendered(complete=True) == "Ways:\n\n1. **Buy**: in bulk.\n\n2. **Plan**: your meals.\n\n"
    interp = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                         {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), Limits(repeat_guard=False),
                         False, scripts)
    drive(interp)
    assert interp.limits_hit == [] and len(interp.threads) == 5


def test_chatml_turn_markers_stop(tokenizer):
    """A model that opens a new ChatML turn has ended its answer: `<|im_start|>` stops like EOS, so the invented
    next turn never reaches the reader; so does `<|endoftext|>`."""
    from pastalm.models import stop_ids
    from pastalm.testing import tiny_model

    ids = stop_ids(tokenizer, tiny_model().generation_config)
    start, end, eot = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    assert {start, end, eot} <= ids  # and the end-of-document token: never answer text either
    script = tokenizer.encode("Keep a fixed schedule.", add_special_tokens=False) + [start] + \
        tokenizer.encode("user\nWhat next?", add_special_tokens=False)
    interp = Interpreter(tokenizer, tokenizer.encode("Tips?", add_special_tokens=False), ids,
                         ReservePolicy.for_tokenizer(tokenizer), Limits(), False, [script])
    drive(interp)
    assert interp.rendered(complete=True) == "Keep a fixed schedule." and interp.main.finish == "eos"


def test_stream_holds_a_lead_back_until_its_promise_forks(tokenizer):
    """While main's last line may be a lead (short, starts like a list item), the stream does not show it: a lead
    the guard then refuses was never on screen. Once its promise forks, the lead is shown with the block; a lead
    of more than LEAD_HOLD characters, or prose, streams at once and stays."""
    from pastalm.engine.interpreter import LEAD_HOLD

    scripts = [tokenizer.encode(t, add_special_tokens=False) for t in thread_texts(RUNAWAY, False)]
    interp = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                         {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), Limits(), False, scripts)
    parts = drive(interp)  # what the stream showed after each step, then what the end added
    assert "".join(parts) == interp.rendered(complete=True) and "3. **Buy**" not in "".join(parts)
    long_lead = "3. " + "x" * LEAD_HOLD + ":"
    answer = RUNAWAY.replace("3. **Buy**:", long_lead)
    scripts = [tokenizer.encode(t, add_special_tokens=False) for t in thread_texts(answer, False)]
    interp = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                         {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), Limits(), False, scripts)
    parts = drive(interp)
    assert long_lead in "".join(parts[:-1])  # streamed before the end, so it stays
    assert interp.rendered(complete=True).endswith(long_lead)


def test_the_first_lead_streams_at_once(tokenizer):
    """Before main's first promise no guard can refuse anything (nothing repeats yet, max_promises is not reached),
    so the first lead is not held: it streams while its promise is still being written. Later leads are held."""
    scripts = [tokenizer.encode(t, add_special_tokens=False) for t in thread_texts(RUNAWAY, False)]
    interp = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                         {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), Limits(), False, scripts)
    shown_before_first_promise = None
    while not interp.finished:
        for tid in interp.fed(interp.schedule()):
            tok = interp.scripted(tid)
            interp.write(tid, tok)
        if shown_before_first_promise is None and interp.main.parser.held.startswith("<prom"):
            shown_before_first_promise = interp.rendered()
    assert shown_before_first_promise == "Ways:\n\n1. **Buy**:"
    limited = Interpreter(tokenizer, tokenizer.encode("Save money?", add_special_tokens=False),
                          {tokenizer.eos_token_id}, ReservePolicy.for_tokenizer(tokenizer), Limits(max_promises=1),
                          False, scripts)
    parts = drive(limited)  # max_promises=1: the second lead may be refused, so it is held, and it is refused
    assert "2. **Plan**" not in "".join(parts) and limited.limits_hit == ["max_promises"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_block_cannot_choose_a_one_token_promise(arch):
    """With the block guard (the default), a block never chooses a promise tag token (only main forks): a model
    that prefers one by far in every position still writes, in the block, exactly what the same model without
    that preference writes, and no block ends by the guard. Without the guard the block writes the promise."""
    import torch

    from pastalm.engine import Engine, GenerateConfig
    from pastalm.engine.interpreter import promise_token_ids
    from pastalm.lang.tags import TAG_TOKENS
    from pastalm.models import add_tokens, chat_prompt
    from pastalm.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(arch, vocab_size=len(tok) + len(TAG_TOKENS))
    add_tokens(model, tok, TAG_TOKENS)
    promises = promise_token_ids(tok)
    assert len(promises) == 10 and tok.convert_tokens_to_ids('<promise tokens="10"/>') in promises
    main = tok.encode('Go:<promise tokens="10"/> end.', add_special_tokens=False)
    assert sum(i in promises for i in main) == 1
    prompt = chat_prompt(tok, "Hi")
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})

    def answer(guard: bool):
        res = eng.generate(prompt, GenerateConfig(max_new_tokens=60, block_guard=guard, repeat_guard=False),
                           scripts=[main, []], scaffold=True)
        return res, [p["text"] for p in res.pieces if p["thread"] == 1]

    plain, plain_block = answer(True)
    bias = torch.zeros(model.config.vocab_size)
    bias[list(promises)] = 1e3
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + bias.to(out.dtype))
    try:
        masked, masked_block = answer(True)
        free, _ = answer(False)
    finally:
        hook.remove()
    assert plain.threads == masked.threads == 1
    assert masked_block == plain_block and masked.text == plain.text
    assert masked.finish[1] != "block_guard" and not any("block_guard" in h for h in masked.limits_hit)
    block_raw = free.raw.split("<async>", 1)[1]
    assert "<promise" in block_raw  # unguarded, the block writes what the model prefers
