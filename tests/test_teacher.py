"""The teacher annotator against a real OpenAI-compatible HTTP server (FastAPI + uvicorn on 127.0.0.1)."""

from __future__ import annotations

import re
import socket
import time

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402

from pastalm.lang.render import render, validate  # noqa: E402
from pastalm.testing import local_server  # noqa: E402
from pastalm.train.teacher import (  # noqa: E402
    ANSWER_BEGIN,
    ANSWER_END,
    EXAMPLES,
    SYSTEM_PROMPT,
    TeacherAnnotator,
    TeacherError,
    build_messages,
    strip_fence,
)

PROMPT = "List three ways to save energy at home."
ANSWER = (
    "Three easy ways to save energy:\n"
    "\n"
    "1. Switch to LED bulbs.\n"
    "2. Turn the thermostat down one degree.\n"
    "3. Unplug chargers you are not using.\n"
    "\n"
    "Small changes add up."
)
KEY_ENV = "PASTA_TEST_TEACHER_KEY"

_ITEM = re.compile(r"^(\d+)\. ")


def fake_annotate(answer: str) -> str:
    """Deterministic teacher: each line starting with 'K. ' becomes a promise + async block (newline outside)."""
    out = []
    for line in answer.split("\n"):
        m = _ITEM.match(line)
        out.append(f'<promise topic="item {m.group(1)}" tokens="10"/><async>{line}</async>' if m else line)
    return "\n".join(out)


def make_app(requests: list[dict]) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        requests.append({"body": body, "authorization": request.headers.get("authorization")})
        model = body.get("model")
        if model == "broken":
            return JSONResponse({"error": {"message": "model is broken", "type": "server_error"}}, status_code=500)
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        answer = user.split(ANSWER_BEGIN + "\n", 1)[1].rsplit("\n" + ANSWER_END, 1)[0]
        if model == "empty":
            content = ""
        else:
            content = fake_annotate(answer)
            if model == "fenced":
                content = f"```text\n{content}\n```\n"
        return {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


@pytest.fixture(scope="module")
def server():
    requests: list[dict] = []
    with local_server(make_app(requests)) as url:
        yield f"{url}/v1", requests


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_examples_in_the_prompt_are_lossless():
    for prompt, answer, annotated in EXAMPLES:
        assert render(annotated) == answer
        rep = validate(annotated, original=answer)
        assert rep.ok, rep.problems
        assert annotated in SYSTEM_PROMPT and prompt in SYSTEM_PROMPT
    assert [validate(t).promises > 0 for _, _, t in EXAMPLES] == [True, True, False]
    assert validate(EXAMPLES[1][2]).syncs == 1


def test_build_messages_delimits_prompt_and_answer():
    msgs = build_messages(PROMPT, ANSWER)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT
    assert f"{ANSWER_BEGIN}\n{ANSWER}\n{ANSWER_END}" in msgs[1]["content"]
    assert PROMPT in msgs[1]["content"]


def test_annotate_returns_a_lossless_annotation(server, monkeypatch):
    url, _ = server
    monkeypatch.delenv(KEY_ENV, raising=False)
    result = TeacherAnnotator(url, "good", api_key_env=KEY_ENV).annotate(PROMPT, ANSWER)
    assert result == fake_annotate(ANSWER)
    assert result.count("<promise") == 3
    assert render(result) == ANSWER
    rep = validate(result, original=ANSWER, require_promise=True)
    assert rep.ok, rep.problems


def test_request_carries_model_prompt_and_key(server, monkeypatch):
    url, requests = server
    monkeypatch.setenv(KEY_ENV, "sk-test-123")
    n = len(requests)
    TeacherAnnotator(url, "good", api_key_env=KEY_ENV, temperature=0.3).annotate(PROMPT, ANSWER)
    assert len(requests) == n + 1
    req = requests[-1]
    body = req["body"]
    assert body["model"] == "good"
    assert body["temperature"] == pytest.approx(0.3)
    system = next(m["content"] for m in body["messages"] if m["role"] == "system")
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    assert "<promise" in system and system == SYSTEM_PROMPT
    assert PROMPT in user and ANSWER in user
    assert req["authorization"] == "Bearer sk-test-123"


def test_missing_key_sends_placeholder(server, monkeypatch):
    url, requests = server
    monkeypatch.delenv(KEY_ENV, raising=False)
    TeacherAnnotator(url, "good", api_key_env=KEY_ENV).annotate(PROMPT, ANSWER)
    assert requests[-1]["authorization"] == "Bearer EMPTY"


def test_fenced_reply_is_unwrapped(server):
    url, _ = server
    result = TeacherAnnotator(url, "fenced").annotate(PROMPT, ANSWER)
    assert result == fake_annotate(ANSWER)
    assert render(result) == ANSWER


def test_strip_fence_only_strips_a_whole_wrapper():
    assert strip_fence("```\nabc\n```") == "abc"
    assert strip_fence("```markdown\nabc\n\n```\n") == "abc\n"
    assert strip_fence("text\n```\ncode\n```") == "text\n```\ncode\n```"
    assert strip_fence("```\ncode\n```\nmore text") == "```\ncode\n```\nmore text"
    # an answer that is itself a code block keeps its fence
    assert strip_fence("```py\nx = 1\n```", answer="```py\nx = 1\n```") == "```py\nx = 1\n```"


def test_unreachable_endpoint_raises(monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    teacher = TeacherAnnotator(url, "good", max_retries=0, timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(TeacherError) as err:
        teacher.annotate(PROMPT, ANSWER)
    assert url in str(err.value)
    assert "good" in str(err.value)
    assert time.monotonic() - t0 < 3


def test_http_500_raises(server):
    url, _ = server
    with pytest.raises(TeacherError) as err:
        TeacherAnnotator(url, "broken", max_retries=0, timeout=5.0).annotate(PROMPT, ANSWER)
    msg = str(err.value)
    assert "500" in msg and url in msg and "broken" in msg


def test_empty_content_raises(server):
    url, _ = server
    with pytest.raises(TeacherError, match="no content"):
        TeacherAnnotator(url, "empty", max_retries=0).annotate(PROMPT, ANSWER)
