"""Tests of PASTA-LANG (docs/spec.md section 1) and its layout rules (section 2): parser, render, validate, layout.

Pure Python: no torch, no model, no tokenizer download.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pastalm.lang import (
    ASYNC_CLOSE,
    ASYNC_OPEN,
    IGNORE,
    SYNC,
    AsyncClose,
    AsyncOpen,
    Promise,
    ReservePolicy,
    Stray,
    StreamParser,
    Sync,
    Text,
    layout_segments,
    parse,
    render,
    tokenize_segments,
    validate,
)
from pastalm.lang.tags import MAX_PROMISE_CHARS, PROMISE_RE, TAG_HEAD_RE, parse_promise

ROLES = ("serialized", "main", "async")

# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------


def merge_text(events):
    """Merge adjacent Text events and adjacent Stray events (how many pieces a run of text comes in is not part
    of the contract)."""
    out = []
    for e in events:
        if isinstance(e, (Text, Stray)) and out and type(out[-1]) is type(e):
            out[-1] = type(e)(out[-1].raw + e.raw)
        else:
            out.append(e)
    return out


def stream(pieces, role):
    """Feed pieces one by one to a fresh StreamParser, then close it; return all events."""
    p = StreamParser(role)
    events = []
    for piece in pieces:
        events.extend(p.feed(piece))
    events.extend(p.close())
    return events


def valid_promises_in(s):
    """Complete, valid promise tags (short enough for the streaming parser) found anywhere in s."""
    found = []
    for m in PROMISE_RE.finditer(s):
        tag = m.group(0)
        if len(tag) <= MAX_PROMISE_CHARS and parse_promise(tag) is not None:
            found.append(tag)
    return found


def kinds(events):
    """Event class names, for compact comparisons."""
    return [type(e).__name__ for e in events]


# --------------------------------------------------------------------------------------------------------------
# 1. Property test: streaming parser
# --------------------------------------------------------------------------------------------------------------

PLAIN = list('abZ07 \n\t<>/"=é日')
FRAGMENTS = [
    '<promise topic="x" tokens="5"/>',
    '<promise tokens="0"/>',
    '<promise tokens="-3"/>',
    '<promise topic="a"',
    ' tokens="3"',
    ' tokens="',
    "/>",
    " />",
    '<promise topic="日本 é" tokens="12" extra="q"/>',
    '<promise\n tokens="4" />',
    '<promise topic="a"b" tokens="2"/>',
    "<promise/>",
    '<promisex tokens="2"/>',
    "<promise",
    "<promise ",
    ASYNC_OPEN,
    ASYNC_CLOSE,
    SYNC,
    "<sync",
    "<sync>",
    "</asy",
    "<asy",
    "<",
    "x" * 90,
]

annotated_text = st.lists(st.sampled_from(PLAIN + FRAGMENTS), max_size=40).map("".join)


@st.composite
def text_and_pieces(draw):
    text = draw(annotated_text)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]  # may include empty pieces
    return text, pieces


def check_recognized(events, role):
    """No Text event holds a tag the rules of its context require to be recognized."""
    if role == "main":
        for e in events:
            assert not isinstance(e, (AsyncOpen, AsyncClose)), e
            if isinstance(e, Text):
                assert SYNC not in e.raw, e
                assert not valid_promises_in(e.raw), e
    elif role == "serialized":
        in_block = False
        prev = None
        for e in events:
            if isinstance(e, AsyncOpen):
                assert not in_block and isinstance(prev, Promise), "<async> opens a block only right after a promise"
                in_block = True
            elif isinstance(e, AsyncClose):
                assert in_block
                in_block = False
            elif isinstance(e, (Promise, Sync)):
                assert not in_block, "tags inside a block are text"
            elif in_block:
                assert ASYNC_CLOSE not in e.raw, e
            else:
                assert SYNC not in e.raw, e
                assert not valid_promises_in(e.raw), e
                if isinstance(prev, Promise):
                    assert not e.raw.startswith(ASYNC_OPEN), e
            if not isinstance(e, Stray):  # a stray is as if it were not there (docs/spec.md L5)
                prev = e
    else:  # async
        closes = [i for i, e in enumerate(events) if isinstance(e, AsyncClose)]
        assert len(closes) <= 1
        end = closes[0] if closes else len(events)
        for i, e in enumerate(events):
            if i != end:
                assert isinstance(e, (Text, Stray)), e
            if i < end:
                assert ASYNC_CLOSE not in e.raw, e


@settings(max_examples=400, deadline=None)
@given(text_and_pieces())
def test_stream_parser_properties(tp):
    """Streaming never raises, loses nothing, matches one-shot parsing and recognizes every tag it must."""
    text, pieces = tp
    for role in ROLES:
        events = stream(pieces, role)
        assert "".join(e.raw for e in events) == text
        assert all(e.raw for e in events), "no empty events"
        assert merge_text(events) == merge_text(parse(text, role))
        for e in events:
            if isinstance(e, Promise):
                assert parse_promise(e.raw) == (e.topic, e.tokens)
                assert e.tokens > 0 and '"' not in e.topic
        check_recognized(events, role)
        for e in events:  # no tag head is ever text: it is a tag, or a stray that is not rendered
            if isinstance(e, Text):
                assert not TAG_HEAD_RE.search(e.raw), e

    # render: the Text events of the one-shot serialized parse, i.e. the input minus every tag's raw.
    events = parse(text)
    rendered = render(text)
    assert rendered == "".join(e.raw for e in events if isinstance(e, Text))
    kept, pos = [], 0
    for e in events:
        assert text[pos : pos + len(e.raw)] == e.raw
        if isinstance(e, Text):
            kept.append(text[pos : pos + len(e.raw)])
        pos += len(e.raw)
    assert pos == len(text)
    assert rendered == "".join(kept)


# --------------------------------------------------------------------------------------------------------------
# 2. Parser unit tests
# --------------------------------------------------------------------------------------------------------------

CANONICAL = (
    "Here are three ways to sleep better.\n"
    '<promise topic="schedule" tokens="30"/><async>1. Keep a fixed schedule: ...</async>\n'
    '<promise topic="screens" tokens="30"/><async>2. Avoid screens an hour before bed: ...</async>\n'
    '<promise topic="caffeine" tokens="20"/><async>3. Cut caffeine after noon: ...</async>\n'
    "<sync/>Together these habits make falling asleep easier."
)
CANONICAL_RENDERED = (
    "Here are three ways to sleep better.\n"
    "1. Keep a fixed schedule: ...\n"
    "2. Avoid screens an hour before bed: ...\n"
    "3. Cut caffeine after noon: ...\n"
    "Together these habits make falling asleep easier."
)


def test_canonical_example_events():
    """The three-promise example of the spec parses to the expected events and promises."""
    events = merge_text(parse(CANONICAL))
    block = ["Promise", "AsyncOpen", "Text", "AsyncClose", "Text"]
    assert kinds(events) == ["Text", *block, *block, *block[:-1], "Text", "Sync", "Text"]
    assert [(e.topic, e.tokens) for e in events if isinstance(e, Promise)] == [
        ("schedule", 30),
        ("screens", 30),
        ("caffeine", 20),
    ]
    assert events[3] == Text("1. Keep a fixed schedule: ...")
    assert events[-1] == Text("Together these habits make falling asleep easier.")


def test_canonical_example_render():
    """Rendering the canonical example gives back the un-annotated answer."""
    assert render(CANONICAL) == CANONICAL_RENDERED


def test_async_not_after_promise_is_stray():
    """In the serialized role, `<async>` that does not directly follow a promise is a stray (and so is the
    `</async>` that has no block to close): kept in the raw form, not rendered."""
    assert merge_text(parse("a <async>b</async>")) == [Text("a "), Stray("<async>"), Text("b"), Stray("</async>")]
    events = merge_text(parse('<promise topic="t" tokens="3"/> <async>x</async>'))
    assert kinds(events) == ["Promise", "Text", "Stray", "Text", "Stray"]
    assert render('<promise topic="t" tokens="3"/> <async>x</async>') == " x"


def test_tags_inside_block_are_strays():
    """Inside a block only `</async>` is a tag; promises, `<sync/>` and `<async>` written there are strays."""
    inner = 'x <sync/> <promise topic="b" tokens="2"/> <async> y'
    events = merge_text(parse(f'<promise topic="a" tokens="3"/><async>{inner}</async>'))
    assert kinds(events) == ["Promise", "AsyncOpen", "Text", "Stray", "Text", "Stray", "Text", "Stray", "Text",
                             "AsyncClose"]
    assert "".join(e.raw for e in events[2:-1]) == inner
    assert render(f'<promise topic="a" tokens="3"/><async>{inner}</async>') == "x    y"


@pytest.mark.parametrize(
    "tag",
    [
        '<promise topic="t" tokens="0"/>',
        '<promise topic="t" tokens="-3"/>',
        '<promise topic="t" tokens="abc"/>',
        '<promise topic="t" tokens=""/>',
        '<promise topic="t"/>',
        '<promise topic="a"b" tokens="3"/>',
        '<promise topic="ab tokens="3"/>',
        '<promise topic=t tokens="3"/>',
        '<promise topic="t" tokens="3">',
        "<sync>",
        "<async/>",
        "</sync>",
    ],
)
def test_invalid_tag_is_stray(tag):
    """A promise with a bad tokens value, a quoting problem or a bad ending, or a misspelt tag, is a stray in both
    main roles: the raw form keeps it, the reader never sees it."""
    for role in ("serialized", "main"):
        assert merge_text(parse(f"a{tag}b", role)) == [Text("a"), Stray(tag), Text("b")]
    assert render(f"a{tag}b") == "ab"


def test_html_and_comparisons_stay_text():
    """Only the PASTA tag names make a tag: HTML, comparisons and lookalike names are text."""
    for text in ("a < b and c<d", "<p>hi</p> <a href='x'>", "<s>", "<asyncio>", "<promises>", "<sync-point>",
                 "x < y", "a <<= b", "<<"):
        assert merge_text(parse(text + ".")) == [Text(text + ".")], text
    # only at the very end is a '<' a stray: a budget cuts blocks at the '<' of their `</async>`
    assert merge_text(parse("x <")) == [Text("x "), Stray("<")]


def test_unknown_attributes_ignored():
    """Unknown attributes (in any order) do not stop a promise from parsing."""
    tag = '<promise kind="list" tokens="7" topic="t" lang="en" />'
    assert parse(tag) == [Promise("t", 7, tag)]
    assert parse('<promise tokens="4"/>', "main") == [Promise("", 4, '<promise tokens="4"/>')]


def test_unicode_digit_tokens_do_not_crash():
    """A promise whose tokens value is a non-decimal unicode digit ('²', '①') is a stray and never raises."""
    for value in ("²", "①"):
        tag = f'<promise topic="t" tokens="{value}"/>'
        for role in ("serialized", "main"):
            try:
                events = parse(tag, role)
            except ValueError as exc:  # malformed tags never crash anything
                pytest.fail(f"parse({tag!r}, {role!r}) raised {exc!r}")
            assert merge_text(events) == [Stray(tag)]


def test_char_by_char_equals_one_shot():
    """Feeding the canonical example one character at a time gives the same events as one-shot parsing."""
    for role in ROLES:
        assert merge_text(stream(list(CANONICAL), role)) == merge_text(parse(CANONICAL, role))
    assert merge_text(stream(list(CANONICAL), "serialized")) == merge_text(parse(CANONICAL))


def test_partial_tag_held_until_decided():
    """A possible tag prefix is held back by feed() and decided when the rest arrives."""
    p = StreamParser("main")
    assert p.feed("hello <prom") == [Text("hello ")]
    assert p.feed('ise topic="t" tok') == []
    assert p.feed('ens="2"/>ok') == [Promise("t", 2, '<promise topic="t" tokens="2"/>'), Text("ok")]
    assert p.close() == []
    q = StreamParser("main")
    assert q.feed("x <syn") == [Text("x ")]
    assert q.close() == [Stray("<syn")]  # a tag cut by the end of the thread is never shown
    r = StreamParser("main")
    assert r.feed("x <") == [Text("x ")]
    assert r.close() == [Stray("<")]  # even a lone '<' at the end: it could join the next piece into a tag head
    q = StreamParser("main")  # '<' right before a tag head is a cut tag start; '<' before other text is text
    assert q.feed("a <") == [Text("a ")] and q.feed("<") == [] and q.feed("sync/>") == [Stray("<"), Sync()]
    assert q.feed("b << c <<asyncio") == [Text("b << c <<asyncio")] and q.close() == []
    assert parse("a <<</<sync/>b", "main") == [Text("a "), Stray("<<"), Stray("</"), Sync(), Text("b")]


def test_tag_cut_by_a_limit_is_stray_in_every_role():
    """A thread that stops in the middle of a tag (a token limit) leaves a stray, not text, in every role."""
    cut = '...can help improve<promise topic="improved" tokens="50'
    for role in ROLES:
        events = merge_text(parse(cut, role))
        assert events == [Text("...can help improve"), Stray('<promise topic="improved" tokens="50')], role


def test_fragment_ends_at_line_break_or_angle():
    """A broken tag ends at its first '>', or before a '<' or a line break: the text after it is kept."""
    assert merge_text(parse('a<promise topic="x\nnext line')) == [Text("a"), Stray('<promise topic="x'),
                                                                   Text("\nnext line")]
    assert merge_text(parse("a<sync <b>")) == [Text("a"), Stray("<sync "), Text("<b>")]


def test_long_promise_prefix_is_released_at_the_hold_limit_as_a_stray():
    """A '<promise ' prefix longer than the hold limit and without '>' comes out of feed() as soon as it passes the
    limit, all of it a stray (issue 26: its tail used to be text)."""
    prefix = "<promise " + "a" * (MAX_PROMISE_CHARS + 50)
    for role in ("serialized", "main"):
        p = StreamParser(role)
        out = p.feed(prefix)
        assert "".join(e.raw for e in out) == prefix
        assert out[0] == Stray(prefix[:MAX_PROMISE_CHARS]) and all(isinstance(e, Stray) for e in out)
        assert p.close() == []
        q = StreamParser(role)
        released = []
        for c in prefix:
            released.extend(q.feed(c))
        assert "".join(e.raw for e in released) == prefix
        assert q.close() == []


def test_async_role_after_close_is_text():
    """In the async role, `</async>` ends the block and everything after it is text."""
    events = merge_text(parse("chunk <sync/></async> more </async><sync/>", "async"))
    assert events == [Text("chunk "), Stray("<sync/>"), AsyncClose(), Text(" more "), Stray("</async><sync/>")]


def test_bad_role_raises():
    """An unknown role is a programming error and raises ValueError."""
    with pytest.raises(ValueError, match="role must be one of"):
        StreamParser("nope")


# --------------------------------------------------------------------------------------------------------------
# 3. validate
# --------------------------------------------------------------------------------------------------------------


def test_validate_good_annotation():
    """The canonical annotation is valid, lossless against its original, and counts promises and syncs."""
    rep = validate(CANONICAL, original=CANONICAL_RENDERED, require_promise=True)
    assert rep.ok, rep.problems
    assert (rep.promises, rep.syncs) == (3, 1)


def test_validate_plain_text_ok_without_require_promise():
    """Plain text with no tags is a valid (if useless) annotation unless a promise is required."""
    assert validate("just an answer", original="just an answer").ok
    rep = validate("just an answer", require_promise=True)
    assert not rep.ok and rep.reasons == ["no-promise"] and "no promise" in rep.problems[0]


@pytest.mark.parametrize(
    "annotated, reasons, where",
    [
        ('a <promise topic="t" tokens="3"/> b', {"promise-without-block"}, "promise 1 ('t')"),
        ('a <promise topic="t" tokens="3"/> <async>x</async>', {"promise-without-block", "malformed-tag"},
         "'</async>'"),  # block not directly after its promise: its tags are strays
        ('<promise topic="t" tokens="3"/><async>abc', {"unclosed-block"}, "never closed"),
        ('a <promise topic="t" tokens="0"/> b', {"malformed-tag"}, '\'<promise topic="t" tokens="0"/>\''),
        ("a <sync> b", {"malformed-tag"}, "'<sync>'"),
        ("a </async> b", {"malformed-tag"}, "'</async>'"),
        ('<promise topic="t" tokens="3"/><async>x <sync/></async>', {"malformed-tag"}, "'<sync/>'"),  # tag in a block
    ],
)
def test_validate_problems(annotated, reasons, where):
    """Missing or unclosed blocks and malformed tags in main text are reported, each for what it is, and the message
    names the offending promise or tag."""
    rep = validate(annotated)
    assert not rep.ok
    assert set(rep.reasons) == reasons and len(rep.problems) == len(rep.reasons)
    assert any(where in p for p in rep.problems), rep.problems


def test_validate_not_lossless():
    """An annotation whose render differs from the original answer is reported."""
    rep = validate(CANONICAL, original=CANONICAL_RENDERED + " extra")
    assert not rep.ok and rep.reasons == ["not-lossless"] and "differs from the original" in rep.problems[0]


# --------------------------------------------------------------------------------------------------------------
# 4. layout
# --------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """Fake tokenizer: one id per character (its code point)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


