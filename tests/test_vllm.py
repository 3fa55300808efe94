"""The vLLM backend decodes the same semantics as the transformers backend (the linear layout): forced replays give
the same log-probabilities and free greedy decoding the same tokens. Needs vLLM (`scripts/setup.sh --vllm`, then
`.venv-vllm/bin/python -m pytest -m vllm`); skipped elsewhere. Both backends run in fp32 here."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from pastalm.engine import Engine, GenerateConfig  # noqa: E402
from pastalm.models import chat_prompt, load  # noqa: E402
from pastalm.testing import tiny_model, tiny_tokenizer  # noqa: E402

P = '<promise tokens="{}"/>'
REPLAYS = {  # 1, 2 and 4 chunks, with and without a sync, text after the sync
    1: "Sure: " + P.format(6) + "<async>one two three</async><sync/> That is all.",
    2: "Two: " + P.format(5) + "<async>alpha beta</async> and " + P.format(5) + "<async>gamma</async><sync/> done.",
    4: "List:\n1. " + P.format(4) + "<async>first</async>\n2. " + P.format(4) + "<async>second one</async>\n3. "
       + P.format(4) + "<async>third</async>\n4. " + P.format(6) + "<async>fourth and last</async>",
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from pastalm.engine.vllm import load_vllm

    d = tmp_path_factory.mktemp("tiny-vllm")
    tiny_model("llama", head_dim=32).save_pretrained(d)  # vLLM's CPU attention needs a head dim >= 32
    tiny_tokenizer().save_pretrained(d)
    m = load(str(d), "fp32", "none")
    return Engine(m.model, m.tokenizer, m.name), load_vllm(str(d), "fp32", "none")


@pytest.mark.parametrize("chunks", sorted(REPLAYS))
def test_forced_replay_matches_the_hf_backend(engines, chunks):
    hf, vl = engines
    ids = chat_prompt(hf.tokenizer, "Tell me some things.")
    cfg = GenerateConfig(layout="linear", record_logits=True, max_new_tokens=300)
    a, b = hf.generate(ids, cfg, force=REPLAYS[chunks]), vl.generate(ids, cfg, force=REPLAYS[chunks])
    assert a.raw == b.raw == REPLAYS[chunks] and a.threads == b.threads == chunks
    assert a.token_ids == b.token_ids
    assert len(b.logits) >= sum(len(t) for t in b.token_ids) - 3 * chunks  # a record at (almost) every token
    for key, top in b.logits.items():  # vLLM's top-5 log-probabilities against the HF logits at the same token
        ref = a.logits[key].log_softmax(-1)
        best = max(top, key=top.get)
        assert best == int(ref.argmax()), key
        for tok, lp in top.items():
            assert abs(lp - float(ref[tok])) < 1e-4, (key, tok)


def test_greedy_free_decoding_matches_the_hf_backend(engines):
    hf, vl = engines
    for prompt in ("Tell me some things.", "A short poem about the moon", "Steps: first"):
        ids = chat_prompt(hf.tokenizer, prompt)
        cfg = GenerateConfig(layout="linear", max_new_tokens=60)
        a, b = hf.generate(ids, cfg), vl.generate(ids, cfg)
        assert a.token_ids == b.token_ids and a.text == b.text


def test_logprobs_match_the_hf_backend(engines):
    """logprobs on vLLM (its raw log-probabilities) give the same entries as on the transformers backend: the same
    rendered tokens, log-probabilities within 1e-4, the same top alternatives."""
    hf, vl = engines
    ids = chat_prompt(hf.tokenizer, "Tell me some things.")
    cfg = GenerateConfig(layout="linear", max_new_tokens=40, logprobs=3)
    a, b = hf.generate(ids, cfg), vl.generate(ids, cfg)
    assert a.text == b.text and [e["text"] for e in a.logprobs] == [e["text"] for e in b.logprobs]
    assert "".join(e["text"] for e in b.logprobs) == b.text and len(b.logprobs) >= 20
    for x, y in zip(a.logprobs, b.logprobs):
        assert x["id"] == y["id"] and abs(x["logprob"] - y["logprob"]) < 1e-4
        assert [t for t, _ in x["top"]] == [t for t, _ in y["top"]]


def test_vllm_refuses_the_reserve_layout(engines):
    _, vl = engines
    with pytest.raises(ValueError, match="linear"):
        vl.generate(chat_prompt(vl.tokenizer, "hi"), GenerateConfig(layout="reserve"))


def test_batched_requests_free_every_vllm_request(engines):
    """Three requests in one batcher, one cancelled half-way: the others give what they give alone, and vLLM holds
    no request afterwards."""
    _, vl = engines
    cfg = GenerateConfig(layout="linear", max_new_tokens=40)
    prompts = [chat_prompt(vl.tokenizer, p) for p in ("one", "two things", "three things please")]
    alone = [vl.generate(ids, cfg) for ids in prompts]
    b = vl.batcher()
    reqs = [b.add(ids, cfg) for ids in prompts]
    for _ in range(5):
        b.step()
    b.cancel(reqs[1])
    while b.active:
        b.step()
    assert reqs[1].result.limits_hit == ["cancelled"]
    assert [reqs[0].result.token_ids, reqs[2].result.token_ids] == [alone[0].token_ids, alone[2].token_ids]
    assert vl.vllm_counts() in ({"vllm_running": 0, "vllm_waiting": 0}, {"vllm_unfinished": 0})


def test_serve_on_vllm_streams_and_frees_everything_on_disconnect(engines):
    """`pasta serve --backend vllm` in miniature: the app on the vLLM engine over real HTTP, streamed clients at once
    (each gets what `generate` gives alone), one that disconnects early; then vLLM holds nothing."""
    import json
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from pastalm.serve.app import ServeConfig, create_app
    from pastalm.testing import local_server

    _, vl = engines
    cfg = ServeConfig(model_id="tiny", defaults=GenerateConfig(layout="linear", max_new_tokens=30))
    prompts = ["one", "two things", "three things please", "a short poem"]
    want = [vl.generate(chat_prompt(vl.tokenizer, p), cfg.defaults).text for p in prompts]
    app = create_app(vl, cfg)
    with local_server(app, timeout=60, lifespan="on") as base:
        c = OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

        def streamed(p: str) -> str:
            out = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}], stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in out if ch.choices)

        def dropped() -> None:
            s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a story."}],
                                          stream=True, max_tokens=200, extra_body={"ignore_eos": True})
            for i, _ in enumerate(s):
                if i == 3:
                    break
            s.close()

        with ThreadPoolExecutor(5) as pool:
            drop = pool.submit(dropped)
            got = list(pool.map(streamed, prompts))
            drop.result()
        assert got == want
        deadline = time.monotonic() + 30
        while True:
            with urllib.request.urlopen(base + "/health") as r:
                h = json.loads(r.read())
            if h["running"] == 0 and h["queued"] == 0 and h.get("vllm_running") == 0 and h.get("vllm_waiting") == 0:
                break
            assert time.monotonic() < deadline, h
            time.sleep(0.05)


def test_the_playground_extras_on_vllm_match_the_hf_backend(engines):
    """`pasta serve --backend vllm` serves the playground and its stream extras (`pasta.threads`, `pasta.force`):
    (before the slow tests: their own vLLM engines tear down the parallel state the module's engine runs on)
    per step the same threads live and the same pieces as on the transformers backend, the same final figures."""
    import json

    from fastapi.testclient import TestClient

    from pastalm.serve.app import ServeConfig, create_app

    forced = ("Two: " + P.format(12) + "<async>alpha beta gamma delta epsilon zeta eta theta</async> and "
              + P.format(5) + "<async>iota kappa</async><sync/> done.")

    def run(engine):
        cfg = ServeConfig(model_id="tiny", defaults=GenerateConfig(layout="linear", max_new_tokens=40),
                          api_key="k")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Two things?"}], "stream": True,
                "temperature": 0, "max_tokens": 200, "pasta": {"threads": True, "force": forced}}
        with TestClient(create_app(engine, cfg)) as c:
            page = c.get("/")
            assert page.status_code == 200 and "pastalm playground" in page.text
            r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"})
            assert r.status_code == 200
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        views = [e["pasta"] for e in events if "pasta" in e and not e["pasta"].get("done")]
        final = {k: v for k, v in events[-1]["pasta"].items() if k != "wall_s"}
        return views, final

    hf, vl = engines
    hf_views, hf_final = run(hf)
    vl_views, vl_final = run(vl)
    assert vl_final == hf_final and vl_final["threads"] == 2
    assert vl_views == hf_views
    assert max(len(set(v["live"]) - {0}) for v in vl_views) == 2


@pytest.mark.slow
def test_shipped_adapter_greedy_matches_the_hf_backend():
    """The bundled model with the shipped adapter, fp32: the same answer token for token on both backends.

    Last in this file: a second vLLM engine tears down vLLM's process-wide parallel state when it is freed, which
    breaks any other engine still in use in the process (the module's)."""
    from pastalm.engine.vllm import load_vllm

    m = load(None, "fp32", "pasta-linear")  # what `--backend vllm` decodes with by default
    hf = Engine(m.model, m.tokenizer, m.name)
    vl = load_vllm(None, "fp32", "auto")
    for prompt in ("Give three tips to sleep better.", "Name four planets and one fact about each."):
        ids = chat_prompt(m.tokenizer, prompt)
        cfg = GenerateConfig(layout="linear", max_new_tokens=200)
        a, b = hf.generate(ids, cfg), vl.generate(ids, cfg)
        assert a.threads >= 2 and a.token_ids == b.token_ids and a.text == b.text


def test_tag_token_adapter_matches_the_hf_backend(tmp_path):
    """An adapter that added the tags to the vocabulary (`pasta train sft --tag-tokens`): both backends load the
    merged folder with the new rows and decode a forced replay to the same tokens, one per tag."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model

    from pastalm.engine.vllm import load_vllm
    from pastalm.lang.tags import TAG_TOKENS
    from pastalm.models import VOCAB_FILE, add_tokens

    d, adapter = tmp_path / "tiny", tmp_path / "adapter"
    tiny_model("llama", head_dim=32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    model, tok = tiny_model("llama", head_dim=32), tiny_tokenizer()
    ids = add_tokens(model, tok, TAG_TOKENS)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            trainable_token_indices={"embed_tokens": ids, "lm_head": ids}))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    lora.save_pretrained(adapter, save_embedding_layers=False)
    (adapter / VOCAB_FILE).write_text(json.dumps({"added_tokens": TAG_TOKENS}))
    m = load(str(d), "fp32", str(adapter))
    hf, vl = Engine(m.model, m.tokenizer, m.name), load_vllm(str(d), "fp32", str(adapter))
    forced = ("List:\n1. " + P.format(10) + "<async>first</async>\n2. " + P.format(20)
              + "<async>second one</async><sync/> done.")
    prompt = chat_prompt(hf.tokenizer, "Tell me some things.")
    cfg = GenerateConfig(layout="linear", max_new_tokens=100)
    a, b = hf.generate(prompt, cfg, force=forced), vl.generate(prompt, cfg, force=forced)
    assert a.raw == b.raw == forced and a.token_ids == b.token_ids and a.threads == 2
    assert a.tag_tokens == 7  # two promises, two <async>, two </async>, one <sync/>
    free = GenerateConfig(layout="linear", max_new_tokens=40)
    assert hf.generate(prompt, free).token_ids == vl.generate(prompt, free).token_ids

