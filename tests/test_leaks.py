"""No tag ever reaches the reader (docs/spec.md, "Stray tags"): whatever a model writes, wherever a limit cuts it,
in any mode, the rendered answer (final and streamed) holds no tag or tag fragment, and the raw form keeps every
character that was written.

The interpreter is driven here without a model: each thread replays a script tokenized with the bundled SmolLM2
tokenizer *as one string per thread*, so real merges across tag boundaries occur (`"/><` is `"/` + `><`: one
token ends a promise and starts the next tag).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pastalm.engine.engine import thread_segments
from pastalm.engine.interpreter import Interpreter, Limits
from pastalm.lang import ReservePolicy
from pastalm.lang.tags import TAG_HEAD_RE
from pastalm.testing import replay_scripts


def thread_texts(annotated: str, sequential: bool) -> list[str]:
    """What each thread writes for an annotated answer (`thread_segments`), as one string per thread."""
    return ["".join(seg.text for seg in segs) for segs in thread_segments(annotated, sequential)]


def drive(interp: Interpreter) -> list[str]:
    """Replay every thread's script (`replay_scripts`); returns the streamed pieces, checking after every step
    that the stream only grows."""
    pieces = [""]

    def step() -> None:
        now = interp.rendered()
        assert now.startswith("".join(pieces)), "the stream never takes back what it showed"
        pieces.append(now[len("".join(pieces)):])

    replay_scripts(interp, step)
    final = interp.rendered(complete=True)
    streamed = "".join(pieces)
    assert final.startswith(streamed)
    return pieces + [final[len(streamed):]]


def encode_main(tok, text: str, split: bool) -> list[int]:
    """Main's script; with `split`, no token straddles the end of a promise. Where a block is decoded inline, the
    interpreter forces `<async>` (or what a merged `><` left of it) right after the promise's last token and a
    replay inserts the block's script there, so a script token merged across that point would hand the next tag's
    '<' to the block: an artifact of fixed scripts, not something a model that writes its own tokens can do
    (`test_inline_block_after_a_merged_token` checks the real case)."""
    if not split:
        return tok.encode(text, add_special_tokens=False)
    parts = re.split(r"(?<=/>)", text)
    return [i for p in parts if p for i in tok.encode(p, add_special_tokens=False)]


def run(tok, annotated: str, limits: Limits, sequential: bool) -> Interpreter:
    texts = thread_texts(annotated, sequential)
    inline = sequential or len(texts) - 1 > limits.max_threads
    scripts = [encode_main(tok, texts[0], inline)] + [tok.encode(t, add_special_tokens=False) for t in texts[1:]]
    prompt = tok.encode("Give tips.", add_special_tokens=False)
    interp = Interpreter(tok, prompt, {tok.eos_token_id}, ReservePolicy.for_tokenizer(tok), limits, sequential,
                         scripts)
    pieces = drive(interp)
    final = interp.rendered(complete=True)
    assert "".join(pieces) == final
    assert not TAG_HEAD_RE.search(final), final
    for t in interp.threads:  # the raw form keeps every character each thread wrote
        written = tok.decode(t.tokens[t.num_prompt:])
        kept = "".join(e.raw for e in t.events)
        if not t.is_main:
            written = written[len("<async>"):]  # the forced open tag is not parsed
        assert written.startswith(kept) and len(written) - len(kept) <= 4, (written, kept)  # <= a held UTF-8 tail
    return interp


def test_promise_merge_token_is_exercised(smol):
    """The bundled tokenizer writes `"/><` as `"/` + `><`: one token ends a promise and starts the next tag."""
    ids = smol.encode('<promise topic="a" tokens="9"/><promise topic="b" tokens="9"/>', add_special_tokens=False)
    assert ["\"/", "><"] == [smol.decode([i]) for i in ids][10:12]


V1 = ('Here are tips:\n\n<promise topic="sleep" tokens="20"/><async>1. **Sleep**: keep a schedule.\n\n</async>'
      '<promise topic="light" tokens="20"/><async>2. **Light**: dim the lights.\n\n</async>'
      '<sync/>These help you rest.')
V2 = ('Here are tips:\n\n1. **Sleep**:<promise topic="sleep" tokens="20"/><async> keep a schedule.</async>\n\n'
      '2. **Light**:<promise topic="light" tokens="20"/><async> dim the lights.</async>\n\n'
      '<sync/>These help you rest.')


@pytest.mark.parametrize("annotated", [V1, V2], ids=["v1", "v2"])
@pytest.mark.parametrize("sequential,max_threads", [(False, 8), (False, 1), (True, 8)],
                         ids=["async", "max_threads", "sequential"])
def test_every_cut_point_leaves_no_tag(smol, annotated, sequential, max_threads):
    """Ending the answer after every possible number of tokens (max_new_tokens) never shows a tag."""
    total = sum(len(smol.encode(t, add_special_tokens=False)) for t in thread_texts(annotated, sequential))
    for n in range(1, total + 2):
        interp = run(smol, annotated, Limits(max_new_tokens=n, max_threads=max_threads), sequential)
        if n > total:
            assert not interp.limits_hit or interp.limits_hit == ["max_threads"]


def test_inline_block_after_a_merged_token(smol):
    """Sequentially, a model that ends its promise with `"/` + `><` gets only `async>` forced after it: the block
    opens, its text is rendered, and the raw form reads `"/><async>`."""
    head = smol.encode('<promise topic="a" tokens="9"/><async>', add_special_tokens=False)
    assert [smol.decode([i]) for i in head[-4:]] == ['"/', "><", "async", ">"]
    script = head[:-2] + smol.encode(" Rest well.</async> Done.", add_special_tokens=False)
    for sequential, max_threads in ((True, 8), (False, 0)):
        interp = Interpreter(smol, smol.encode("Tips?", add_special_tokens=False), {smol.eos_token_id},
                             ReservePolicy.for_tokenizer(smol), Limits(max_threads=max_threads), sequential, [script])
        drive(interp)
        assert interp.rendered(complete=True) == " Rest well. Done."
        assert interp.raw() == '<promise topic="a" tokens="9"/><async> Rest well.</async> Done.'


_TEXT = st.sampled_from(["Tips", " for", " sleep", ".", "\n", "\n\n", " 1.", " **Rest**:", " é", "<", " a < b",
                         "<p>", " x>y"])
_STRAY = st.sampled_from(['<promise topic="x" tokens="5"/>', "<sync>", "<async>", "</async>", "<sync/>",
                          '<promise topic="y" tok', "<prom", "</", "<promise tokens=\"0\"/>"])


@st.composite
def model_outputs(draw):
    """Annotated answers a model might write: text, promises with blocks, syncs, and stray tags anywhere."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        out.append("".join(draw(st.lists(st.one_of(_TEXT, _STRAY), max_size=4))))
        topic = draw(st.sampled_from(["rest", "light", "a b", ""]))
        body = "".join(draw(st.lists(st.one_of(_TEXT, _STRAY), min_size=1, max_size=5)))
        close = draw(st.sampled_from(["</async>", "</async>", "</as", ""]))
        out.append(f'<promise topic="{topic}" tokens="{draw(st.integers(1, 30))}"/><async>{body}{close}')
        if close != "</async>":
            break  # the block never closed: the rest is its text
        if draw(st.booleans()):
            out.append("<sync/>")
    out.append("".join(draw(st.lists(st.one_of(_TEXT, _STRAY), max_size=4))))
    return "".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_outputs(), st.integers(1, 120), st.sampled_from([0.1, 0.5, 2.0]), st.integers(0, 3), st.booleans(),
       st.booleans())
