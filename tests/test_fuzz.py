"""Interpreter fuzzing (issue 15): a scripted "model" writes random streams of tag pieces and text under random
limits and layouts. Whatever it writes, the interpreter never raises, never feeds a position or a cache slot past
its limit, never lets the model choose more than max_new_tokens, never loses a character any thread wrote (the raw
form keeps it), and never shows a tag in the rendered answer, streamed or final.

A few hundred cases run by default; `PASTA_FUZZ_EXAMPLES=10000 pytest -m long tests/test_fuzz.py` is the long run.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pastalm.engine.interpreter import Interpreter, Limits
from pastalm.lang import ReservePolicy
from pastalm.lang.tags import TAG_HEAD_RE

PIECES = ['<promise tokens="3"/>', '<promise topic="a" tokens="5"/>', '<promise topic="b" tokens="1"/>',
          "<promise", ' tokens="', '9"', "/>", "<async>", "</async>", "<sync/>", "<sync", "<", ">", "/", '"',
          "</", "<as", "ync>", "</asy", "nc>", "<pro", "mise", " word", "Text", "\n\n", "1. ", "**B**:", " a", ".",
          "é", "x" * 7]
WHOLE_TAGS = ['<promise tokens="3"/>', '<promise topic="a" tokens="5"/>', '<promise tokens="8"/>', "<sync/>",
              "</async>", " text", '<promise tokens="20"/>']  # weighted up, so that most cases fork
# Fragments over 256 characters (issue 26): 'Z' and '7' are written nowhere else, so none may ever be shown. The
# space keeps the head's '<' a token of its own: after `"/>` + `<` main may take a merged '<' as the start of the
# forced `<async>` of an inline block (T1), and what follows is then the block's text
LONG = [' <promise topic="' + "Z" * 250, ' <promise tokens="' + "7" * 250, ' <promise topic="' + "Z" * 300 + '"/>']

streams = st.lists(st.lists(st.one_of(st.sampled_from(PIECES), st.sampled_from(WHOLE_TAGS),
                                      st.sampled_from(LONG)), max_size=25), min_size=1, max_size=4)
limits = st.fixed_dictionaries({
    "max_new_tokens": st.integers(1, 200), "async_factor": st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    "async_cap": st.integers(1, 40), "max_threads": st.integers(0, 6),
    "max_promises": st.one_of(st.none(), st.integers(1, 4)), "repeat_guard": st.booleans(),
    "block_guard": st.booleans(), "extra_positions": st.one_of(st.none(), st.integers(1, 120)),
    "extra_context": st.one_of(st.none(), st.integers(1, 200)),
})


def check_one(tok, texts: list[list[str]], lim: dict, layout: str, scale: float, sequential: bool,
              spelled: bool = False) -> None:
    """`spelled`: `tok` has the tags as tokens of their own (`--tag-tokens`), and each piece is tokenized alone,
    so a tag cut into pieces stays spelled out (`<promise`, ` tokens="`, ...) next to whole one-token tags."""
    prompt = tok.encode("Give tips.", add_special_tokens=False)
    n = len(prompt)
    extra_p, extra_c = lim.pop("extra_positions"), lim.pop("extra_context")
    limits = Limits(**lim, max_positions=None if extra_p is None else n + extra_p,
                    max_context=None if extra_c is None else n + extra_c)
    policy = ReservePolicy.for_tokenizer(tok, 0.0 if layout == "linear" else scale, layout)
    interp = Interpreter(tok, prompt, {tok.eos_token_id}, policy, limits, sequential)
    # the "model": thread t writes stream t mod k, one token per step, then EOS
    if spelled:
        streams = [[i for p in pieces for i in tok.encode(p, add_special_tokens=False)] for pieces in texts]
    else:
        streams = [tok.encode("".join(pieces), add_special_tokens=False) for pieces in texts]
    written: dict[int, int] = {}
    shown = ""
    for _ in range(10_000):
        if interp.finished:
            break
        feeds = interp.schedule()
        if not feeds:
            interp.stop("stalled")
            break
        for f in feeds:
            if limits.max_positions is not None:
                assert max(f.span.positions) < limits.max_positions, (f, limits)
        if limits.max_context is not None:
            assert interp.num_slots <= limits.max_context
        for tid in interp.fed(feeds):
            s = streams[tid % len(streams)]
            k = written.get(tid, 0)
            written[tid] = k + 1
            interp.write(tid, s[k] if k < len(s) else tok.eos_token_id)
        assert interp.num_chosen() <= limits.max_new_tokens
        now = interp.rendered()
        assert now.startswith(shown), "the stream never takes back what it showed"
        shown = now
        assert not TAG_HEAD_RE.search(now) and not SHOWN_NEVER.search(now), now
    assert interp.finished
    final = interp.rendered(complete=True)
    assert final.startswith(shown) and not TAG_HEAD_RE.search(final) and not SHOWN_NEVER.search(final), final
    assert interp.num_chosen() <= limits.max_new_tokens
    for t in interp.threads:  # the raw form keeps every character each thread wrote
        text = tok.decode(t.tokens[t.num_prompt:])
        kept = "".join(e.raw for e in t.events)
        if not t.is_main:
            text = text[len("<async>"):]  # the forced open tag is not parsed
        assert text.startswith(kept) and len(text) - len(kept) <= 4, (text, kept)
    raw = interp.raw()
    for e in interp.main.events:
        assert e.raw in raw


SHOWN_NEVER = re.compile("[Z7]")


@pytest.fixture(scope="module")
def smol_tags(smol):
    """The bundled tokenizer with the tags as tokens of their own (`lang.tags.TAG_TOKENS`)."""
    from pastalm.lang.tags import TAG_TOKENS
    from pastalm.models import load_tokenizer

    tok = load_tokenizer()
    tok.add_tokens(TAG_TOKENS)
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in TAG_TOKENS)
    return tok


def _fuzz(smol, smol_tags, texts, lim, layout, scale, sequential, spelled):
    check_one(smol_tags if spelled else smol, texts, dict(lim), layout, scale, sequential, spelled)


CASES = dict(texts=streams, lim=limits, layout=st.sampled_from(["reserve", "linear"]),
             scale=st.sampled_from([0.0, 0.5, 1.0, 3.0]), sequential=st.sampled_from([False, False, False, True]),
             spelled=st.booleans())


# the default run is derandomized and keeps no example database, so every machine and CI run checks the same 300
# cases; the long run draws new ones each time
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(**CASES)
def test_interpreter_fuzz(smol, smol_tags, texts, lim, layout, scale, sequential, spelled):
    _fuzz(smol, smol_tags, texts, lim, layout, scale, sequential, spelled)


@pytest.mark.long
@settings(max_examples=int(os.environ.get("PASTA_FUZZ_EXAMPLES", "10000")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(**CASES)
def test_interpreter_fuzz_long(smol, smol_tags, texts, lim, layout, scale, sequential, spelled):
    _fuzz(smol, smol_tags, texts, lim, layout, scale, sequential, spelled)


def test_inline_block_after_a_stray_angle_bracket_shows_no_tag(smol):
    """Found by the long run: SmolLM2 writes '"/' + '><', so the token that ends a promise decoded inline also
    begins the next tag, and the forced <async> takes that '<'. A '<' written just before the promise used to stay
    text and join the block's first word into '<promise' in the rendered answer; a '<' right before a tag head is
    now a stray (docs/spec.md L5)."""
    lim = {"max_new_tokens": 10, "async_factor": 0.5, "async_cap": 1, "max_threads": 0, "max_promises": None,
           "repeat_guard": False, "block_guard": False, "extra_positions": None, "extra_context": None}
    for lead in (["<"], ["<", "<"], ["<", "</"]):
        check_one(smol, [lead + ['<promise tokens="3"/>', '<promise tokens="3"/>']], dict(lim), "reserve", 0.0,
                  False)
