"""Engine edge cases at the position limit (issue 15, items 10 and 11): a limit ends only what it concerns."""

from __future__ import annotations

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.models import chat_prompt

P = '<promise tokens="{}"/>'


def tiny_gpt2(positions: int):
    """Learned absolute positions: a position past the table is an IndexError, not a quiet extrapolation."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=384, n_positions=positions, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                     eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("layout", ["reserve", "linear"])
def test_forks_near_the_position_limit_never_pass_it(tokenizer, layout):
    """Forced answers whose promises land at every distance from the limit: decoding never feeds a position the
    model does not have; a block that would not fit is decoded inline by main, and no text is lost."""
    positions = 128
    model = tiny_gpt2(positions)
    eng = Engine(model, tokenizer, "gpt2", stop_ids={tokenizer.eos_token_id})
    seen = []
    real = model.forward

    def forward(*a, **kw):
        seen.append(int(kw["position_ids"].max()))
        return real(*a, **kw)

    model.forward = forward
    answer = "Go " + P.format(4) + "<async>one two three</async> and " + P.format(6) + "<async>four five</async> end."
    lengths = set()
    for pad, extra in [(p, e) for p in range(23, 36) for e in ("", "!", "!!")]:  # prompts of 88 to 126 tokens
        prompt = chat_prompt(tokenizer, "Hi " + "word " * pad + extra)
        lengths.add(len(prompt))
        seen.clear()
        res = eng.generate(prompt, GenerateConfig(layout=layout, max_new_tokens=200), force=answer)
        assert seen and max(seen) < positions
        cut = [h for h in res.limits_hit if h == "context" or h.startswith("async_budget")]
        if not cut:  # everything fitted: the whole answer is there, blocks or inline
            assert res.text == "Go one two three and four five end."
        elif "context" not in cut:  # a block's budget ended at the last position; the rest of the answer is there
            assert max(seen) == positions - 1 and res.text.startswith("Go one two") and res.text.endswith(" end.")
    assert set(range(90, 124)) <= lengths  # every distance of both promises from the limit


def test_a_large_reservation_is_decoded_inline_not_the_end_of_the_answer(model, tokenizer):
    """tokens="200" at scale 10 reserves 2,000+ positions on a 1,024-position model: that block is decoded inline
    (limits_hit says so); the answer goes on to its end instead of stopping with a stray '<'."""
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    answer = "Start " + P.format(200) + "<async>big block</async> mid " + P.format(3) + "<async>small</async> end."
    res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(reserve_scale=10, max_new_tokens=300),
                       force=answer)
    assert res.text == "Start big block mid small end." and "<" not in res.text
    assert "context" not in res.limits_hit and "max_positions" in res.limits_hit
    assert res.threads == 1  # the small one still forks
    huge = "A " + P.format(100000) + "<async>x y</async> b."
    res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=100, layout="reserve"), force=huge)  # a reservation
    assert res.text == "A x y b." and res.threads == 0


def test_a_blocks_budget_is_its_text_and_then_only_its_close_tag(model, tokenizer):
    """async_cap=1: a block that never closes writes one token of text (not 1 + the `</async>` allowance); a block
    that closes within its budget keeps its close tag."""
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    open_n = len(tokenizer.encode("<async>", add_special_tokens=False))
    first = tokenizer.encode("one two three four five", add_special_tokens=False)
    answer = "Go " + P.format(3) + "<async>one two three four five</async> end."
    for cap in (1, 2, 3):
        res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(async_cap=cap, max_new_tokens=100),
                           force=answer)
        block = res.token_ids[1]
        assert block[open_n:] == first[:cap] and res.finish[1] == "budget"
        assert f"async_budget(thread 1)" in res.limits_hit and res.text.endswith(" end.")
    short = "Go " + P.format(3) + "<async>ab</async> end."
    n = len(tokenizer.encode("ab", add_special_tokens=False))
    res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(async_cap=n, max_new_tokens=100), force=short)
    assert res.finish[1] == "close" and res.raw == short and not any("budget" in x for x in res.limits_hit)


def test_force_keeps_each_block_with_its_own_promise(model, tokenizer):
    """A forced answer whose first promise has no block: every later block still replays under its own promise
    (one script per promise), and nothing is lost or moved."""
    from pastalm.engine.engine import thread_segments

    answer = "A " + P.format(3) + " then B " + P.format(4) + "<async>second</async> and C " + P.format(4) \
        + "<async>third</async> end."
    scripts = thread_segments(answer)
    assert ["".join(s.text for s in t) for t in scripts[1:]] == ["", "second</async>", "third</async>"]
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    res = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=200), force=answer)
    pieces = [(p["thread"], p["text"]) for p in res.pieces if p["text"]]
    assert (2, "second") in pieces and (3, "third") in pieces
    assert res.text == "A  then B second and C third end."
    # a block with no promise before it is main's text (a stray), as in free decoding
    stray = "X <async>loose</async> Y " + P.format(3) + "<async>kept</async> Z"
    assert ["".join(s.text for s in t) for t in thread_segments(stray)[1:]] == ["kept</async>"]


@pytest.mark.parametrize("layout", ["reserve", "linear"])
def test_one_token_that_completes_a_promise_and_a_sync_joins_its_block(layout):
    """Item 12: an added token `<promise tokens="4"/><sync/>` forks the block and then waits for it: main's next
    token is decided with the block in view (its logits depend on what the block wrote), and the answer reads in
    order."""
    from pastalm.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    both = '<promise tokens="4"/><sync/>'
    tok.add_tokens([both])
    t = tok.convert_tokens_to_ids(both)
    model = tiny_model("llama", vocab_size=len(tok) + 8)
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    main = enc("Sleep well:") + [t] + enc(" done.")
    assert main.count(t) == 1
    prompt = chat_prompt(tok, "Hi")
    cfg = GenerateConfig(layout=layout, max_new_tokens=60, record_logits=True)
    runs = {b: eng.generate(prompt, cfg, scripts=[main, enc(b + "</async>")]) for b in ("one two", "moon song")}
    for b, res in runs.items():
        assert res.threads == 1 and res.text == f"Sleep well:{b} done."
        assert res.raw == f'Sleep well:<promise tokens="4"/><async>{b}</async><sync/> done.'
    # the token fed after <promise ...><sync/> (main's next) sees the block: its logits differ with the block's text;
    # the token before it was fed before the fork and does not
    a, b = (r.logits for r in runs.values())
    key = sorted(k for k in a if k[0] == 0)
    i = len(prompt) + len(enc("Sleep well:"))  # T, in main's tokens
    before = [k for k in key if k[1] == i - 1]
    assert before and torch.equal(torch.as_tensor(a[before[0]]), torch.as_tensor(b[before[0]]))
    after = [k for k in key if k[1] >= i]
    assert after and not torch.allclose(torch.as_tensor(a[after[0]]), torch.as_tensor(b[after[0]]))
