"""Issue 26, items 5 and 6, on a tokenizer with the tags as tokens of their own (`lang.tags.TAG_TOKENS`): no tag in
any logprob field (no entry for a token that wrote only tag characters, no tag among the top alternatives), in the
engine and through the server's chat, streamed chat and text completions; and `Result.tokens` counts the written
tokens of the rendered text when a tag is spelled out in pieces. Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig, scripts_for
from pastalm.engine.engine import thread_segments
from pastalm.lang.tags import SYNC, TAG_HEAD_RE, TAG_TOKENS
from pastalm.models import chat_prompt
from pastalm.testing import tiny_model, tiny_tokenizer

ANSWER = ("Tips:\n" + '<promise tokens="10"/><async>x</async>\n' + '<promise tokens="20"/><async>y</async>\n'
          + "<sync/>End.")
CONFIG = dict(async_cap=5, max_new_tokens=60, temperature=0.0)


@pytest.fixture(scope="module")
def tagged():
    """A tag-token tokenizer and a tiny model that ranks every tag token right below its top choice (so each top
    list of today's model would show them) and never picks a token that is part of a character or special (so each
    written token shows its own text)."""
    tok = tiny_tokenizer()
    tok.add_tokens(TAG_TOKENS)
    tags = tok.convert_tokens_to_ids(TAG_TOKENS)
    assert all(tok.encode(t, add_special_tokens=False) == [i] for t, i in zip(TAG_TOKENS, tags))
    banned = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i]) or i in tok.all_special_ids]
    model = tiny_model("llama", vocab_size=len(tok))
    real = model.forward

    def forward(*a, **kw):
        out = real(*a, **kw)
        lg = out.logits
        lg[..., banned + tags] = float("-inf")
        top = lg.max(-1, keepdim=True).values
        lg[..., tags] = top - 1e-3 * torch.arange(1, len(tags) + 1, dtype=lg.dtype)
        return out

    model.forward = forward
    return tok, model, set(tags)


def enc(tok, s: str) -> list[int]:
    return tok.encode(s, add_special_tokens=False)


def rendered_ids(tok, res) -> list[int]:
    """The reference: the ids that wrote the rendered answer, in reading order, from the replayed main's segments
    and each block's written tokens (after its forced `<async>`), tags left out."""
    out, block = [], 1
    for seg in thread_segments(ANSWER)[0]:
        if seg.text.startswith("<promise"):
            out += res.token_ids[block][1:]
            block += 1
        elif seg.text != SYNC:
            out += enc(tok, seg.text)
    return out


def replay(eng, prompt: list[int], **kw):
    """Main replays ANSWER's main thread (written at once); the blocks decode freely, so their tokens carry
    logprobs."""
    return eng.generate(prompt, GenerateConfig(**CONFIG, **kw), scripts=[scripts_for(eng.tokenizer, ANSWER)[0]],
                        scaffold=True)


def test_logprob_entries_leave_out_tag_tokens(tagged):
    """One entry per token that shows rendered text, none for a tag token (the promise, `<sync/>` that ends where
    text begins); no tag token among the alternatives, which keep the model's order."""
    tok, model, tags = tagged
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    res = replay(eng, chat_prompt(tok, "Give tips."), logprobs=5)
    assert res.threads == 2 and res.text.startswith("Tips:\n") and res.text.endswith("\nEnd.")
    assert [e["id"] for e in res.logprobs] == rendered_ids(tok, res)
    assert "".join(e["text"] for e in res.logprobs) == res.text and all(e["text"] for e in res.logprobs)
    chose = [e for e in res.logprobs if e["logprob"] is not None]
    assert len(chose) == 10  # both blocks' 5 tokens
    for e in chose:
        assert e["top"] and not tags & {i for i, _ in e["top"]}
        assert e["top"][0] == (e["id"], pytest.approx(e["logprob"]))  # greedy: the token is its own top choice
        assert [v for _, v in e["top"]] == sorted((v for _, v in e["top"]), reverse=True)


class Replaying(Engine):
    """Every request the server admits replays ANSWER's main thread, its blocks decoding freely: a forked answer
    with tag tokens through the real endpoints."""

    def batcher(self):
        b = super().batcher()
        add = b.add
        b.add = lambda ids, config, **kw: add(ids, config, scripts=[scripts_for(self.tokenizer, ANSWER)[0]],
                                              scaffold=True, **kw)
        return b


def no_tag(texts) -> bool:
    return not any(TAG_HEAD_RE.search(t) for t in texts)


