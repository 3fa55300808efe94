"""`pasta serve`: an OpenAI-compatible HTTP API over the engine, with continuous batching across requests.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed over server-sent events or not),
GET /v1/models, /health and /metrics (Prometheus). Per-request extra fields: `pasta` ({"enabled", "reserve_scale",
"max_threads"}) and `raw` (the annotated form instead of the rendered answer). Errors are OpenAI-style objects
({"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine, GenerateConfig
from .scheduler import Busy, Closed, Job, Scheduler

LENGTH_LIMITS = ("max_new_tokens", "context")


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


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    pasta: PastaOptions | None = None
    raw: bool = False
    ignore_eos: bool = False  # as vLLM's: decode until a limit (for benchmarks)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_content(cls, v: list[Message]) -> list[Message]:
        if not any(m.text().strip() for m in v):
            raise ValueError("every message is empty; give some text")
        return v


class CompletionRequest(_Common):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string or a list of one string)")
            v = v[0]
        if not v.strip():
            raise ValueError("the prompt is empty; give some text")
        return v


# -- errors --------------------------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


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


def create_app(engine: Engine, cfg: ServeConfig) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(engine, cfg.max_running, cfg.max_queue, metrics)

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

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Body size and API key, before anything reads the body."""
        path = request.url.path
        if path.startswith("/v1/"):
            if cfg.api_key is not None:
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                    metrics.requests.labels(path, "401").inc()
                    return JSONResponse(error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                                   "authentication_error", code="invalid_api_key"), 401)
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
                metrics.requests.labels(path, "413").inc()
                return JSONResponse(error_body(f"the request body has {size} bytes; the limit is "
                                               f"{cfg.max_body_bytes}", "invalid_request_error"), 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        metrics.requests.labels(_endpoint(request), "400").inc()
        param = ".".join(str(x) for x in exc.errors()[0].get("loc", ())[1:]) if exc.errors() else None
        return JSONResponse(error_body("invalid request: " + "; ".join(parts), "invalid_request_error", param), 400)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.requests.labels(_endpoint(request), str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), exc.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_id, **scheduler.state()}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": created,
                                            "owned_by": "pastalm"}]}

    def _config(body: _Common, max_tokens: int | None) -> GenerateConfig:
        if body.model != cfg.model_id:
            raise APIError(404, f"model '{body.model}' is not served here; this server serves '{cfg.model_id}' "
                                "(GET /v1/models)", param="model", code="model_not_found")
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {cfg.max_tokens_limit}",
                           param="max_tokens")
        c = cfg.defaults
        kw = {"max_new_tokens": max_tokens or min(c.max_new_tokens, cfg.max_tokens_limit)}
        if body.temperature is not None:
            kw["temperature"] = body.temperature
        if body.top_p is not None:
            kw["top_p"] = body.top_p
        if body.seed is not None:
            kw["seed"] = body.seed
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

    def _submit(ids: list[int], config: GenerateConfig, ignore_eos: bool = False) -> Job:
        job = Job(ids, config, asyncio.get_running_loop(), stop_ids=set() if ignore_eos else None)
        try:
            scheduler.submit(job)
        except Busy as e:
            raise APIError(429, str(e), "rate_limit_error", code="server_busy") from None
        except Closed as e:
            raise APIError(503, str(e), "server_error", code="shutting_down") from None
        return job

    def _usage(res) -> dict:
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.tokens + res.tag_tokens,
                "total_tokens": res.prompt_tokens + res.tokens + res.tag_tokens, "decode_steps": res.decode_steps,
                "threads": res.threads, "theoretical_speedup": res.theoretical_speedup,
                "tag_tokens": res.tag_tokens}

    def _finish_reason(res) -> str:
        return "length" if any(x in LENGTH_LIMITS for x in res.limits_hit) else "stop"

    async def _wait(job: Job):
        """The final result of a non-streamed job (text events are dropped)."""
        try:
            while True:
                kind, payload = await job.queue.get()
                if kind == "done":
                    return payload
                if kind == "error":
                    raise APIError(500, payload, "server_error")
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise

    def _stream(job: Job, chunk, final, endpoint: str):
        async def events():
            done = False
            try:
                yield _sse(chunk(None, first=True))
                while True:
                    kind, payload = await job.queue.get()
                    if kind == "text":
                        yield _sse(chunk(payload))
                    elif kind == "done":
                        done = True
                        metrics.requests.labels(endpoint, "200").inc()
                        yield _sse(final(payload))
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        done = True
                        metrics.requests.labels(endpoint, "500").inc()
                        yield _sse(error_body(payload, "server_error"))
                        return
            finally:
                if not done:  # the client went away: free its request
                    scheduler.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _respond(body: _Common, ids: list[int], config: GenerateConfig, chat: bool):
        """Submit the job; answer with one response object or a stream of chunks. Chat and text completions
        differ only in their object names and where the text goes (`message`/`delta` against `text`)."""
        job = _submit(ids, config, body.ignore_eos)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())

        def envelope(obj: str, choice: dict, res=None) -> dict:
            out = {"id": rid, "object": obj, "created": now, "model": cfg.model_id, "choices": [{"index": 0, **choice}]}
            if res is not None:
                out.update(usage=_usage(res), limits_hit=res.limits_hit)
            return out

        def text_part(text: str, first: bool = False) -> dict:
            if chat:
                return {"delta": {"role": "assistant", "content": ""} if first else {"content": text}}
            return {"text": text, "logprobs": None}

        if body.stream:
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(text, first=False):
                return envelope(obj, {**text_part("" if first else text, first), "finish_reason": None})

            def final(res):
                out = envelope(obj, {**({"delta": {}} if chat else text_part("")),
                                     "finish_reason": _finish_reason(res)}, res)
                if body.raw:
                    out["raw"] = res.raw
                return out

            return _stream(job, chunk, final, endpoint)
        res = await _wait(job)
        metrics.requests.labels(endpoint, "200").inc()
        content = res.raw if body.raw else res.text
        part = {"message": {"role": "assistant", "content": content}} if chat else text_part(content)
        return envelope("chat.completion" if chat else "text_completion",
                        {**part, "finish_reason": _finish_reason(res)}, res)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        from ..models import chat_messages

        max_tokens = body.max_completion_tokens or body.max_tokens
        config = _config(body, max_tokens)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        if cfg.system and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": cfg.system})
        ids = chat_messages(engine.tokenizer, msgs)
        _check_prompt(ids)
        return await _respond(body, ids, config, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        config = _config(body, body.max_tokens)
        ids = list(engine.tokenizer.encode(body.prompt))
        _check_prompt(ids)
        return await _respond(body, ids, config, chat=False)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
