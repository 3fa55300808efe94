"""The llama.cpp backend decodes the same semantics as the transformers backend (the linear layout): the exported
GGUF computes the HF model's logits, and greedy free decoding and forced replays give the same tokens, forks and
steps. Needs llama-cpp-python (`scripts/setup.sh --llamacpp`, then `pytest -m llamacpp`); skipped elsewhere. Both
backends in float32 (the GGUF and llama.cpp's KV cache too)."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

from pastalm.engine import Engine, GenerateConfig  # noqa: E402
from pastalm.models import chat_prompt, load  # noqa: E402
from pastalm.testing import tiny_model, tiny_tokenizer  # noqa: E402

P = '<promise tokens="{}"/>'
REPLAYS = {  # 1, 2 and 4 chunks, with and without a sync, text after the sync
    1: "Sure: " + P.format(6) + "<async>one two three</async><sync/> That is all.",
    2: "Two: " + P.format(12) + "<async>alpha beta gamma delta epsilon zeta</async> and " + P.format(5)
       + "<async>gamma</async><sync/> done.",
    4: "List:\n1. " + P.format(4) + "<async>first</async>\n2. " + P.format(4) + "<async>second one</async>\n3. "
       + P.format(4) + "<async>third</async>\n4. " + P.format(6) + "<async>fourth and last</async>",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llamacpp")
    tiny_model("llama", head_dim=32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def engines(folder):
    from pastalm.engine.llamacpp import load_llamacpp

    m = load(str(folder), "fp32", "none")
    return Engine(m.model, m.tokenizer, m.name), load_llamacpp(str(folder), "none", "f32", n_ctx=2048)


def test_the_exported_gguf_computes_the_hf_logits(folder, engines):
    import numpy as np
    import torch

    hf, lc = engines
    L = lc.lib
    ids = hf.tokenizer("the cat sat on the mat, and then it slept")["input_ids"]
    mem = L.llama_get_memory(lc.ctx)
    L.llama_memory_clear(mem, True)
    b = L.llama_batch_init(len(ids), 0, 1)
    b.n_tokens = len(ids)
    for i, t in enumerate(ids):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, True
        b.seq_id[i][0] = 0
    assert L.llama_decode(lc.ctx, b) == 0
    got = np.stack([np.ctypeslib.as_array(L.llama_get_logits_ith(lc.ctx, i), shape=(lc.n_vocab,))
                    for i in range(len(ids))])
    L.llama_batch_free(b)
    with torch.no_grad():
        want = hf.model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("chunks", sorted(REPLAYS))
def test_forced_replay_matches_the_hf_backend(engines, chunks):
    hf, lc = engines
    cfg = GenerateConfig(layout="linear", max_new_tokens=120)
    ids = chat_prompt(hf.tokenizer, "Tips?")
    a, b = hf.generate(ids, cfg, force=REPLAYS[chunks]), lc.generate(ids, cfg, force=REPLAYS[chunks])
    assert b.threads == a.threads == chunks
    assert (b.raw, b.text, b.decode_steps, b.tokens, b.tag_tokens) == (a.raw, a.text, a.decode_steps, a.tokens,
                                                                      a.tag_tokens)


@pytest.mark.parametrize("prompt", ["one", "two things please", "a short poem"])
def test_greedy_free_decoding_matches_the_hf_backend(engines, prompt):
    hf, lc = engines
    cfg = GenerateConfig(layout="linear", max_new_tokens=48)
    ids = chat_prompt(hf.tokenizer, prompt)
    a, b = hf.generate(ids, cfg), lc.generate(ids, cfg)
    assert (b.raw, b.decode_steps) == (a.raw, a.decode_steps)


def test_batched_requests_and_release(engines):
    """Several requests in one batcher (each a set of llama.cpp sequences over one cache) give what each gives alone,
    and every sequence is handed back."""
    hf, lc = engines
    cfg = GenerateConfig(layout="linear", max_new_tokens=60)
    prompts = [chat_prompt(hf.tokenizer, p) for p in ("one", "two", "three")]
    alone = [lc.generate(p, cfg, force=REPLAYS[k]).raw for p, k in zip(prompts, (1, 2, 4))]
    from pastalm.engine.engine import scripts_for

    batcher = lc.batcher()
    reqs = [batcher.add(p, cfg, scripts=scripts_for(lc.tokenizer, REPLAYS[k]), forced=True)
            for p, k in zip(prompts, (1, 2, 4))]
    while not all(r.done for r in reqs):
        batcher.step()
    assert [r.result.raw for r in reqs] == alone
    runner = batcher.runner
    assert not runner.states and len(runner.free) == lc.n_seq


def test_the_llamacpp_backend_refuses_the_reserve_layout(engines):
    _, lc = engines
    with pytest.raises(ValueError, match="linear"):
        lc.check(GenerateConfig(layout="reserve"))


def test_serve_on_llamacpp_streams_the_playground_extras_like_the_hf_backend(engines):
    """`pasta serve --backend llamacpp` in miniature: the playground page, and its stream of thread views and final
    figures equal to the transformers backend's for a forced replay."""
    import json

    from fastapi.testclient import TestClient

    from pastalm.serve.app import ServeConfig, create_app

    def run(engine):
        cfg = ServeConfig(model_id="tiny", defaults=GenerateConfig(layout="linear", max_new_tokens=40))
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Two things?"}], "stream": True,
                "temperature": 0, "max_tokens": 200, "pasta": {"threads": True, "force": REPLAYS[2]}}
        with TestClient(create_app(engine, cfg)) as c:
            assert c.get("/").status_code == 200
            r = c.post("/v1/chat/completions", json=body)
            plain = c.post("/v1/chat/completions", json={**body, "stream": False,
                                                         "pasta": {"force": REPLAYS[2]}}).json()
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        views = [e["pasta"] for e in events if "pasta" in e and not e["pasta"].get("done")]
        final = {k: v for k, v in events[-1]["pasta"].items() if k != "wall_s"}
        return views, final, plain["choices"][0]["message"]["content"]

    hf, lc = engines
    want, got = run(hf), run(lc)
    assert got[1] == want[1] and got[1]["threads"] == 2
    assert got[0] == want[0] and max(len(set(v["live"]) - {0}) for v in got[0]) == 2
    assert got[2] == want[2] == "".join(p["text"] for p in got[1]["pieces"])