def test_no_tag_in_any_logprob_field_through_the_server(tagged):
    """Chat, streamed chat and /v1/completions: the tokens are the rendered answer's written tokens (against the
    engine's own replay of the same prompt), and no top_logprobs entry is a tag."""
    openai = pytest.importorskip("openai")
    from pastalm.serve.app import ServeConfig, create_app
    from pastalm.testing import local_server

    tok, model, _ = tagged
    eng = Replaying(model, tok, "tiny", stop_ids={tok.eos_token_id})
    msg, text = "Give tips.", "Tips for the road"
    want_chat = [tok.decode([i]) for i in rendered_ids(tok, replay(eng, chat_prompt(tok, msg)))]
    want_text = [tok.decode([i]) for i in rendered_ids(tok, replay(eng, list(tok.encode(text))))]
    app = create_app(eng, ServeConfig(model_id="tiny", defaults=GenerateConfig(**CONFIG)))
    with local_server(app, timeout=60, lifespan="on") as base:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
        kw = dict(model="tiny", messages=[{"role": "user", "content": msg}], temperature=0, logprobs=True,
                  top_logprobs=5)
        r = c.chat.completions.create(**kw).choices[0]
        lp = r.logprobs.content
        assert [t.token for t in lp] == want_chat and "".join(want_chat) == r.message.content
        assert no_tag(a.token for t in lp for a in t.top_logprobs)
        chose = [t for t in lp if t.top_logprobs]
        assert len(chose) == 10 and all(t.top_logprobs[0].token == t.token for t in chose)
        streamed = []
        for ch in c.chat.completions.create(**kw, stream=True):
            for part in ch.choices:
                if part.logprobs is not None and part.logprobs.content:
                    streamed += part.logprobs.content
        assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in streamed] == \
            [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in lp]
        comp = c.completions.create(model="tiny", prompt=text, temperature=0, logprobs=5).choices[0]
        assert comp.logprobs.tokens == want_text and "".join(want_text) == comp.text
        tops = [d for d in comp.logprobs.top_logprobs if d]
        assert len(tops) == 10 and no_tag(k for d in tops for k in d)


def test_tokens_count_what_was_written_for_the_rendered_text(tagged):
    """Item 6: the model spells the promise and `</async>` out in pieces of the base vocabulary (the audit saw 7
    tokens for a 5-token text): `tokens` is the written tokens of the rendered text, `tag_tokens` the tokens
    written for tags (the forced `<async>` included), and together they are every written token."""
    tok, model, _ = tagged
    base = tiny_tokenizer()  # the base vocabulary: no tag is one token
    spell = lambda s: enc(base, s)  # noqa: E731
    promise, close = spell('<promise tokens="20"/>'), spell("</async>")
    assert len(promise) > 1 and len(close) > 1
    texts = {"main": ["Plan: ", " then", " done."], "block": ["pack a tent"]}
    main = (enc(tok, "Plan: ") + promise + enc(tok, " then") + tok.convert_tokens_to_ids([SYNC])
            + enc(tok, " done."))
    block = enc(tok, "pack a tent") + close
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    res = eng.generate(chat_prompt(tok, "Hi"), GenerateConfig(max_new_tokens=100, logprobs=0), scripts=[main, block])
    assert res.threads == 1 and res.text == "Plan: pack a tent then done."
    shown = sum(len(enc(tok, s)) for s in texts["main"] + texts["block"])
    assert res.tokens == shown == len(res.logprobs)
    assert res.tag_tokens == len(promise) + 1 + 1 + len(close)  # the promise, <sync/>, the forced <async>, </async>
    assert res.tokens + res.tag_tokens == sum(map(len, res.token_ids))


def test_a_refused_lead_is_neither_rendered_nor_tag_tokens(tagged):
    """The lead of a promise a runaway guard refuses is written but not shown: neither in `tokens` nor in
    `tag_tokens`; with it they add up to every written token."""
    tok, model, _ = tagged
    answer = ('Ways:\n\n1. **Buy**:<promise tokens="10"/><async> in bulk.</async>\n\n'
              '2. **Plan**:<promise tokens="10"/><async> your meals.</async>\n\n'
              '3. **Cook**:<promise tokens="10"/><async> at home.</async>')
    eng = Engine(model, tok, "tiny", stop_ids={tok.eos_token_id})
    res = eng.generate(chat_prompt(tok, "Save money?"), GenerateConfig(max_new_tokens=200, max_promises=2,
                                                                        logprobs=0), force=answer)
    assert res.limits_hit == ["max_promises"]
    assert res.text == "Ways:\n\n1. **Buy**: in bulk.\n\n2. **Plan**: your meals.\n\n"
    lead = len(enc(tok, "\n\n3. **Cook**:")) - len(enc(tok, "\n\n"))
    shown = sum(len(enc(tok, s)) for s in ("Ways:\n\n1. **Buy**:", " in bulk.", "\n\n2. **Plan**:", " your meals.",
                                           "\n\n"))
    assert res.tokens == shown == len(res.logprobs)
    assert res.tag_tokens == 7  # two promises, their <async> and </async>, and the refused promise
    assert res.tokens + res.tag_tokens + lead == sum(map(len, res.token_ids))
