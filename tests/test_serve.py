"""`pasta serve` as a real server process on 127.0.0.1, spoken to with the official `openai` client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

KEY = "sk-test-0123456789abcdef"


class Reply:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.body = status, body

    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def http(method: str, url: str, json_body=None, content: bytes | None = None, timeout: float = 30) -> Reply:
    """Plain HTTP (standard library) for what the openai client would not send."""
    data = json.dumps(json_body).encode() if json_body is not None else content
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.read())


def announce_body(url: str, size: int) -> tuple[int, bytes]:
    """POST headers that announce a `size`-byte body and send none of it; return the status and body of the reply.
    (Sending the body too races the server, which answers 413 and closes before reading it: a broken pipe.)"""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) == 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def get(url: str) -> Reply:
    return http("GET", url)


def start(folder, *extra, env=None):
    """Start `pasta serve` on a free port; return (process, base url). The first stdout line says where."""
    cmd = [sys.executable, "-m", "pastalm.cli", "serve", "--model", str(folder), "--dtype", "fp32", "--port", "0",
           "--served-name", "tiny", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError("pasta serve did not start: " + proc.stderr.read())
    info = json.loads(line)
    url = info["url"].rsplit("/v1", 1)[0]
    deadline = time.monotonic() + 60
    while True:
        try:
            if get(url + "/health").status_code == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("pasta serve did not answer /health: " + proc.stderr.read())
        time.sleep(0.1)
    return proc, url, info


def stop(proc) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.fixture(scope="module")
def server(folder):
    proc, url, info = start(folder, "--max-tokens-limit", "1000", "--max-new-tokens", "24")
    try:
        yield url
    finally:
        stop(proc)


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(c, prompt, **kw):
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], **kw)
    return r


def test_models_health_chat_and_completion(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = ask(c, "Give three tips to sleep better.", max_tokens=16)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage.model_dump()
    assert u["completion_tokens"] >= 1 and {"decode_steps", "threads", "theoretical_speedup"} <= set(u)
    assert u["decode_steps"] >= 1
    t = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8)
    assert t.object == "text_completion" and t.usage.completion_tokens >= 1
    # the same prompt again gives the same greedy answer
    assert ask(c, "Give three tips to sleep better.", max_tokens=16).choices[0].message.content == \
        r.choices[0].message.content
    h = get(server + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny"


def test_streaming_equals_non_streaming(server):
    c = client(server)
    kw = dict(max_tokens=30, temperature=0.9, seed=7)
    whole = ask(c, "Compare apples and oranges.", **kw)
    parts, usage, finish = [], None, None
    for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Compare apples and "
                                                                                          "oranges."}],
                                        stream=True, **kw):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        usage = ch.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.model_dump()["decode_steps"] == whole.usage.model_dump()["decode_steps"]
    text = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="Once upon a time",
                                                                       max_tokens=20, stream=True) if ch.choices)
    assert text == c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=20).choices[0].text


def test_eight_concurrent_requests_all_finish_with_their_own_answers(server):
    c = client(server)
    prompts = [f"Question number {i}: tell me something about {w}." for i, w in
               enumerate(["cats", "dogs", "rain", "tea", "maps", "ships", "bread", "stars"])]
    alone = {p: ask(c, p, max_tokens=20).choices[0].message.content for p in prompts}
    got: dict[str, str] = {}
    errors = []
    start_gate = threading.Barrier(len(prompts))

    def run(p):
        try:
            start_gate.wait()
            got[p] = ask(client(server), p, max_tokens=20).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and got == alone
    metrics = get(server + "/metrics").text
    assert "pasta_decode_steps_total" in metrics and "pasta_theoretical_speedup_bucket" in metrics


def test_cancelled_stream_frees_its_request(server):
    c = client(server)
    stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Write a long story."}],
                                       max_tokens=1000, stream=True, extra_body={"ignore_eos": True})
    seen = 0
    for ch in stream:
        seen += 1
        if seen == 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while True:
        h = get(server + "/health").json()
        if h["running"] == 0 and h["queued"] == 0 and h["cache_slots"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    metrics = get(server + "/metrics").text
    cancelled = [line for line in metrics.splitlines() if line.startswith("pasta_cancelled_requests_total")]
    assert cancelled and float(cancelled[0].split()[-1]) >= 1
    assert ask(c, "Still there?", max_tokens=4).choices  # and it goes on serving


@pytest.mark.parametrize("body, status, message", [
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "   "}]}, 400, "empty"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, 400,
     "at most 1000"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served here"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 17}, 400, "n"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "pasta": {"max_threads": "x"}}, 400,
     "pasta.max_threads"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, message):
    r = http("POST", server + "/v1/chat/completions", json_body=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and err["type"]
    assert get(server + "/health").json()["status"] == "ok"


def test_bad_requests_through_the_client_and_then_a_good_one(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens is 5000; this server allows at most"):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="the prompt is empty"):
        c.completions.create(model="tiny", prompt="")
    r = http("POST", server + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]
    status, body = announce_body(server + "/v1/completions", 2 << 20)
    assert status == 413 and b"error" in body
    assert ask(c, "hi", max_tokens=3).choices[0].message.content is not None


def test_sequential_option_and_raw(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tips?"}], max_tokens=12,
                                  extra_body={"pasta": {"enabled": False}, "raw": True})
    assert r.usage.model_dump()["threads"] == 0 and r.choices[0].message.content is not None
    short = ask(c, "Go on.", max_tokens=40)  # the tiny model stops early on this one ...
    long = ask(c, "Go on.", max_tokens=40, extra_body={"ignore_eos": True})  # ... unless EOS is ignored
    assert short.usage.completion_tokens < 40 and short.choices[0].finish_reason == "stop"
    assert long.usage.completion_tokens == 40 and long.choices[0].finish_reason == "length"
    assert long.choices[0].message.content.startswith(short.choices[0].message.content)


def test_api_key_and_queue_limit(folder):
    proc, url, info = start(folder, "--max-running", "1", "--max-queue", "0", env={"PASTA_API_KEY": KEY})
    try:
        assert info["api_key"] is True and KEY not in json.dumps(info)
        with pytest.raises(openai.AuthenticationError):
            ask(client(url, "wrong"), "hi", max_tokens=2)
        good = client(url, KEY)
        assert ask(good, "hi", max_tokens=2).choices
        # one request decoding, none may wait: a second one is turned away with 429 and a clear message
        stream = good.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on."}],
                                              max_tokens=1000, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            ask(good, "me too", max_tokens=2)
        assert "busy" in str(e.value) and e.value.response.headers.get("retry-after") == "1"
        stream.close()
    finally:
        err = stop(proc)
    assert KEY not in err


# -- hardening (issue 15) ------------------------------------------------------------------------------------------

def raw_request(url: str, head: str, body_chunks=(), read: bool = True) -> tuple[int, dict, bytes]:
    """Send a request over a plain socket (headers as given, then the body pieces); return status, headers, body.
    The server may answer and close before the body is all sent: sending then stops."""
    import socket
    import threading
    from urllib.parse import urlsplit

    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=60)
    received: list[bytes] = []

    def reader():  # reads while the body is sent: a server that answers early and closes resets the connection,
        while True:  # and the kernel drops whatever answer had not been read by then
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            received.append(chunk)

    t = threading.Thread(target=reader, daemon=True)
    if read:
        t.start()
    try:
        sock.sendall(head.replace("{host}", u.netloc).encode())
        for piece in body_chunks:
            try:
                sock.sendall(piece)
            except OSError:  # the server refused and closed
                break
        if read:
            t.join(60)
    finally:
        sock.close()
    data = b"".join(received)
    head_b, _, body = data.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # de-chunk
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split(" ", 2)[1]), headers, body


def metric(url: str, name: str) -> float:
    total = 0.0
    for line in get(url + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.split()[-1])
    return total


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(server):
    """--max-body-bytes (1 MiB) holds for a body without Content-Length: 413 JSON once it passes the limit."""
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    start, piece = b'{"model": "tiny", "messages": [{"role": "user", "content": "', b"x" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(start), start)] + [b"%x\r\n%s\r\n" % (len(piece), piece)] * 48
    before = metric(server, 'pasta_requests_total{endpoint="/v1/chat/completions",status="413"}')
    status, _, body = raw_request(server, head, chunks)  # 3 MiB announced by nobody
    assert status == 413
    assert "limit" in json.loads(body)["error"]["message"]
    assert metric(server, 'pasta_requests_total{endpoint="/v1/chat/completions",status="413"}') == before + 1
    assert ask(client(server), "hi", max_tokens=3).choices  # and it goes on serving


def test_every_error_is_json_and_counted(server):
    # a lone surrogate survives JSON but not UTF-8: a clear 400, not a plain-text 500
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'.encode()
    r = http("POST", server + "/v1/chat/completions", content=body)
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    r = http("POST", server + "/v1/completions", content=b'{"model": "tiny", "prompt": "\\udfff"}')
    assert r.status_code == 400 and "not valid Unicode" in r.json()["error"]["message"]
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        before = metric(server, f'pasta_requests_total{{endpoint="{path}",status="{status}"}}')
        r = http(method, server + path)
        assert r.status_code == status and r.json()["error"]["message"]
        assert metric(server, f'pasta_requests_total{{endpoint="{path}",status="{status}"}}') == before + 1
    before = metric(server, 'pasta_requests_total{endpoint="/v1/chat/completions",status="400"}')
    http("POST", server + "/v1/chat/completions", content=b"{not json")
    assert metric(server, 'pasta_requests_total{endpoint="/v1/chat/completions",status="400"}') == before + 1


def test_a_disconnected_non_streamed_request_is_cancelled(server):
    before = metric(server, "pasta_cancelled_requests_total")
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Write a long story."}],
                       "max_tokens": 1000, "n": 8, "ignore_eos": True}).encode()  # outlasts the hang-up
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {{host}}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(server)
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(head.replace("{host}", u.netloc).encode() + body)
    deadline = time.monotonic() + 20
    while get(server + "/health").json()["running"] == 0:  # it is being decoded
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()  # the client gives up without reading
    deadline = time.monotonic() + 20
    while True:
        h = get(server + "/health").json()
        if h["running"] == 0 and h["cache_slots"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert metric(server, "pasta_cancelled_requests_total") == before + 8  # every choice


def test_stop_strings_cut_the_answer_streamed_or_not(server):
    c = client(server)
    full = ask(c, "Tell me a story.", max_tokens=40, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    assert len(text) > 20
    stop = text[10:16]
    want = text[: text.find(stop)]
    r = ask(c, "Tell me a story.", max_tokens=40, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 40
    parts, finish = [], None
    for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                        max_tokens=40, stop=stop, stream=True, extra_body={"ignore_eos": True}):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    assert "".join(parts) == want and finish == "stop"
    t = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, extra_body={"ignore_eos": True})
    stop = t.choices[0].text[5:9]
    cut = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, stop=stop,
                               extra_body={"ignore_eos": True})
    assert cut.choices[0].text == t.choices[0].text[: t.choices[0].text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_n_choices_prompt_lists_seeds_and_refusals(server):
    c = client(server)
    r = ask(c, "Name a colour.", max_tokens=12, n=3, temperature=1.0, seed=5)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    texts = [ch.message.content for ch in r.choices]
    assert len(set(texts)) > 1  # different seeds per choice
    again = ask(c, "Name a colour.", max_tokens=12, n=3, temperature=1.0, seed=5)
    assert [ch.message.content for ch in again.choices] == texts  # a seed makes it reproducible
    assert r.usage.completion_tokens <= 3 * 12
    # without a seed, sampling differs from call to call (as OpenAI's)
    free = {ask(c, "Name a colour.", max_tokens=12, temperature=1.0).choices[0].message.content for _ in range(3)}
    assert len(free) > 1
    # a list of prompts: one choice per prompt, in order, each the answer to that prompt alone
    prompts = ["The sky is", "Cats like", "One two three"]
    many = c.completions.create(model="tiny", prompt=prompts, max_tokens=8)
    alone = [c.completions.create(model="tiny", prompt=p, max_tokens=8).choices[0].text for p in prompts]
    assert [ch.index for ch in many.choices] == [0, 1, 2] and [ch.text for ch in many.choices] == alone
    # streamed n > 1: every choice's deltas put together give its answer
    got: dict[int, str] = {}
    for ch in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Name a colour."}],
                                        max_tokens=12, n=3, temperature=1.0, seed=5, stream=True):
        for part in ch.choices:
            got[part.index] = got.get(part.index, "") + (part.delta.content or "")
    assert [got[i] for i in range(3)] == texts
    # an assistant turn without content is accepted
    ok = c.chat.completions.create(model="tiny", max_tokens=4, messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}])
    assert ok.choices[0].message.content is not None
    # what the server does not do is refused, never silently ignored
    for extra, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
                         ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
                         ({"logprobs": True, "extra_body": {"raw": True}}, "not the raw form")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(c, "hi", max_tokens=2, **extra)
        assert param in str(e.value)
    assert ask(c, "hi", max_tokens=2, response_format={"type": "text"}).choices


def test_logprobs_for_the_rendered_tokens(server):
    """logprobs (chat: logprobs + top_logprobs; text completions: logprobs k): one entry per token of the rendered
    answer, whose texts join to the answer; greedy, each token is its own top alternative; streamed, the chunks
    carry the same entries as the whole response; a stop string cuts the entries with the text."""
    c = client(server)
    kw = dict(max_tokens=20, logprobs=True, top_logprobs=2)
    r = ask(c, "Tell me about rivers.", **kw)
    content, lp = r.choices[0].message.content, r.choices[0].logprobs.content
    assert content and "".join(t.token for t in lp) == content and len(lp) >= 10
    for t in lp:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.bytes == list(t.token.encode())
        if t.token:  # greedy: the chosen token is the most likely one
            assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
    streamed, text = [], ""
    for ch in ask(c, "Tell me about rivers.", stream=True, **kw):
        for part in ch.choices:
            text += part.delta.content or ""
            if part.logprobs is not None and part.logprobs.content:
                streamed += part.logprobs.content
            assert len("".join(t.token for t in streamed)) <= len(text)  # never ahead of the text
    assert text == content and [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in lp]
    # text completions: tokens, token_logprobs, top_logprobs (a dict per token) and text_offset
    comp = c.completions.create(model="tiny", prompt="The river", max_tokens=12, logprobs=3).choices[0]
    lp2 = comp.logprobs
    assert "".join(lp2.tokens) == comp.text and len(lp2.token_logprobs) == len(lp2.tokens)
    assert lp2.text_offset == [len("".join(lp2.tokens[:i])) for i in range(len(lp2.tokens))]
    assert all(1 <= len(d) <= 3 for d, t in zip(lp2.top_logprobs, lp2.tokens) if t)
    # a stop string cuts the tokens where it cuts the text
    cut = content[5:8]
    r = ask(c, "Tell me about rivers.", stop=[cut], **kw)
    assert r.choices[0].message.content == content[: content.find(cut)]
    assert "".join(t.token for t in r.choices[0].logprobs.content) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="0 to 5"):
        c.completions.create(model="tiny", prompt="The river", max_tokens=2, logprobs=6)


def test_tiny_temperatures_fail_nobody(server):
    """temperature or top_p of 1e-300 once made NaN probabilities and failed every request in flight."""
    c = client(server)
    alone = ask(c, "Tell me about rivers.", max_tokens=30).choices[0].message.content
    results, errors = {}, []

    def run(name, **kw):
        try:
            results[name] = ask(client(server), "Tell me about rivers.", max_tokens=30, **kw).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((name, e))

    threads = [threading.Thread(target=run, args=("plain",)),
               threading.Thread(target=run, args=("tiny_t",), kwargs={"temperature": 1e-300}),
               threading.Thread(target=run, args=("tiny_p",), kwargs={"temperature": 1.0, "top_p": 1e-300})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert results["plain"] == alone and results["tiny_t"] == alone  # a tiny temperature is greedy
    assert results["tiny_p"] == alone  # a tiny top_p keeps only the most likely token


def test_a_wrong_method_says_which_are_allowed(server):
    """405 keeps Starlette's `Allow` header (RFC 9110) under the server's own JSON error."""
    req = urllib.request.Request(server + "/v1/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405 and e.value.headers["allow"] == "POST"
    assert json.loads(e.value.read())["error"]["message"]


def test_blank_is_ascii_whitespace_as_the_schema_says(server):
    """A prompt of control characters that Python calls space but JSON Schema does not ("\\x1e") is text, as the
    OpenAPI schema states; one of ASCII blanks is refused with 400."""
    c = client(server)
    assert ask(c, "\x1e\x1e", max_tokens=2).choices
    r = http("POST", server + "/v1/completions", {"model": "tiny", "prompt": " \t\n"})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
