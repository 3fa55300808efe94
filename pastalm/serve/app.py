"""`pasta serve`: an OpenAI-compatible HTTP API over the engine, with continuous batching across requests.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed over server-sent events or not),
GET /v1/models, /health and /metrics (Prometheus), and the playground page at / (static files, `static/`).
Per-request extra fields: `pasta` ({"enabled", "reserve_scale", "max_threads", "max_promises", "repeat_guard",
"block_guard", "threads", "force"}) and `raw` (the annotated form instead of the rendered answer). Errors are
OpenAI-style objects ({"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, GenerateConfig
from ..engine.types import MAX_TOP_LOGPROBS
from .scheduler import Busy, Closed, ComputeThread, Job, Scheduler

LENGTH_LIMITS = ("max_new_tokens", "context")
STATIC = Path(__file__).resolve().parent / "static"  # the playground page


# -- settings ------------------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Server settings: the decoding defaults and the limits."""

    model_id: str
    defaults: GenerateConfig
    system: str | None = None
    max_running: int = 16  # requests decoded together
    max_queue: int = 64  # requests waiting for a slot; past this: 429
    max_tokens_limit: int = 2048  # the largest max_tokens a request may ask for
    max_prompt_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    api_key: str | None = None


# -- request bodies ------------------------------------------------------------------------------------------------


class PastaOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    reserve_scale: float | None = Field(default=None, ge=0, le=100)
    max_threads: int | None = Field(default=None, ge=0, le=64)
    max_promises: int | None = Field(default=None, ge=1, le=1024)
    repeat_guard: bool | None = None
    block_guard: bool | None = None
    # the playground's extras (docs/serving.md, "The playground"): a stream that says what each thread is doing,
    # and a forced replay of an annotated answer (to see how the model decodes a given annotation)
    threads: bool = False
    force: str | None = Field(default=None, min_length=1, max_length=65536)

    @field_validator("force")
    @classmethod
    def _force_utf8(cls, v):
        return v if v is None else _utf8(v, "pasta.force")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


MAX_CHOICES = 16  # n x prompts of one request


def _utf8(text: str, what: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" survives JSON but not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds {e.object[e.start:e.end]!a} at character {e.start}, which is not valid "
                         "Unicode (a lone surrogate); send UTF-8 text") from None
    return text


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None  # null: an assistant turn without text (as OpenAI allows)

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = Field(default=None, json_schema_extra={"anyOf": [
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                             "maxItems": 4}, {"type": "null"}]})
    stream: bool = False
    pasta: PastaOptions | None = None
    raw: bool = False
    ignore_eos: bool = False  # as vLLM's: decode until a limit (for benchmarks)
    # what this server does not do is refused, never ignored
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("give at most 4 stop strings")
        if any(not s for s in stops):
            raise ValueError("a stop string is empty")
        return [_utf8(s, "a stop string") for s in stops]

    def refuse_unsupported(self) -> None:
        fmt = (self.response_format or {}).get("type", "text")
        if fmt != "text":
            raise APIError(400, f"response_format {fmt!r} is not supported by this server; leave it out or use "
                                "{'type': 'text'}", param="response_format", code="unsupported_parameter")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (function calling) is not supported by this server; leave them out",
                               param=name, code="unsupported_parameter")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                raise APIError(400, f"{name} is not supported by this server (no tools); leave it out",
                               param=name, code="unsupported_parameter")

    def logprobs_k(self, chat: bool) -> int | None:
        """How many alternatives each returned token carries (None: no logprobs). Chat: `logprobs: true` and
        `top_logprobs` 0-20; text completions: `logprobs` 0-5 (as OpenAI's)."""
        if chat:
            if self.logprobs is not None and not isinstance(self.logprobs, bool):
                raise APIError(400, "logprobs is true or false in /v1/chat/completions; give the number of "
                                    "alternatives as top_logprobs", param="logprobs")
            if self.top_logprobs is not None and not self.logprobs:
                raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise APIError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
            k = (self.top_logprobs or 0) if self.logprobs else None
        else:
            if self.top_logprobs is not None:
                raise APIError(400, "/v1/completions takes logprobs (0-5), not top_logprobs", param="top_logprobs")
            if isinstance(self.logprobs, bool) or (self.logprobs is not None and not 0 <= self.logprobs <= 5):
                raise APIError(400, "logprobs is the number of alternatives per token in /v1/completions, 0 to 5",
                               param="logprobs")
            k = self.logprobs
        if k is not None and self.raw:
            raise APIError(400, "logprobs are given for the rendered answer, not the raw form; leave out raw or "
                                "logprobs", param="logprobs")
        return k