def test_no_tag_reaches_the_reader_property(smol, annotated, max_new, factor, max_threads, sequential, guards):
    """Random model outputs, random token limits, block budgets and thread limits, async or sequential, runaway
    guards on or off: the rendered and streamed text never holds a tag head, and the raw form keeps what was
    written."""
    run(smol, annotated, Limits(max_new_tokens=max_new, async_factor=factor, max_threads=max_threads,
                                repeat_guard=guards, block_guard=guards), sequential)


_WIDE = st.sampled_from([" 🌙", "睡", " ü", "—"])  # characters a byte-level tokenizer splits over several tokens


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model_outputs(), st.lists(_WIDE, max_size=3), st.integers(1, 120), st.integers(0, 3), st.booleans(),
       st.booleans())
def test_streamed_token_entries_equal_the_whole_list(smol, annotated, wide, max_new, max_threads, sequential, guards):
    """The batcher streams logprob entries from the first unsent one on (`token_entries(start=...)`), not by
    rebuilding the whole list every step: after every step, what it sent is the start of `token_logprobs()` built
    whole, all but at most its last entry, and the end of the request completes it to the whole final list."""
    from types import SimpleNamespace

    from pastalm.engine.batch import _send_entries

    for w in wide:  # put characters split over tokens at the seams: in main's text and at a block's start
        annotated = annotated.replace("<async>", "<async>" + w, 1) if "<async>" in annotated else w + annotated
    texts = thread_texts(annotated, sequential)
    scripts = [encode_main(smol, texts[0], sequential or len(texts) - 1 > max_threads)] + [
        smol.encode(t, add_special_tokens=False) for t in texts[1:]]
    interp = Interpreter(smol, smol.encode("Tips?", add_special_tokens=False), {smol.eos_token_id},
                         ReservePolicy.for_tokenizer(smol), Limits(max_new_tokens=max_new, max_threads=max_threads,
                                                                   repeat_guard=guards, block_guard=guards),
                         sequential, scripts)
    sent: list[dict] = []
    req = SimpleNamespace(interp=interp, tokens_sent=0, chars_sent=0, next_entry=None, on_tokens=sent.extend)
    builds = []
    entries = interp.token_entries
    interp.token_entries = lambda *a, **kw: builds.append(1) or entries(*a, **kw)

    def step() -> None:
        builds.clear()
        _send_entries(req)
        assert len(builds) == 1, "the next entry was not found: the whole list was built again"
        whole = interp.token_logprobs()
        assert sent == whole[: len(sent)] and len(sent) >= len(whole) - 1
        assert req.chars_sent == sum(len(e["text"]) for e in sent)

    replay_scripts(interp, step)
    final = interp.token_logprobs(complete=True)
    assert final[: len(sent)] == sent
    assert "".join(e["text"] for e in final) == interp.rendered(complete=True)
