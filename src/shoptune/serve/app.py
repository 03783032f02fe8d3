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
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoptune.decoding import build_prompts
from shoptune.serve import tasks as task_io
from shoptune.serve.engine import (ADAPTER_NAME_RE, AdapterError, Engine, EngineError, EngineStats,
                                   Job)
from shoptune.serve.protocol import (ChatCompletionRequest, CompletionRequest, LoadAdapterRequest,
                                     TaskRequest, UnloadAdapterRequest, find_invalid_text)
from shoptune.tasks import all_cards

log = logging.getLogger("shoptune.serve")


@dataclass
class ServeSettings:
    api_keys: frozenset[str] = frozenset()
    adapters_dir: Path | None = None
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512  # upper bound a request may ask for
    default_max_tokens: int = 256  # chat requests without max_tokens
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds a client has to send the whole request body
    request_timeout: float = 300.0
    protocol: str = "starter-kit"  # how task prompts are built: as at training/evaluation time
    task_adapters: dict[str, str] = field(default_factory=dict)


def error_body(status: int, message: str, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class Timeout(EngineError):
    status, type, code = 504, "server_error", "timeout"


class NotFound(EngineError):
    status, type, code = 404, "not_found_error", "task_not_found"


class ClientGone(Exception):
    pass


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

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if not auth.lower().startswith("bearer "):
            return False
        given = auth[7:].strip().encode()
        return any(hmac.compare_digest(given, k.encode()) for k in self.settings.api_keys)

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
                        return await error_body(
                            400, f"{bad}: invalid text: a lone UTF-16 surrogate is not a Unicode character",
                            param=bad)(scope, receive, send_wrapper)
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


def _invalid_text(body: bytes) -> str | None:
    """Where a JSON body holds a string that is not Unicode (a lone surrogate such as "\\ud800"),
    as a dotted path (``messages.0.content``); None when it parses cleanly or does not parse (the
    framework's own parser reports that)."""
    if b"\\u" not in body and b"\xed" not in body:  # only as a \u escape or (bytes) as ED A0..BF
        return None
    try:
        return find_invalid_text(json.loads(body))
    except (ValueError, RecursionError):
        return None


# ----------------------------------------------------------------------------- logprobs
def kept_tokens(tok, ids: list[int], text: str) -> int:
    """How many of ``ids`` produced ``text`` (generation cut by a stop string drops the rest)."""
    full = tok.decode(ids, skip_special_tokens=True)
    if len(text) >= len(full):
        return len(ids)
    return sum(1 for k in range(len(ids)) if len(tok.decode(ids[:k], skip_special_tokens=True)) < len(text))


def completion_logprobs(tok, ids: list[int], lps: list, tops: list, start: int = 0) -> dict:
    """OpenAI's ``/v1/completions`` logprobs object for tokens ``ids`` (their text starting at
    character ``start`` of the choice's text); ``lps``/``tops`` may hold None (a prompt's first
    token has no log-probability)."""
    offsets = [start + len(tok.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids))]
    return {"tokens": [tok.decode([t]) for t in ids], "token_logprobs": list(lps),
            "top_logprobs": [None if top is None else {tok.decode([t]): lp for t, lp in top}
                             for top in tops],
            "text_offset": offsets}


def chat_logprobs(tok, ids: list[int], lps: list[float], tops: list, k: int) -> dict:
    """OpenAI's chat ``logprobs`` object: ``content`` entries with ``k`` alternatives each."""
    def entry(t: int, lp: float) -> dict:
        s = tok.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top[:k]]}
                        for t, lp, top in zip(ids, lps, tops)]}