# What the validators below refuse, stated in the OpenAPI schema too (a client generated from it knows): some
# message has text, no prompt is blank. "Blank" is ASCII whitespace only, spelled out: regex engines disagree on
# `\s` (Python counts "\x1c"-"\x1f" as space, JSON Schema's ECMA regex does not; schemathesis found "\x1e\x1e"
# accepted by the schema and refused here). JSON Schema's `pattern` searches: "holds a non-blank character".
_NONBLANK = r"[^ \t\n\r\f\v]"
_TEXT = {"type": "string", "pattern": _NONBLANK}
_SOME_TEXT = {"type": "object", "required": ["content"], "properties": {"content": {"anyOf": [
    _TEXT, {"type": "array", "contains": {"type": "object", "required": ["text"], "properties": {"text": _TEXT}}}]}}}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, json_schema_extra={"contains": _SOME_TEXT})
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_content(cls, v: list[Message]) -> list[Message]:
        for i, m in enumerate(v):
            _utf8(m.text(), f"messages[{i}].content")
        if not any(re.search(_NONBLANK, m.text()) for m in v):
            raise ValueError("every message is empty; give some text")
        return v


class CompletionRequest(_Common):
    prompt: str | list[str] = Field(json_schema_extra={"anyOf": [
        _TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_CHOICES}]})

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v) -> list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts:
            raise ValueError("the prompt list is empty; give at least one prompt")
        if len(prompts) > MAX_CHOICES:
            raise ValueError(f"give at most {MAX_CHOICES} prompts in one request")
        for i, p in enumerate(prompts):
            _utf8(p, "the prompt" if isinstance(v, str) else f"prompt[{i}]")
            if not re.search(_NONBLANK, p):
                raise ValueError("the prompt is empty; give some text" if isinstance(v, str)
                                 else f"prompt[{i}] is empty; give some text")
        return prompts


# -- errors --------------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every error is (OpenAI's shape); documented in the OpenAPI schema for the statuses below."""
    error: ErrorDetail


ERRORS = {400: "invalid request: the message says what to change", 401: "missing or wrong API key",
          404: "the model asked for is not served here", 413: "the request body is over --max-body-bytes",
          429: "the queue is full: retry after Retry-After seconds", 500: "internal error",
          503: "the server is shutting down"}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def _errors(*statuses: int) -> dict:
    return {s: {"model": ErrorResponse, "description": ERRORS[s]} for s in statuses}


GENERATE_ERRORS = _errors(*ERRORS)  # what /v1/chat/completions and /v1/completions may answer besides 200


