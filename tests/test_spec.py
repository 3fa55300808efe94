"""Visibility and positions re-derived from docs/spec.md alone (rules V1-V5, P1-P3), independently of
`pastalm.lang.layout`, and checked against both sides that must follow them:

- training: `layout_segments` (positions) and `layout_mask` (the mask the SFT collator builds);
- inference: the position ids and 4D masks the engine really passes to the model while it replays the answer,
  captured at the model's forward, slot by slot.

The reference below reads the serialized form with its own regular expression and applies the rules as written;
nothing in it comes from the layout module, so a wrong rule there fails here.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.engine.reference import layout_mask
from pastalm.lang import ReservePolicy, layout_segments, tokenize_segments
from pastalm.models import chat_prompt

TAG = re.compile(r'<promise[^>]*/>|<async>|</async>|<sync/>')
TOKENS_ATTR = re.compile(r'tokens="(\d+)"')


def spec_reference(tok, prompt_ids: list[int], annotated: str, scale: float) -> dict:
    """Per token of the serialized sequence (prompt first): its thread, its index in the thread, its position,
    and the set of (thread, index) it may attend to, by docs/spec.md sections 2 and 3."""
    overhead = len(tok.encode("<async>", add_special_tokens=False)) + len(tok.encode("</async>",
                                                                                     add_special_tokens=False))

    def reserve(n: int) -> int:
        return 0 if scale == 0 else math.ceil(scale * n) + overhead

    # Split into segments (T1: tokenized one by one): ("text" | "promise" | "open" | "close" | "sync", text).
    segs, pos = [], 0
    for m in TAG.finditer(annotated):
        if m.start() > pos:
            segs.append(("text", annotated[pos:m.start()]))
        t = m.group()
        segs.append(("promise" if t.startswith("<promise") else "open" if t == "<async>" else
                     "close" if t == "</async>" else "sync", t))
        pos = m.end()
    if pos < len(annotated):
        segs.append(("text", annotated[pos:]))

    toks = []  # dicts: thread, index, pos, ...
    count = {0: 0}
    main_next = 0
    block_next: dict[int, int] = {}
    promise_end: dict[int, int] = {}  # block -> main index of its promise's last token
    joined_at: dict[int, int] = {}  # block -> main index of the token completing the sync that joined it
    last_pos: dict[int, int] = {}
    forked = []  # blocks in promise order
    current = 0  # thread the chunk text belongs to

    def add(thread: int, position: int) -> None:
        toks.append({"thread": thread, "index": count[thread], "pos": position})
        count[thread] += 1
        last_pos[thread] = position

    for _ in prompt_ids:  # P1
        add(0, main_next)
        main_next += 1
    for kind, text in segs:
        ids = tok.encode(text, add_special_tokens=False)
        if kind == "text" and current == 0 or kind in ("promise", "sync"):
            for k, _ in enumerate(ids):
                if kind == "sync" and k == len(ids) - 1:  # the token completing the sync (P3, V5)
                    j_now = [b for b in forked if b not in joined_at]
                    add(0, main_next)
                    main_next += 1
                    for b in j_now:
                        joined_at[b] = count[0] - 1
                    main_next = max([main_next] + [last_pos[b] + 1 for b in j_now])
                    continue
                add(0, main_next)
                main_next += 1
            if kind == "promise":  # P2
                b = len(forked) + 1
                forked.append(b)
                count[b] = 0
                promise_end[b] = count[0] - 1
                block_next[b] = main_next  # p + 1
                main_next += reserve(int(TOKENS_ATTR.search(text).group(1)))
                current = b
        else:  # <async>, chunk text, </async>: the current block's tokens
            for _ in ids:
                add(current, block_next[current])
                block_next[current] += 1
            if kind == "close":
                current = 0
    n_prompt = len(prompt_ids)

    def sees(q: dict, x: dict) -> bool:
        if x["thread"] == 0 and x["index"] < n_prompt and not (q["thread"] == 0 and q["index"] < n_prompt):
            return True  # V1
        if q["thread"] == x["thread"]:
            return x["index"] <= q["index"]  # V2
        if q["thread"] != 0 and x["thread"] == 0:
            return x["index"] <= promise_end[q["thread"]]  # V3
        if q["thread"] != 0:  # V4: x's block was joined before q's block was forked
            i = x["thread"]
            return i in joined_at and joined_at[i] < promise_end[q["thread"]]
        i = x["thread"]  # V5
        return i in joined_at and q["index"] >= joined_at[i]

    for q in toks:
        q["sees"] = {(x["thread"], x["index"]) for x in toks if sees(q, x)}
    return {(t["thread"], t["index"]): t for t in toks}


P = '<promise topic="{}" tokens="{}"/>'
V2_ANSWER = ("Three tips:\n\n1. **Sleep**:" + P.format("sleep", 6) + "<async> Keep a fixed schedule.</async>\n\n"
             "2. **Screens**:" + P.format("screens", 4) + "<async> Avoid screens.</async>\n\n"
             "3. **Caffeine**:" + P.format("caffeine", 9) + "<async> Cut caffeine after noon.</async>\n\n"
             "<sync/>Together they help.")
ANSWERS = {
    "v2_list": V2_ANSWER,
    "v3_list": re.sub(r' topic="[^"]*"', "", V2_ANSWER),  # scheme v3: promises without topics
    "sync_between": "A " + P.format("x", 5) + "<async>the moon</async><sync/> then " + P.format("y", 3)
    + "<async>the night</async> and " + P.format("z", 12) + "<async>the wind</async><sync/> end.",
    "no_sync": "Go: " + P.format("p", 8) + "<async>first, second</async> and " + P.format("q", 30)
    + "<async>third step</async> trailing text",
}


def engine_views(model, tokenizer, prompt_ids, answer, scale, monkeypatch) -> dict:
    """Replay `answer` through the engine and record, for every cache slot, its (thread, index), its position id,
    and the (thread, index) of every slot its query row was allowed to see, from the tensors given to the model."""
    from pastalm.engine import runner

    slots: list[tuple[int, int]] = []
    out: dict = {}
    calls: list[tuple[list, torch.Tensor, torch.Tensor]] = []
    original = runner.SharedCache.forward

    def spy_forward(self, feeds):
        keys = [(f.thread, f.span.start + k) for _, f in feeds for k in range(len(f.ids))]
        real = self.model.forward

        def capture(*args, **kw):
            calls.append((keys, kw["position_ids"][0].clone(), kw["attention_mask"][0, 0].clone()))
            return real(*args, **kw)

        self.model.forward = capture
        try:
            return original(self, feeds)
        finally:
            del self.model.forward

    monkeypatch.setattr(runner.SharedCache, "forward", spy_forward)
    Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id}).generate(
        prompt_ids, GenerateConfig(reserve_scale=scale), force=answer)
    for keys, positions, mask in calls:
        slots.extend(keys)
        allowed = mask == 0  # (Q, T): T = every slot so far
        assert allowed.shape == (len(keys), len(slots))
        for row, key in enumerate(keys):
            out[key] = {"pos": int(positions[row]),
                        "sees": {slots[c] for c in allowed[row].nonzero().flatten().tolist()}}
    return out


@pytest.mark.parametrize("scale", [0, 1, 3])
@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_training_layout_follows_the_spec(tokenizer, name, scale):
    answer = ANSWERS[name]
    prompt = chat_prompt(tokenizer, "Give me tips.")
    ref = spec_reference(tokenizer, prompt, answer, scale)
    seq = layout_segments(prompt, tokenize_segments(tokenizer, answer), ReservePolicy.for_tokenizer(tokenizer, scale))
    keys = list(zip(seq.thread, seq.index))
    assert sorted(keys) == sorted(ref)
    allowed = layout_mask(seq)[0, 0] == 0
    for k, key in enumerate(keys):
        assert seq.positions[k] == ref[key]["pos"], key
        assert {keys[c] for c in allowed[k].nonzero().flatten().tolist()} == ref[key]["sees"], key


@pytest.mark.parametrize("scale", [0, 1, 3])
@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_engine_masks_follow_the_spec(tokenizer, name, scale, monkeypatch):
    """The masks and positions the engine gives the model at inference are the spec's, token by token; with the
    training test above, training masks equal inference masks."""
    from pastalm.testing import tiny_model

    answer = ANSWERS[name]
    prompt = chat_prompt(tokenizer, "Give me tips.")
    ref = spec_reference(tokenizer, prompt, answer, scale)
    got = engine_views(tiny_model("llama"), tokenizer, prompt, answer, scale, monkeypatch)
    assert set(got) == set(ref)  # every token of every thread went into the cache once
    for key, g in got.items():
        assert g["pos"] == ref[key]["pos"], key
        assert g["sees"] == {s for s in ref[key]["sees"] if s in got}, key
