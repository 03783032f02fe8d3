"""The HTTP layer: an OpenAI-compatible FastAPI app over :class:`~shoptune.serve.engine.Engine`.

    GET  /v1/models                  base model + loaded adapters (the request's `model` picks one)
    POST /v1/completions             text completion, `stream: true` for server-sent events
    POST /v1/chat/completions        chat (the tokenizer's chat template), streaming too
    GET  /v1/tasks                   task cards and their structured input schemas
    POST /v1/tasks/{task}            structured input -> card prompt -> constrained decoding -> answer
    POST /v1/load_lora_adapter       admin, as vLLM: {"lora_name", "lora_path"} inside --adapters-dir
    POST /v1/unload_lora_adapter     admin: drains the adapter's requests, then unloads it
    GET  /health, /health/ready      readiness: 503 while the engine cannot serve (see Engine.health)
    GET  /health/live                liveness: 503 once only a restart helps (worker dead, model broken)
    GET  /metrics                    Prometheus metrics (labels: resolved model names only)

Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

This module is the HTTP shell: routes that hand the parsed request to a handler of
:mod:`shoptune.serve.handlers` (which does the work and is unit-tested without a server), error
mapping, and :class:`Gate` (API keys, body limits, metrics, the catch-all 500).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import sys
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoptune.serve.engine import Engine, EngineError, EngineStats
from shoptune.serve.handlers import Admin, Chat, Completions, ServeSettings, Tasks
from shoptune.serve.protocol import (AdapterStatus, ChatCompletionRequest, ChatCompletionResponse,
                                     CompletionRequest, CompletionResponse, ErrorResponse,
                                     HealthStatus, LoadAdapterRequest, ModelList, TaskInfo,
                                     TaskList, TaskRequest, TaskResult, UnloadAdapterRequest,
                                     find_invalid_text)

log = logging.getLogger("shoptune.serve")


def error_body(status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("shoptune_requests", "HTTP requests", ["endpoint", "model", "status"],
                                registry=r)
        self.latency = Histogram("shoptune_request_latency_seconds", "Request latency, to last byte",
                                 ["endpoint", "model"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.ttft = Histogram("shoptune_time_to_first_token_seconds", "Queue + prefill time",
                              ["model"], registry=r, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("shoptune_batch_size", "Requests per engine batch", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_adapters = Histogram("shoptune_batch_adapters", "Distinct adapters per batch",
                                        registry=r, buckets=(1, 2, 3, 4, 6, 8, 16))
        self.prompt_tokens = Counter("shoptune_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.generated_tokens = Counter("shoptune_generated_tokens", "Generated tokens", ["model"],
                                        registry=r)
        self.tokens_per_second = Gauge("shoptune_tokens_per_second",
                                       "Generated tokens/s of the last batch", registry=r)
        queue_depth = Gauge("shoptune_queue_depth", "Requests waiting for a batch", registry=r)
        queue_depth.set_function(lambda: engine.queue_depth)
        running = Gauge("shoptune_running_requests", "Requests in the running batch", registry=r)
        running.set_function(lambda: engine.running)
        adapters = Gauge("shoptune_adapters_loaded", "LoRA adapters loaded", registry=r)
        adapters.set_function(lambda: len(engine.adapters))
        engine.stats = EngineStats(on_batch=self._on_batch, on_tokens=self._on_tokens)

    def _on_batch(self, size: int, n_adapters: int, tokens: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_adapters.observe(n_adapters)
        if seconds > 0:
            self.tokens_per_second.set(tokens / seconds)

    def _on_tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generated_tokens.labels(model).inc(generated)


def _endpoint(path: str) -> str:
    if path.startswith("/v1/tasks/"):
        return "/v1/tasks/{task}"
    known = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/tasks",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health", "/health/live",
             "/health/ready", "/metrics"}
    return path if path in known else "other"


class Gate:
    """Pure-ASGI middleware: API-key check, body-size limit and read timeout, text that is not
    Unicode (400 naming the field), request metrics, and the catch-all 500 (answered here so the
    exception never reaches uvicorn, which would close the client's keep-alive connection).

    (Pure ASGI rather than BaseHTTPMiddleware, which would buffer streamed responses and hide
    client disconnects from the handlers.)
    """

    def __init__(self, app, *, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.keys = [k.encode() for k in settings.api_keys if k]  # (an empty key matches nothing)

    def _authorized(self, scope) -> bool:
        """``Authorization: Bearer KEY`` with KEY exactly one of the keys (RFC 6750: the scheme
        in any case, then spaces; nothing else is stripped), compared in constant time."""
        scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        given, ok = given.lstrip(b" "), False
        for k in self.keys:
            ok |= hmac.compare_digest(given, k)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), {"code": 500, "started": False}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            if scope["path"].startswith("/v1/"):
                if self.settings.api_keys and not self._authorized(scope):
                    return await error_body(401, "Incorrect or missing API key (Authorization: Bearer KEY)",
                                            "authentication_error", code="invalid_api_key")(
                        scope, receive, send_wrapper)
                limit = self.settings.max_body_bytes
                too_big = error_body(413, f"request body larger than {limit} bytes",
                                     param=None, code="request_too_large")
                length = dict(scope["headers"]).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    return await too_big(scope, receive, send_wrapper)
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    body, more = bytearray(), True
                    timeout = self.settings.body_timeout
                    deadline = time.monotonic() + timeout
                    while more:
                        try:  # the whole body within the timeout: a trickle cannot hold a connection
                            message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                        except asyncio.TimeoutError:
                            return await error_body(
                                408, f"request body not received within {timeout:g} s", code="body_timeout",
                                headers={"Connection": "close"})(scope, receive, send_wrapper)
                        if message["type"] == "http.disconnect":
                            return
                        body += message.get("body", b"")
                        more = message.get("more_body", False)
                        if len(body) > limit:
                            return await too_big(scope, receive, send_wrapper)
                    bad = _invalid_text(bytes(body))
                    if bad is not None:
                        param, message = bad
                        return await error_body(400, message, param=param)(scope, receive, send_wrapper)
                    replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]
                    inner = receive

                    async def receive():  # the body once, then the real channel (disconnects)
                        return replay.pop() if replay else await inner()
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as exc:  # noqa: BLE001 - the catch-all: a 500, the connection stays usable
                log.exception("internal error on %s %s", scope["method"], scope["path"])
                if status["started"]:
                    raise  # (streams report errors in-band; a response cut midway cannot be repaired)
                await error_body(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")(
                    scope, receive, send_wrapper)
        finally:
            endpoint = _endpoint(scope["path"])
            model = scope.get("state", {}).get("model", "-")  # set by handlers once resolved
            self.metrics.requests.labels(endpoint, model, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint, model).observe(time.monotonic() - start)


def _invalid_text(body: bytes) -> tuple[str | None, str] | None:
    """(param, message) when a JSON body holds text that is not Unicode: bytes that are not UTF-8
    (named by the field that holds them, else the body as a whole) or a lone surrogate escape such
    as "\\ud800" (named by its field, a dotted path like ``messages.0.content``); None when the text
    is fine or the body does not parse (the framework's own parser reports that)."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"byte 0x{body[e.start]:02x} at offset {e.start}"
        try:  # the undecodable bytes become lone surrogates: find_invalid_text names their field
            field = find_invalid_text(json.loads(body.decode("utf-8", "surrogateescape")))
        except (ValueError, RecursionError):
            field = None
        if field in (None, "body"):
            return None, f"the request body is not valid UTF-8 ({where})"
        return field, f"{field}: invalid text: not valid UTF-8 ({where} of the body)"
    if b"\\u" not in body:  # a lone surrogate can only come as a \u escape now
        return None
    try:
        field = find_invalid_text(json.loads(body))
    except (ValueError, RecursionError):
        return None
    if field is None:
        return None
    return field, f"{field}: invalid text: a lone UTF-16 surrogate is not a Unicode character"


def body_error(exc: Exception) -> str | None:
    """Why the framework could not parse a JSON body, when its generic "There was an error parsing
    the body" hides a reason the client can act on (too deep, too long an integer)."""
    cause = exc.__cause__
    if isinstance(cause, RecursionError):
        return "the request body nests arrays/objects too deeply to parse"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (f"the request body has an integer of more than {sys.get_int_max_str_digits()} digits; "
                "send long numbers as strings")
    return None


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\])$")  # pydantic's name of a union member


