"""Issue 25: the per-thread view of a decode (`batch.thread_view`), `pasta generate --show-threads`, and the
server's `pasta.threads` / `pasta.force` stream extras, against the answer decoded without them."""

import json

import pytest

from pastalm.cli import main
from pastalm.engine import Engine, GenerateConfig
from pastalm.lang.tags import promise_tag
from pastalm.models import chat_prompt
from pastalm.testing import tiny_model, tiny_tokenizer

FORCED = ("Tips:\n1. " + promise_tag(None, 20) + "<async>keep a schedule every day</async>\n2. " + promise_tag(None, 20)
          + "<async>no screens before bed</async><sync/> Sleep well.")


@pytest.fixture(scope="module")
def engine():
    return Engine(tiny_model("llama"), tiny_tokenizer(), "tiny")


def test_thread_view_follows_the_decode_and_ends_at_the_answer(engine):
    """Every step's view: which threads were live, what each wrote (tag tokens apart), and the answer so far in
    reading order with each block where it stands. Its last pieces are the result's; the blocks were live
    together; a tag token is counted as one that showed no text."""
    views = []
    prompt = chat_prompt(engine.tokenizer, "Tips?")
    cfg = GenerateConfig(max_new_tokens=120)
    res = engine.generate(prompt, cfg, force=FORCED, on_step=views.append)
    plain = engine.generate(prompt, cfg, force=FORCED)
    assert res.text == plain.text and res.token_ids == plain.token_ids  # watching changes nothing
    assert res.threads == 2 and [v["step"] for v in views] == list(range(1, len(views) + 1))
    assert len(views) == res.decode_steps
    assert max(len(set(v["live"]) - {0}) for v in views) == 2  # both blocks decoded at once
    assert views[-1]["pieces"] == res.pieces and "".join(p["text"] for p in res.pieces) == res.text
    written = sum(len(v["wrote"]) for v in views)
    hidden = sum(1 for v in views for _, shown in v["wrote"] if not shown)
    assert written == res.chosen  # every token chosen (the forced <async> aside) was written in a step
    forced = sum(len(t) for t in res.token_ids) - res.chosen  # the two <async>, fed without a step
    assert forced == 2 * len(engine.tokenizer.encode("<async>", add_special_tokens=False))
    assert hidden == res.tag_tokens - forced  # the tokens that showed no text are the tags' here
    # the blocks' pieces only ever grow while they decode
    for tid in (1, 2):
        texts = [next((p["text"] for p in v["pieces"] if p["thread"] == tid), "") for v in views]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_show_threads_shows_each_thread_and_ends_with_the_same_answer(folder, tmp_path, capsys):
    ans = tmp_path / "a.txt"
    ans.write_text(FORCED)
    common = ["generate", "Tips?", "--model", str(folder), "--force", str(ans), "--dtype", "fp32"]
    assert main(common + ["--no-stream"]) == 0
    plain = capsys.readouterr()
    assert main(common + ["--show-threads"]) == 0
    shown = capsys.readouterr()
    assert shown.out == plain.out and shown.out.strip() == "Tips:\n1. keep a schedule every day\n2. no screens before bed Sleep well."
    for line in ("main", "thread 1", "thread 2", "done (close)"):
        assert line in shown.err
    assert main(common + ["--show-threads", "--json"]) == 2
    assert "leave it out with --json" in capsys.readouterr().err


# --- the server's extras ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from pastalm.serve.app import ServeConfig, create_app

    app = create_app(engine, ServeConfig("tiny", GenerateConfig(max_new_tokens=120)))
    with TestClient(app) as c:
        yield c


def _events(resp):
    return [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]


def test_the_threads_stream_says_who_wrote_what_and_keeps_the_openai_fields(client):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tips?"}], "max_tokens": 120,
            "temperature": 0, "pasta": {"force": FORCED}}
    whole = client.post("/v1/chat/completions", json=body).json()
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True, "pasta": {"force": FORCED,
                                                                                          "threads": True}})
    events = _events(streamed)
    views = [e["pasta"] for e in events if "pasta" in e and not e["pasta"].get("done")]
    final = events[-1]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"] == "".join(p["text"] for p in final["pasta"]["pieces"])
    assert final["pasta"]["done"] and final["pasta"]["threads"] == whole["usage"]["threads"] == 2
    assert final["usage"] == whole["usage"] and final["choices"][0]["finish_reason"] == "stop"
    assert max(len(set(v["live"]) - {0}) for v in views) == 2
    assert all(e["object"] == "chat.completion.chunk" and e["choices"][0]["finish_reason"] is None
               for e in events[:-1])
    # without the extra, no chunk carries it
    plain = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert not any("pasta" in e for e in plain)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in plain) == text


@pytest.mark.parametrize("extra, n, stream, message", [
    ({"threads": True}, 1, False, "needs stream: true"),
    ({"force": "a <sync/> b"}, 2, False, "needs n: 1"),
    ({"force": ""}, 1, False, "pasta.force"),
])
def test_the_extras_refuse_what_they_cannot_do(client, extra, n, stream, message):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "pasta": extra, "n": n, "stream": stream})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_the_playground_page_is_served_and_holds_no_key(engine):
    from fastapi.testclient import TestClient

    from pastalm.serve.app import ServeConfig, create_app

    app = create_app(engine, ServeConfig("tiny", GenerateConfig(max_new_tokens=8), api_key="s3cret-key"))
    with TestClient(app) as c:
        page = c.get("/")
        assert page.status_code == 200 and "pastalm playground" in page.text
        for asset in ("/static/playground.js", "/static/playground.css"):
            r = c.get(asset)
            assert r.status_code == 200 and "s3cret-key" not in r.text
        assert "s3cret-key" not in page.text
        assert c.get("/v1/models").status_code == 401  # the API still wants the key the page asks for
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