OVERHEAD = len(ASYNC_OPEN) + len(ASYNC_CLOSE)  # tag length in the character tokenizer
PROMPT = "Q? "
CHUNK1, CHUNK2 = "alpha chunk", "beta!"
P1 = f'<promise topic="a" tokens="{len(CHUNK1)}"/>'
P2 = f'<promise topic="b" tokens="{len(CHUNK2)}"/>'
BLOCK1, BLOCK2 = f"<async>{CHUNK1}</async>", f"<async>{CHUNK2}</async>"
ANNOTATED = f"Intro:\n{P1}{BLOCK1}Then {P2}{BLOCK2}\n{SYNC}Done."
FULL = PROMPT + ANNOTATED  # serialized sequence; token i is character i
EOS = 9999


def _layout(scale, eos_id=None):
    return layout_segments(
        [ord(c) for c in PROMPT],
        tokenize_segments(CharTokenizer(), ANNOTATED),
        ReservePolicy(scale=scale, overhead=OVERHEAD),
        eos_id=eos_id,
    )


def _at(sub, offset=0):
    """Serialized index range of the first occurrence of sub in FULL (at or after offset)."""
    start = FULL.index(sub, offset)
    return range(start, start + len(sub))


I_P1, I_P2 = _at(P1), _at(P2)
I_B1, I_B2 = _at(BLOCK1), _at(BLOCK2)
I_SYNC = _at(SYNC)
I_THEN = _at("Then ")
I_DONE = _at("Done.")
I_PROMPT = range(len(PROMPT))