def field_path(loc) -> str:
    """A validation error's location as the request field (``messages.0.content``): without the
    ``body`` prefix and without the union member pydantic tried (``list[TextPart]``)."""
    return ".".join(str(x) for x in loc if x != "body" and not (isinstance(x, str) and _UNION_TAG.match(x)))


# ----------------------------------------------------------------------------- routes
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 500, 503, 504)}


def build_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    metrics = Metrics(engine)
    completions, chat = Completions(engine, settings), Chat(engine, settings)
    tasks, admin = Tasks(engine, settings), Admin(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        if hasattr(engine, "start"):  # the gateway engine opens its upstream client on this loop
            await engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn has drained the connections by now
        if hasattr(engine, "aclose"):
            await engine.aclose()

    app = FastAPI(title="shoptune", lifespan=lifespan, responses=_ERRORS)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(Gate, settings=settings, metrics=metrics)

    @app.exception_handler(EngineError)
    async def _engine_error(request, exc: EngineError):
        return error_body(exc.status, exc.message, exc.type, exc.param, exc.code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # (its loc is the character offset, not a field)
            why = (first.get("ctx") or {}).get("error", "JSON decode error")
            return error_body(400, f"the request body is not valid JSON: {why} (at character "
                                   f"{first['loc'][-1]})", param=None)
        msg = "; ".join(f"{field_path(e.get('loc', ())) or 'body'}: {e.get('msg')}" for e in errs[:5])
        return error_body(400, msg, param=field_path(first.get("loc", ())) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_body(exc.status_code, body_error(exc) or str(exc.detail), type_)

    # (the catch-all 500 lives in Gate: a handler registered here would re-raise to uvicorn)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models():
        return admin.models()

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def create_completion(req: CompletionRequest, request: Request):
        return await completions.create(req, request)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse)
    async def create_chat_completion(req: ChatCompletionRequest, request: Request):
        return await chat.create(req, request)

    @app.get("/v1/tasks", response_model=TaskList)
    async def list_tasks():
        return tasks.list()

    @app.get("/v1/tasks/{task}", response_model=TaskInfo)
    async def get_task(task: str):
        return tasks.get(task)

    @app.post("/v1/tasks/{task}", response_model=TaskResult)
    async def run_task(task: str, req: TaskRequest, request: Request):
        return await tasks.run(task, req, request)

    @app.post("/v1/load_lora_adapter", response_model=AdapterStatus)
    async def load_lora_adapter(req: LoadAdapterRequest):
        return await admin.load_adapter(req)

    @app.post("/v1/unload_lora_adapter", response_model=AdapterStatus)
    async def unload_lora_adapter(req: UnloadAdapterRequest):
        return await admin.unload_adapter(req)

    def health_reply(check: str) -> JSONResponse:
        h = admin.health(check)
        return JSONResponse(h.model_dump(), status_code=200 if h.status == "ok" else 503)

    @app.get("/health", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
    async def health():
        """Readiness (as /health/ready): 503 while shutting down or while the engine cannot serve."""
        return health_reply("ready")

    @app.get("/health/ready", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
    async def health_ready():
        return health_reply("ready")

    @app.get("/health/live", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
    async def health_live():
        """Liveness: 503 only when a restart is needed (engine worker dead, model broken)."""
        return health_reply("live")

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
