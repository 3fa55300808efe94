"""Stop strings (`pasta serve`'s `stop`): the streamed text is cut at the first stop string wherever the deltas
split it, and no part of a stop string is ever sent."""

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pastalm.serve.app import StopText

ALPHABET = "ab \n."


@settings(max_examples=300, deadline=None)
@example(text="..aa", stops=["a", ".aa"], cuts=[3])  # found by this test: '.aa' starts first, 'a' completed first
@given(text=st.text(ALPHABET, max_size=60), stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1,
                                                             max_size=4),
       cuts=st.lists(st.integers(0, 60), max_size=12))
def test_stop_text_cuts_at_the_first_stop_string_whatever_the_deltas(text, stops, cuts):
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    w = StopText(stops)
    sent = []
    for d in deltas:
        sent.append(w.feed(d))
        # what was sent so far never reaches into a stop string
        assert not any(s in "".join(sent) for s in stops)
    sent.append(w.flush())
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[: min(hits)] if hits else text
    assert "".join(sent) == want and w.stopped == bool(hits)