def visibility(lay):
    """Boolean matrix vis[q][x]: token q may attend to token x, expanded from the layout's spans."""
    views = [span.view for span in lay.spans for _ in span.positions]
    n = len(lay.input_ids)
    assert len(views) == n
    vis = []
    for q in range(n):
        v, tq = views[q], lay.thread[q]
        row = []
        for x in range(n):
            tx = lay.thread[x]
            if tx == tq:
                row.append(lay.index[x] <= lay.index[q])
            else:
                row.append(lay.index[x] < (v[tx] if tx < len(v) else 0))
        vis.append(row)
    return vis


def sees_all(vis, queries, keys):
    return all(vis[q][x] for q in queries for x in keys)


def sees_none(vis, queries, keys):
    return not any(vis[q][x] for q in queries for x in keys)


def test_reserve_policy():
    """R = ceil(scale * N) + overhead, scale 0 gives 0, a negative or infinite scale raises."""
    assert ReservePolicy(0, 15).reserve(40) == 0
    assert ReservePolicy(1, 15).reserve(40) == 55
    assert ReservePolicy(2.5, 15).reserve(3) == 8 + 15  # ceil(7.5) = 8
    assert ReservePolicy(2.5, 0).reserve(4) == 10
    assert ReservePolicy().reserve(7) == 7
    for bad in (-1, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="reserve scale must be a finite number >= 0"):
            ReservePolicy(bad, 0)
    with pytest.raises(ValueError, match="reserve overhead must be >= 0"):
        ReservePolicy(1, -1)