def build_app(engine: Engine, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    metrics = Metrics(engine)
    cards = all_cards()
    tok = engine.tok

    @asynccontextmanager
    async def lifespan(app):
        if hasattr(engine, "start"):  # the gateway engine opens its upstream client on this loop
            await engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # uvicorn has drained the connections by now
        if hasattr(engine, "aclose"):
            await engine.aclose()

    app = FastAPI(title="shoptune", lifespan=lifespan)
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.add_middleware(Gate, settings=settings, metrics=metrics)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(EngineError)
    async def _engine_error(request, exc: EngineError):
        return error_body(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: "
                        f"{e.get('msg')}" for e in errs[:5])
        return error_body(400, msg, param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_body(exc.status_code, str(exc.detail), type_)

    # (the catch-all 500 lives in Gate: a handler registered here would re-raise to uvicorn)

    # ------------------------------------------------------------------ helpers
    def encode(text: str, *, special: bool, param: str) -> list[int]:
        ids = tok.encode(text, add_special_tokens=special)
        if len(ids) > settings.max_prompt_tokens:
            raise EngineError(f"prompt is {len(ids)} tokens; this server takes at most "
                              f"{settings.max_prompt_tokens}", param=param)
        if not ids:
            raise EngineError("prompt is empty", param=param)
        return ids

    def resolve(request: Request, model: str | None) -> str | None:
        """The adapter for ``model``; labels the request's metrics with the resolved name only
        (a client's junk never becomes a Prometheus label value)."""
        adapter = engine.resolve_model(model)
        request.state.model = adapter or engine.base_name
        return adapter

    def check(req, request: Request) -> tuple[str | None, float, float]:
        bad = req.unsupported()
        if bad == ["logprobs"]:
            raise EngineError("logprobs is not supported with stream by this server; ask without "
                              "stream", param="logprobs")
        if bad:
            raise EngineError(f"{bad[0]} is not supported by this server", param=bad[0])
        temperature = 1.0 if req.temperature is None else req.temperature
        return resolve(request, req.model), temperature, 1.0 if req.top_p is None else req.top_p

    def check_fits(sequences: int) -> None:
        """A request bigger than the whole queue can never be served: 400, not 429 "retry later"."""
        limit = engine.max_queue
        if 0 < limit < sequences:
            raise EngineError(f"this request needs {sequences} sequences (prompts x n), which exceeds "
                              f"the server's limit of {limit} queued sequences", param="n")

    def max_tokens(value: int | None, default: int, param: str) -> int:
        value = default if value is None else value
        if value > settings.max_new_tokens:
            raise EngineError(f"{param}={value} is above this server's limit of "
                              f"{settings.max_new_tokens}", param=param)
        return value

    def submit_all(jobs: list[Job]) -> None:
        check_fits(len(jobs))
        try:
            for j in jobs:
                engine.submit(j)
        except EngineError:
            for j in jobs:
                j.cancelled.set()
            raise

    async def wait_all(request: Request, jobs: list[Job]) -> None:
        """Wait for every job; cancel them if the client disconnects or the timeout passes."""
        gathered = asyncio.ensure_future(asyncio.gather(*(engine.complete(j) for j in jobs)))
        deadline = time.monotonic() + settings.request_timeout
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=0.1)
                if done:
                    gathered.result()
                    return
                if await request.is_disconnected():
                    raise ClientGone()
                if time.monotonic() > deadline:
                    raise Timeout(f"request took longer than {settings.request_timeout:.0f} s")
        finally:
            if not gathered.done():
                for j in jobs:
                    j.cancelled.set()
                gathered.cancel()

    async def merged(jobs: list[Job]):
        """(index, kind, value) events of several jobs as they come, kind in delta/done."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job):
            try:
                async for delta in engine.events(job):
                    await q.put((i, "delta", delta))
                await q.put((i, "done", job.finish_reason))
            except Exception as e:  # noqa: BLE001 - reported on the stream
                await q.put((i, "error", e))

        pumps = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        deadline = time.monotonic() + settings.request_timeout
        open_ = len(jobs)
        try:
            while open_:
                try:
                    item = await asyncio.wait_for(q.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise Timeout(f"request took longer than {settings.request_timeout:.0f} s") from None
                if item[1] == "error":
                    raise item[2]
                if item[1] == "done":
                    open_ -= 1
                yield item
        finally:  # client gone, timeout or error: stop the rest
            for j in jobs:
                j.cancelled.set()
            for p in pumps:
                p.cancel()

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(jobs: list[Job], chunk, usage_chunk):
        try:
            async for i, kind, value in merged(jobs):
                yield sse(chunk(i, value if kind == "delta" else None,
                                value if kind == "done" else None))
            if usage_chunk is not None:
                yield sse(usage_chunk())
        except EngineError as e:
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-band
            yield sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                 "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    def stream_response(req, jobs: list[Job], prompts, rid: str, created: int, obj: str, choice):
        """SSE reply: a chunk per delta and per finish (``choice(i, text, finish_reason)`` builds
        the choice), then the usage chunk if ``stream_options.include_usage``, then [DONE]."""
        head = {"id": rid, "object": obj, "created": created, "model": req.model}

        def chunk(i, text, reason):
            return {**head, "choices": [choice(i, text, None if reason is None else finish_reason(jobs[i]))]}

        def usage_chunk():
            return {**head, "choices": [], "usage": usage(jobs, prompts)}
        include = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(stream_events(jobs, chunk, usage_chunk if include else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def usage(jobs: list[Job], prompts: list[list[int]]) -> dict:
        p = sum(len(x) for x in prompts)
        c = sum(len(j.gen_ids) for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def trimmed(job: Job) -> tuple[list[int], list[float], list]:
        n = kept_tokens(tok, job.gen_ids, job.text)
        return job.gen_ids[:n], job.token_logprobs[:n], job.top_logprobs[:n]

    def finish_reason(job: Job) -> str:
        return "length" if job.finish_reason == "length" else "stop"

    # ------------------------------------------------------------------ OpenAI API
    @app.get("/v1/models")
    async def list_models():
        now = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": now, "owned_by": "shoptune",
                 "root": engine.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": now, "owned_by": "shoptune",
                  "root": str(engine.adapters[name]), "parent": engine.base_name}
                 for name in engine.models()[1:]]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter, temperature, top_p = check(req, request)
        p = req.prompt
        check_fits(req.n * (len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1))
        if isinstance(p, str):
            prompts = [encode(p, special=True, param="prompt")]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [encode(x, special=True, param="prompt") for x in p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p:
            prompts = [list(x) for x in p]
        else:
            raise EngineError("prompt is empty", param="prompt")
        for ids in prompts:
            if not ids or len(ids) > settings.max_prompt_tokens or \
                    any(not 0 <= t < len(tok) for t in ids):
                raise EngineError(f"each prompt needs 1..{settings.max_prompt_tokens} valid tokens",
                                  param="prompt")
        limit = max_tokens(req.max_tokens, 16, "max_tokens")
        if limit == 0 and req.stream:
            raise EngineError("max_tokens 0 (prompt logprobs only) needs stream false", param="max_tokens")
        all_prompts = [ids for ids in prompts for _ in range(req.n)]
        # choice k of a seeded request samples with seed + k: reproducible, and the n differ
        jobs = [Job(ids, adapter, max_new_tokens=limit, temperature=temperature, top_p=top_p,
                    stop=req.stops(), logprobs=req.logprobs,
                    seed=None if req.seed is None else req.seed + k)
                for ids in prompts for k in range(req.n)] if limit > 0 else []
        scored = [Job(ids, adapter, kind="score", logprobs=req.logprobs) for ids in prompts] \
            if req.echo and req.logprobs is not None else []
        submit_all(scored + jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if isinstance(p, str):
            echoed = [p]
        elif p and all(isinstance(x, str) for x in p):
            echoed = list(p)
        else:
            echoed = [tok.decode(ids) for ids in prompts]
        echoed = [echoed[i // req.n] if req.echo else "" for i in range(len(all_prompts))]
        if req.stream:
            started = set()

            def choice(i, text, reason):
                if i not in started:  # the echoed prompt leads the first chunk
                    started.add(i)
                    text = echoed[i] + (text or "")
                return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return stream_response(req, jobs, all_prompts, rid, created, "text_completion", choice)
        try:
            await wait_all(request, scored + jobs)
        except ClientGone:
            return Response(status_code=499)

        def logprobs(i: int) -> dict | None:
            if req.logprobs is None:
                return None
            parts = []  # (ids, logprobs, alternatives, where their text starts in the choice's)
            if scored:  # the echoed prompt; its first token has no log-probability
                sj = scored[i // req.n]
                parts.append((sj.prompt_ids, [None, *sj.token_logprobs], [None, *sj.top_logprobs], 0))
            if jobs:
                j = jobs[i]
                n = kept_tokens(tok, j.gen_ids, j.text)
                parts.append((j.gen_ids[:n], j.token_logprobs[:n], j.top_logprobs[:n], len(echoed[i])))
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for part in parts:
                for key, values in completion_logprobs(tok, *part).items():
                    out[key] += values
            return out

        choices = [{"index": i, "text": echoed[i] + (jobs[i].text if jobs else ""),
                    "logprobs": logprobs(i),
                    "finish_reason": finish_reason(jobs[i]) if jobs else "length"}
                   for i in range(len(all_prompts))]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(jobs, all_prompts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        adapter, temperature, top_p = check(req, request)
        check_fits(req.n)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the client's
            raise EngineError(f"cannot apply the chat template: {e}", param="messages") from e
        ids = encode(text, special=False, param="messages")
        limit = max_tokens(req.max_completion_tokens or req.max_tokens, settings.default_max_tokens,
                           "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        jobs = [Job(ids, adapter, max_new_tokens=limit, temperature=temperature, top_p=top_p,
                    stop=req.stops(), logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                    seed=None if req.seed is None else req.seed + k) for k in range(req.n)]
        submit_all(jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompts = [ids] * req.n
        if req.stream:
            started = set()

            def choice(i, text, reason):
                delta = {} if reason is not None else {"content": text}
                if i not in started:  # the first chunk of each choice carries the role
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return stream_response(req, jobs, prompts, rid, created, "chat.completion.chunk", choice)
        try:
            await wait_all(request, jobs)
        except ClientGone:
            return Response(status_code=499)
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": i, "message": {"role": "assistant", "content": j.text},
                             "logprobs": chat_logprobs(tok, *trimmed(j), req.top_logprobs or 0)
                             if req.logprobs else None,
                             "finish_reason": finish_reason(j)}
                            for i, j in enumerate(jobs)],
                "usage": usage(jobs, prompts)}

    # ------------------------------------------------------------------ task endpoint
    def task_info(card) -> dict:
        return {"id": card.name, "object": "task", "capability": card.capability,
                "task_type": card.task_type, "metric": card.metric, "description": card.description,
                "adapter": settings.task_adapters.get(card.name) or
                (card.name if card.name in engine.adapters else None),
                "input_schema": task_io.input_model(card).model_json_schema()}

    def card_or_404(task: str):
        if task not in cards:
            raise NotFound(f"unknown task {task!r}; GET /v1/tasks lists them", param="task")
        return cards[task]

    @app.get("/v1/tasks")
    async def list_tasks():
        return {"object": "list", "protocol": settings.protocol,
                "data": [task_info(c) for c in cards.values()]}

    @app.get("/v1/tasks/{task}")
    async def get_task(task: str):
        return task_info(card_or_404(task))

    @app.post("/v1/tasks/{task}")
    async def run_task(task: str, req: TaskRequest, request: Request):
        card = card_or_404(task)
        model = req.model or settings.task_adapters.get(task) or \
            (task if task in engine.adapters and task not in engine.draining else engine.base_name)
        adapter = resolve(request, model)
        try:
            inp = task_io.input_model(card).model_validate(req.input)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in ("input", *first.get("loc", ())))
            raise EngineError(f"{loc}: {first['msg']} (task {task} takes: "
                              f"{', '.join(task_io.input_model(card).model_fields)})", param=loc) from None
        rec = task_io.to_record(card, inp)
        plan = task_io.plan(card, inp, rec)
        prompt = build_prompts([rec], settings.protocol, tok,
                               render=lambda r: card.render(r.input_field))[0]
        ids = encode(prompt, special=False, param="input")
        job = (Job(ids, adapter, kind="choice", choices=plan.choices) if plan.kind == "choice" else
               Job(ids, adapter, max_new_tokens=plan.max_new_tokens, temperature=0.0, plan=plan))
        submit_all([job])
        try:
            await wait_all(request, [job])
        except ClientGone:
            return Response(status_code=499)
        return {"id": f"task-{uuid.uuid4().hex}", "object": "task.result", "task": card.name,
                "task_type": card.task_type, "metric": card.metric, "model": model,
                **task_io.answer(card, inp, job.text, plan),
                "usage": usage([job], [ids])}

    # ------------------------------------------------------------------ admin
    def adapter_path(name: str, given: str | None) -> Path:
        root = settings.adapters_dir
        if root is None:
            raise EngineError("runtime adapter loading is off: start the server with --adapters-dir",
                              param="lora_path")
        if not ADAPTER_NAME_RE.match(name):
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-'",
                               param="lora_name")
        if "\x00" in (given or ""):
            raise AdapterError("lora_path contains a NUL byte", param="lora_path")
        root = root.resolve()
        path = Path(given) if given else Path(name)
        try:
            full = (path if path.is_absolute() else root / path).resolve()
        except (OSError, ValueError) as e:
            raise AdapterError(f"lora_path {given or name!r}: {e}", param="lora_path") from None
        if full == root or not full.is_relative_to(root):
            raise AdapterError(f"lora_path {given or name!r} is outside the adapters folder",
                               param="lora_path")
        return full

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadAdapterRequest):
        path = adapter_path(req.lora_name, req.lora_path)
        await asyncio.to_thread(engine.load_adapter, req.lora_name, path)
        return {"status": "ok", "lora_name": req.lora_name, "models": engine.models()}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadAdapterRequest):
        await engine.unload_adapter(req.lora_name)
        return {"status": "ok", "lora_name": req.lora_name, "models": engine.models()}

    # ------------------------------------------------------------------ ops
    def health_reply(check: str) -> JSONResponse:
        h = engine.health()
        ok = h[check]
        body = {"status": "ok" if ok else "unavailable", "live": h["live"], "ready": h["ready"],
                "reason": h["reason"], "model": engine.base_name, "adapters": engine.models()[1:],
                "queue_depth": engine.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/health")
    async def health():
        """Readiness (as /health/ready): 503 while shutting down or while the engine cannot serve."""
        return health_reply("ready")

    @app.get("/health/ready")
    async def health_ready():
        return health_reply("ready")

    @app.get("/health/live")
    async def health_live():
        """Liveness: 503 only when a restart is needed (engine worker dead, model state broken)."""
        return health_reply("live")

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