# -- metrics -------------------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one server (its own registry)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pasta_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.tokens = Counter("pasta_generated_tokens", "generated tokens (rendered answer + tags)", registry=r)
        self.prompt_tokens = Counter("pasta_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.steps = Counter("pasta_decode_steps", "forward passes of the serving loop", registry=r)
        self.cancels = Counter("pasta_cancelled_requests", "requests cancelled (client gone)", registry=r)
        self.running = Gauge("pasta_running_requests", "requests being decoded", registry=r)
        self.queued = Gauge("pasta_queue_depth", "requests waiting for a slot", registry=r)
        self.threads = Gauge("pasta_live_threads", "live threads (main + async) of running requests", registry=r)
        self.slots = Gauge("pasta_cache_slots", "KV cache slots held", registry=r)
        self.speedup = Histogram("pasta_theoretical_speedup", "theoretical speedup of finished requests",
                                 buckets=(1.0, 1.1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 8), registry=r)
        self.latency = Histogram("pasta_request_seconds", "time from submission to the last token", registry=r)
        self.ttft = Histogram("pasta_time_to_first_token_seconds", "time from submission to the first text",
                              registry=r)

    def step(self) -> None:
        self.steps.inc()

    def cancelled(self) -> None:
        self.cancels.inc()

    def finished(self, result, job: Job) -> None:
        self.tokens.inc(result.tokens + result.tag_tokens)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.speedup.observe(result.theoretical_speedup)
        now = time.perf_counter()
        self.latency.observe(now - job.submitted)
        if job.first_text is not None:
            self.ttft.observe(job.first_text - job.submitted)

    def gauges(self, running: int, queued: int, threads: int, slots: int) -> None:
        self.running.set(running)
        self.queued.set(queued)
        self.threads.set(threads)
        self.slots.set(slots)


# -- the app -------------------------------------------------------------------------------------------------------


class StopText:
    """Cuts one choice's streamed text at the first of its stop strings. It holds back the last
    (longest stop - 1) characters until the next delta shows they do not begin a stop string, so no part of a stop
    string is ever sent, also when it spans deltas (or an async block's text: deltas come in reading order)."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(x) for x in stops), default=1) - 1
        self.buf = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that may be sent now: up to the first stop string once no stop string that could start
        earlier may still complete (`stop=["a", ".aa"]` on `..a` waits: `.aa` would come first), else up to the
        first place where a stop string may begin."""
        if self.stopped:
            return ""
        self.buf += delta
        hits = [i for i in (self.buf.find(x) for x in self.stops) if i >= 0]
        first = min(hits) if hits else len(self.buf)
        n = len(self.buf)
        maybe = next((p for p in range(max(0, n - self.hold), first)
                      if any(len(x) > n - p and x.startswith(self.buf[p:]) for x in self.stops)), None)
        if maybe is None and hits:
            self.stopped = True
            out, self.buf = self.buf[:first], ""
            return out
        cut = first if maybe is None else maybe
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out

    def flush(self) -> str:
        """At the end of the answer: what was held back (up to a stop string in it)."""
        if self.stopped:
            return ""
        hits = [i for i in (self.buf.find(x) for x in self.stops) if i >= 0]
        out, self.buf = self.buf[: min(hits)] if hits else self.buf, ""
        self.stopped = bool(hits)
        return out


class _Choice:
    """One choice of a request being answered: its job, its stop strings, its text so far and, with logprobs, its
    tokens (`Interpreter.token_logprobs` entries) and how many of them were sent."""

    def __init__(self, job: Job, stops: list[str]):
        self.job, self.stop = job, StopText(stops)
        self.text, self.result, self.error = "", None, None
        self.tokens: list[dict] = []
        self.tokens_sent, self.chars_sent = 0, 0

    def sendable(self, final: bool = False) -> list[dict]:
        """Tokens not sent yet that the text sent so far covers; at the end, the rest, cut where a stop string cut
        the text (a token wholly past it is never sent)."""
        out = []
        while self.tokens_sent < len(self.tokens):
            e = self.tokens[self.tokens_sent]
            room = len(self.text) - self.chars_sent
            if len(e["text"]) > room:
                if not final or room <= 0:
                    break
                e = {**e, "text": e["text"][:room]}
            out.append({**e, "offset": self.chars_sent})
            self.tokens_sent += 1
            self.chars_sent += len(e["text"])
        return out


def create_app(engine: Engine, cfg: ServeConfig, compute: ComputeThread | None = None) -> FastAPI:
    """The OpenAI-compatible app on `engine`. `compute`: the thread that loaded the engine, to run the serving loop
    on (`pasta serve` does this; see `scheduler.ComputeThread`); None starts a thread of its own."""
    metrics = Metrics()
    scheduler = Scheduler(engine, cfg.max_running, cfg.max_queue, metrics, compute)

    @asynccontextmanager
    async def lifespan(_app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="pastalm", version="0.1.0", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    created = int(time.time())

    def _endpoint(request: Request) -> str:
        return request.url.path

    def _error(request: Request, status: int, message: str, type_: str, param: str | None = None,
               code: str | None = None, headers: dict | None = None) -> JSONResponse:
        """Every error: an OpenAI-style object, counted in pasta_requests_total."""
        metrics.requests.labels(_endpoint(request), str(status)).inc()
        return JSONResponse(error_body(message, type_, param, code), status, headers=headers)

    class Guard:
        """API key and announced body size of /v1/ calls, before anything reads the body. A plain ASGI middleware
        (not `@app.middleware`), so handlers see the client's own `receive` and notice a disconnect."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"].startswith("/v1/"):
                request = Request(scope)
                reply = None
                if cfg.api_key is not None:
                    given = request.headers.get("authorization", "")
                    token = given[7:] if given.lower().startswith("bearer ") else ""
                    if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                        reply = _error(request, 401, "invalid or missing API key (send 'Authorization: Bearer "
                                       "KEY')", "authentication_error", code="invalid_api_key")
                size = request.headers.get("content-length")
                if reply is None and size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
                    reply = _error(request, 413, f"the request body has {size} bytes; the limit is "
                                   f"{cfg.max_body_bytes}", "invalid_request_error", code="request_too_large")
                if reply is not None:
                    await reply(scope, receive, send)
                    return
                # a body without Content-Length (chunked) is counted while it is read: past the limit, a 413 (an
                # HTTPException, which FastAPI passes on to the handler below) before the rest is read
                seen = 0

                async def limited():
                    nonlocal seen
                    message = await receive()
                    if message["type"] == "http.request":
                        seen += len(message.get("body", b""))
                        if seen > cfg.max_body_bytes:
                            raise StarletteHTTPException(413, "request body too large")
                    return message

                await self.inner(scope, limited, send)
                return
            await self.inner(scope, receive, send)

    app.add_middleware(Guard)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            msg = str(e.get("msg")).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
        param = ".".join(str(x) for x in exc.errors()[0].get("loc", ())[1:]) if exc.errors() else None
        return _error(request, 400, "invalid request: " + "; ".join(parts), "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(request, exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 413:
            message = f"the request body is larger than the limit of {cfg.max_body_bytes} bytes"
        return _error(request, exc.status_code, message, "invalid_request_error",
                      code="request_too_large" if exc.status_code == 413 else None,
                      headers=exc.headers)  # a 405 keeps its Allow header

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        import traceback

        traceback.print_exception(exc)
        return _error(request, 500, f"internal error: {type(exc).__name__}", "server_error")

    @app.get("/", include_in_schema=False)
    async def playground():
        # the page holds no key: with --api-key it asks for one and sends it with each /v1/ request
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_id, **scheduler.state()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=_errors(401))
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": created,
                                            "owned_by": "pastalm"}]}

    def _config(body: _Common, max_tokens: int | None, chat: bool) -> GenerateConfig:
        if body.model != cfg.model_id:
            raise APIError(404, f"model '{body.model}' is not served here; this server serves '{cfg.model_id}' "
                                "(GET /v1/models)", param="model", code="model_not_found")
        body.refuse_unsupported()
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_limit}",
                           param="max_tokens")
        c = cfg.defaults
        kw = {"max_new_tokens": max_tokens or min(c.max_new_tokens, cfg.max_tokens_limit)}
        if body.temperature is not None:
            kw["temperature"] = body.temperature
        if body.top_p is not None:
            kw["top_p"] = body.top_p
        # as OpenAI's: without a seed, sampling differs from call to call; with one it is reproducible
        kw["seed"] = body.seed if body.seed is not None else secrets.randbits(62)
        kw["logprobs"] = body.logprobs_k(chat)
        if body.pasta is not None:
            kw["sequential"] = not body.pasta.enabled
            if body.pasta.reserve_scale is not None:
                kw["reserve_scale"] = body.pasta.reserve_scale
            if body.pasta.max_threads is not None:
                kw["max_threads"] = body.pasta.max_threads
            if body.pasta.max_promises is not None:
                kw["max_promises"] = body.pasta.max_promises
            if body.pasta.repeat_guard is not None:
                kw["repeat_guard"] = body.pasta.repeat_guard
            if body.pasta.block_guard is not None:
                kw["block_guard"] = body.pasta.block_guard
            if body.pasta.threads and not body.stream:
                raise APIError(400, "pasta.threads streams what each thread is doing; it needs stream: true",
                               param="pasta.threads")
            if body.pasta.force is not None and body.n > 1:
                raise APIError(400, "pasta.force replays one annotated answer; it needs n: 1", param="pasta.force")
        try:
            config = replace(c, **kw)
            config = engine.check(config)
        except ValueError as e:  # e.g. a reserve scale on the linear layout, which the vLLM backend decodes
            raise APIError(400, str(e), param="pasta") from None
        return config

    def _check_prompt(ids: list[int]) -> None:
        if len(ids) > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server allows at most "
                                f"{cfg.max_prompt_tokens}", param="messages", code="context_length_exceeded")

    def _submit(prompts: list[list[int]], body: _Common, config: GenerateConfig) -> list[_Choice]:
        """One job per prompt and choice (n), sharing one event queue; choice k of prompt p has index p * n + k
        and seed + k. All or none are queued."""
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} asks for {len(prompts) * body.n} choices; "
                                f"this server gives at most {MAX_CHOICES} per request", param="n")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        choices: list[_Choice] = []
        extra = body.pasta or PastaOptions()
        try:
            for p, ids in enumerate(prompts):
                for k in range(body.n):
                    job = Job(ids, replace(config, seed=config.seed + k), loop, queue, index=len(choices),
                              stop_ids=set() if body.ignore_eos else None, threads=extra.threads,
                              force=extra.force)
                    scheduler.submit(job)
                    choices.append(_Choice(job, body.stop or []))
        except (Busy, Closed) as e:
            for c in choices:
                scheduler.cancel(c.job, client_gone=False)
            if isinstance(e, Busy):
                raise APIError(429, str(e), "rate_limit_error", code="server_busy",
                               headers={"Retry-After": "1"}) from None
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        return choices

    def _usage(results: list, n: int = 1) -> dict:
        """completion_tokens: the tokens the model chose (tags included, the forced `<async>` not), the count
        max_tokens bounds; over several choices, their sum (each prompt's tokens counted once)."""
        prompt = sum(r.prompt_tokens for r in results[::n])
        chosen = sum(r.chosen for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": chosen, "total_tokens": prompt + chosen,
                "decode_steps": max(r.decode_steps for r in results), "threads": sum(r.threads for r in results),
                "theoretical_speedup": round(sum(r.theoretical_speedup for r in results) / len(results), 4),
                "tag_tokens": sum(r.tag_tokens for r in results)}

    def _finish_reason(c: _Choice) -> str:
        if c.stop.stopped:
            return "stop"
        return "length" if any(x in LENGTH_LIMITS for x in c.result.limits_hit) else "stop"

    def _on_event(c: _Choice, kind: str, payload) -> str:
        """Apply one event to its choice; return the text that may be sent now."""
        if kind == "text":
            out = c.stop.feed(payload)
            if c.stop.stopped:  # a stop string: the answer ends here; decoding stops at the next step
                scheduler.cancel(c.job, client_gone=False)
        elif kind in ("tokens", "threads"):
            if kind == "tokens":
                c.tokens.extend(payload)
            out = ""
        elif kind == "done":
            c.result = payload
            out = c.stop.flush()
        else:
            c.error = payload
            out = ""
        c.text += out
        return out

    async def _collect(choices: list[_Choice], request: Request) -> bool:
        """Wait for every choice of a non-streamed request; a client that disconnects meanwhile cancels them (and
        False is returned)."""
        queue = choices[0].job.queue
        open_ = {c.job.index for c in choices}
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while open_:
                try:
                    index, kind, payload = await asyncio.wait_for(queue.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    pass
                else:
                    _on_event(choices[index], kind, payload)
                    if kind in ("done", "error"):
                        open_.discard(index)
                # text events keep coming while it decodes: look at the connection every 0.25 s regardless
                if open_ and loop.time() - checked >= 0.25:
                    checked = loop.time()
                    if await request.is_disconnected():
                        for c in choices:
                            if c.result is None:
                                scheduler.cancel(c.job)
                        return False
        except asyncio.CancelledError:
            for c in choices:
                if c.result is None:
                    scheduler.cancel(c.job)
            raise
        failed = [c.error for c in choices if c.error is not None]
        if failed:
            raise APIError(500, failed[0], "server_error")
        return True

    def _stream(choices: list[_Choice], chunk, final, endpoint: str, want_lp: bool = False):
        queue = choices[0].job.queue

        async def events():
            open_ = {c.job.index for c in choices}
            try:
                for c in choices:
                    yield _sse(chunk(c, None, first=True))
                while open_:
                    index, kind, payload = await queue.get()
                    c = choices[index]
                    text = _on_event(c, kind, payload)
                    if kind == "threads":  # pasta.threads: what each thread did in this step, as a chunk of its own
                        out = chunk(c, "")
                        out["pasta"] = payload
                        yield _sse(out)
                        continue
                    entries = c.sendable() if want_lp and kind != "error" else None
                    if text or entries:
                        yield _sse(chunk(c, text, entries=entries))
                    if kind == "error":
                        open_.clear()
                        metrics.requests.labels(endpoint, "500").inc()
                        yield _sse(error_body(payload, "server_error"))
                        return
                    if kind == "done":
                        open_.discard(index)
                        if want_lp and (rest := c.sendable(final=True)):
                            yield _sse(chunk(c, "", entries=rest))
                        yield _sse(final(c))
                metrics.requests.labels(endpoint, "200").inc()
                yield "data: [DONE]\n\n"
            finally:
                for c in choices:  # the client went away (or one choice failed): free the rest
                    if c.result is None:
                        scheduler.cancel(c.job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _respond(request: Request, body: _Common, prompts: list[list[int]], config: GenerateConfig,
                       chat: bool):
        """Submit the jobs; answer with one response object or a stream of chunks. Chat and text completions
        differ only in their object names and where the text goes (`message`/`delta` against `text`)."""
        choices = _submit(prompts, body, config)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(obj: str, parts: list[dict], results: list | None = None, n: int = 1) -> dict:
            out = {"id": rid, "object": obj, "created": now, "model": cfg.model_id, "choices": parts}
            if results is not None:
                out.update(usage=_usage(results, n), limits_hit=sorted({x for r in results for x in r.limits_hit}))
            return out

        want_lp = config.logprobs is not None

        def lp_part(entries: list[dict] | None) -> dict | None:
            """Logprobs in OpenAI's shape: chat `{"content": [{token, logprob, bytes, top_logprobs}]}`, text
            completions `{tokens, token_logprobs, top_logprobs, text_offset}`."""
            if entries is None:
                return None
            def tok(text: str, logprob: float | None) -> dict:
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            dec = engine.tokenizer.decode
            if chat:
                return {"content": [{**tok(e["text"], e["logprob"]),
                                     "top_logprobs": [tok(dec([i]), v) for i, v in e["top"]]} for e in entries],
                        "refusal": None}
            return {"tokens": [e["text"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{dec([i]): v for i, v in e["top"]} for e in entries],
                    "text_offset": [e["offset"] for e in entries]}

        def text_part(text: str, first: bool = False, entries: list[dict] | None = None, whole: bool = False) -> dict:
            """A choice's text: chat's `message` (`whole`) or `delta`, a completion's `text`; with its logprobs
            (completions always carry the key, chat only when asked)."""
            if not chat:
                return {"text": text, "logprobs": lp_part(entries)}
            if whole:
                part = {"message": {"role": "assistant", "content": text}}
            else:
                part = {"delta": {"role": "assistant", "content": ""} if first else {"content": text}}
            if want_lp:
                part["logprobs"] = lp_part(entries)
            return part

        if body.stream:
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(c: _Choice, text, first=False, entries=None):
                return envelope(obj, [{"index": c.job.index, **text_part("" if first else text, first, entries),
                                       "finish_reason": None}])

            def final(c: _Choice):
                part = {"delta": {}} if chat else text_part("")
                out = envelope(obj, [{"index": c.job.index, **part, "finish_reason": _finish_reason(c)}], [c.result])
                if body.raw:
                    out["raw"] = c.result.raw
                if c.job.threads:  # the figures of the answer, and its pieces as they ended
                    r = c.result
                    out["pasta"] = {"done": True, "tokens": r.tokens, "tag_tokens": r.tag_tokens,
                                    "decode_steps": r.decode_steps, "threads": r.threads,
                                    "theoretical_speedup": r.theoretical_speedup, "wall_s": r.wall_s,
                                    "mode": r.mode, "limits_hit": r.limits_hit, "pieces": r.pieces}
                return out

            return _stream(choices, chunk, final, endpoint, want_lp)
        if not await _collect(choices, request):  # nobody to answer: 499, as nginx logs a client that left
            metrics.requests.labels(endpoint, "499").inc()
            return Response(status_code=499)
        metrics.requests.labels(endpoint, "200").inc()
        parts = []
        for c in choices:
            content = c.result.raw if body.raw else c.text
            part = text_part(content, entries=c.sendable(final=True) if want_lp else None, whole=True)
            parts.append({"index": c.job.index, **part, "finish_reason": _finish_reason(c)})
        return envelope("chat.completion" if chat else "text_completion", parts, [c.result for c in choices],
                        body.n)

    @app.post("/v1/chat/completions", responses=GENERATE_ERRORS)
    async def chat(body: ChatRequest, request: Request):
        from ..models import chat_messages

        max_tokens = body.max_completion_tokens or body.max_tokens
        config = _config(body, max_tokens, chat=True)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if cfg.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": cfg.system})
        ids = await run_in_threadpool(chat_messages, engine.tokenizer, msgs)  # CPU work: off the event loop
        _check_prompt(ids)
        return await _respond(request, body, [ids], config, chat=True)

    @app.post("/v1/completions", responses=GENERATE_ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        config = _config(body, body.max_tokens, chat=False)
        prompts = await run_in_threadpool(lambda: [list(engine.tokenizer.encode(p)) for p in body.prompt])
        for ids in prompts:
            _check_prompt(ids)
        return await _respond(request, body, prompts, config, chat=False)

    def openapi() -> dict:
        """FastAPI's schema, less the 422 it documents for a body that fails validation: this server answers
        those with 400 and an OpenAI error object, as documented."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