def test_layout_scale1_plain_positions():
    """With scale 1 and exact tokens, positions are plain 0..L-1 and input ids are the serialized text."""
    lay = _layout(1.0)
    assert lay.input_ids == [ord(c) for c in FULL]
    assert lay.positions == list(range(len(FULL)))


def test_layout_scale0_positions():
    """With scale 0 a block starts right after its promise and main continues from that same position."""
    lay = _layout(0.0)
    pos = lay.positions
    p1 = pos[I_P1[-1]]
    assert p1 == I_P1[-1]  # everything before the first block is plain main
    assert [pos[i] for i in I_B1] == list(range(p1 + 1, p1 + 1 + len(BLOCK1)))
    assert pos[I_THEN[0]] == p1 + 1  # main after block 1
    p2 = pos[I_P2[-1]]
    assert [pos[i] for i in I_B2] == list(range(p2 + 1, p2 + 1 + len(BLOCK2)))
    assert pos[I_B2[-1] + 1] == p2 + 1  # main's "\n" after block 2
    # After the sync, main continues past the longest joined block (or its own next position).
    after = max(pos[I_SYNC[-1]] + 1, pos[I_B1[-1]] + 1, pos[I_B2[-1]] + 1)
    assert [pos[i] for i in I_DONE] == list(range(after, after + len("Done.")))


def test_layout_threads_and_indexes():
    """Thread ids and per-thread indexes match the serialized structure and the spans cover every token."""
    for scale in (0.0, 1.0, 2.5):
        lay = _layout(scale)
        n = len(FULL)
        assert len(lay.thread) == len(lay.index) == len(lay.positions) == len(lay.labels) == n
        expected_thread = [1 if i in I_B1 else 2 if i in I_B2 else 0 for i in range(n)]
        assert lay.thread == expected_thread
        counters = {}
        for i, t in enumerate(lay.thread):
            assert lay.index[i] == counters.get(t, 0)
            counters[t] = lay.index[i] + 1
        assert counters == {0: n - len(BLOCK1) - len(BLOCK2), 1: len(BLOCK1), 2: len(BLOCK2)}
        i = 0
        for span in lay.spans:
            k = len(span.positions)
            assert k > 0
            assert lay.thread[i : i + k] == [span.thread] * k
            assert lay.index[i : i + k] == list(range(span.start, span.start + k))
            assert lay.positions[i : i + k] == span.positions
            i += k
        assert i == n
        # Within a thread positions count up by one, except across a reservation or a sync.
        for t in (1, 2):
            ps = [p for p, th in zip(lay.positions, lay.thread) if th == t]
            assert ps == list(range(ps[0], ps[0] + len(ps)))


def test_layout_labels():
    """Labels skip forced `<async>`, end blocks with IGNORE, end main with eos and ignore the prompt."""
    lay = _layout(1.0, eos_id=EOS)
    lab, ids = lay.labels, lay.input_ids
    # A promise's last token predicts main's next token after its block, never `<async>`.
    assert lab[I_P1[-1]] == ord("T")
    assert lab[I_P2[-1]] == ord("\n")
    # Inside a block: `<async>`'s last token predicts the chunk, the chunk's last token predicts `</async>`.
    assert lab[I_B1[len(ASYNC_OPEN) - 1]] == ord(CHUNK1[0])
    assert lab[I_B1[len(ASYNC_OPEN) + len(CHUNK1) - 1]] == ord("<")
    # The last token of each block predicts nothing.
    assert lab[I_B1[-1]] == IGNORE and lab[I_B2[-1]] == IGNORE
    # The sync's last token predicts main's next token; main's last token predicts eos.
    assert lab[I_SYNC[-1]] == ord("D")
    assert lab[-1] == EOS
    # Prompt: all ignored but the last, which predicts the answer's first token.
    assert lab[: len(PROMPT) - 1] == [IGNORE] * (len(PROMPT) - 1)
    assert lab[len(PROMPT) - 1] == ord("I")
    # No label ever targets the first token of a forced `<async>`: only IGNOREs are in front of the blocks.
    for block in (I_B1, I_B2):
        t = lay.thread[block[0]]
        assert all(lay.thread[i] != t for i in range(block[0]))
    # Every other label is the next token of the same thread.
    forced = set(I_B1[: len(ASYNC_OPEN)]) | set(I_B2[: len(ASYNC_OPEN)])
    for i, y in enumerate(lab):
        if y in (IGNORE, EOS):
            continue
        nxt = next(j for j in range(i + 1, len(ids)) if lay.thread[j] == lay.thread[i] and j not in forced)
        assert y == ids[nxt]
    # Without eos_id, main's last token predicts nothing.
    assert _layout(1.0).labels[-1] == IGNORE


def test_layout_visibility():
    """Visibility follows docs/spec.md section 3: blocks are isolated until a sync, and see main up to their promise."""
    for scale in (0.0, 1.0):
        lay = _layout(scale)
        vis = visibility(lay)
        n = len(FULL)
        main_before_p1 = range(0, I_P1[-1] + 1)
        main_before_p2 = [i for i in range(0, I_P2[-1] + 1) if lay.thread[i] == 0]
        main_after_p1 = [i for i in range(I_P1[-1] + 1, n) if lay.thread[i] == 0]
        main_after_p2 = [i for i in range(I_P2[-1] + 1, n) if lay.thread[i] == 0]
        # Every answer token sees the whole prompt; every token sees itself.
        assert sees_all(vis, range(len(PROMPT), n), I_PROMPT)
        assert all(vis[i][i] for i in range(n))
        # A block sees main up to and including its promise, not main's later tokens.
        assert sees_all(vis, I_B1, main_before_p1)
        assert sees_none(vis, I_B1, main_after_p1)
        assert sees_all(vis, I_B2, main_before_p2)
        assert sees_none(vis, I_B2, main_after_p2)
        # Siblings never see each other (no sync between the two promises).
        assert sees_none(vis, I_B2, I_B1)
        assert sees_none(vis, I_B1, I_B2)
        # Main does not see a block before the sync: not between the blocks, not in the sync's earlier tokens.
        assert sees_none(vis, I_THEN, I_B1)
        assert sees_none(vis, I_SYNC[:-1], list(I_B1) + list(I_B2))
        # The token completing the sync, and main after it, see both blocks in full.
        assert sees_all(vis, [I_SYNC[-1], *I_DONE], list(I_B1) + list(I_B2))
        # Causality within a thread: nobody sees a later token of its own thread.
        assert not any(
            vis[q][x] for q in range(n) for x in range(n) if lay.thread[q] == lay.thread[x] and x > q
        )
