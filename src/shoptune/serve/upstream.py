"""Gateway engine: shoptune's API in front of another OpenAI-compatible engine.

``shoptune serve --upstream URL`` keeps everything shoptune adds (task cards and the task
endpoint, auth, limits, metrics, adapter names, prompts built and tokenized exactly as by the
built-in engine) and leaves the decoding to a production engine: vLLM on GPUs, llama.cpp's
``llama-server`` on CPUs, another ``shoptune serve`` (kind "shoptune": it lists its adapters like
vLLM and answers ``/v1/tasks`` with its ``protocol``), or any OpenAI-compatible server.

:class:`UpstreamEngine` has the interface :func:`shoptune.serve.app.build_app` uses of the
built-in :class:`~shoptune.serve.engine.Engine` (submit jobs, stream their events, adapters,
health). Each job becomes one ``POST /v1/completions`` upstream with the prompt as *token ids*
(the gateway tokenizes and applies the chat template, so prompts are identical across engines):

* adapter: vLLM takes the adapter's name as ``model``; llama.cpp takes ``lora``, a scale for each
  adapter it loaded (1 for the chosen one, 0 for the others, all 0 for the base model);
* multiple choice (``kind="choice"``): one token at temperature 0 with a ``logit_bias`` of +100 on
  every valid option token: the upstream's argmax is then the best valid option, which is what
  the built-in engine's :func:`~shoptune.eval.backends.best_choice` picks;
* number lists (retrieval, ranking): a GBNF grammar (llama.cpp) or a regex in vLLM's
  ``structured_outputs``, both allowing exactly the strings the built-in
  :class:`~shoptune.eval.backends.NumberListProcessor` allows; a shoptune upstream gets the plan
  itself (``shoptune_plan``: its engine applies the constraint and the line-end stop exactly as
  its task endpoint does); a plain OpenAI server has none of these, so there the list is not
  constrained (said at start-up);
* a client's own ``logit_bias`` is passed on to every kind (all of them take OpenAI's);
* single-line answers: the response is streamed and read only until a line end follows some
  text (then the connection is closed, which stops the upstream's generation), as the built-in
  engine stops such rows.

Adapter load/unload map to vLLM's ``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``;
llama-server cannot load adapter files at run time, so there only adapters it was started with
(``--lora FILE``) can be (re-)exposed or hidden, and other loads get a 501 saying so.
Upstream errors come back in OpenAI's shape with a clear status: the upstream's own 4xx message,
502 for its 5xx or a refused upstream key, 503 when it is unreachable, 504 on its timeout. Replies
are bounded and checked (:mod:`~shoptune.serve.upstream_wire`): a reply that cannot be trusted
(not JSON of OpenAI's shape, not an event stream, a stream cut before ``[DONE]`` or a
``finish_reason``, more than ``max_tokens`` tokens, more than ``max_reply_bytes``) is a 502, and
upstream text is redacted (its key, ``Bearer`` tokens) before it reaches a client or the log.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePath

import httpx

from shoptune.decoding import choice_tokens  # (choice_tokens: the tokens best_choice compares)
from shoptune.serve.engine import (ADAPTER_NAME_RE, BASE, AdapterError, EngineError, EngineStats, JobStream,
                                   Job, QueueFull, ShuttingDown, UnknownModel)
from shoptune.tasks import Grammar, Plan
from shoptune.serve.upstream_wire import (ERROR_BODY_BYTES, NO_COMPRESSION, NotSupported, Reply,
                                          UpstreamError, aread_capped, bad_reply, describe,
                                          describe_bytes, error_message, error_text, finish_reason,
                                          number_list_gbnf, number_list_regex, read_capped, redact,
                                          register_secret, sse_lines, stream_event, transport_error,
                                          upstream_error)

__all__ = ["UpstreamEngine", "UpstreamError", "NotSupported", "choice_tokens", "number_list_gbnf",
           "number_list_regex"]
log = logging.getLogger("shoptune.serve")
KINDS = ("auto", "vllm", "llama.cpp", "shoptune", "openai")
CHOICE_BIAS = 100.0  # logit_bias for valid option tokens (OpenAI's and vLLM's maximum)
MAX_REPLY_BYTES = 8 << 20  # default --upstream-max-bytes: one reply body, or one whole stream


@functools.lru_cache(maxsize=256)
def constraint(kind: str, max_value: int, count: int, unique: bool) -> tuple[str, object] | None:
    """The upstream body field that constrains a number list: ("grammar", GBNF) for llama.cpp,
    ("structured_outputs", {"regex": ...}) for vLLM, None for a plain OpenAI server. A few
    kilobytes at most (see :mod:`~shoptune.serve.upstream_wire`): built on the event loop."""
    if kind == "llama.cpp":
        return "grammar", number_list_gbnf(max_value, count, unique)
    if kind == "vllm":
        return "structured_outputs", {"regex": number_list_regex(max_value, count, unique)}
    return None


def grammar_constraint(kind: str, g: Grammar) -> tuple[str, object] | None:
    """The upstream body field for an own task's answer constraint, the same GBNF text the
    built-in engine compiles: llama.cpp's ``grammar``, vLLM's ``structured_outputs.grammar`` (its
    llguidance backend: ``serve --engine vllm`` starts vLLM with it); None for a plain OpenAI
    server."""
    if kind == "llama.cpp":
        return "grammar", g.gbnf
    if kind == "vllm":
        return "structured_outputs", {"grammar": g.gbnf}
    return None


def shoptune_plan(plan: Plan) -> dict:
    """A plan as the ``shoptune_plan`` field of a shoptune upstream's ``/v1/completions`` (its
    token limit goes as ``max_tokens``)."""
    out = {"kind": "generate", "numeric": plan.numeric, "max_value": plan.max_value,
           "count": plan.count, "unique": plan.unique, "values": list(plan.values),
           "stop_newline": plan.stop_newline}
    if plan.grammar is not None:
        out["grammar"] = plan.grammar.gbnf
    return out


# ----------------------------------------------------------------------------- the engine

@dataclass
class _Adapter:
    ref: str  # what the upstream calls it: vLLM's lora name, llama.cpp's adapter file path
    lora_id: int | None = None  # llama.cpp's adapter id


def _root(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


class UpstreamEngine(JobStream):
    """Jobs answered by an OpenAI-compatible engine over HTTP (see the module docstring).

    ``adapters`` maps the names served by the gateway to the upstream's own references (vLLM
    lora name; llama.cpp adapter path, file name, stem or id); without it every adapter the
    upstream has loaded is served under its own name (llama.cpp: the file stem).
    """

    def __init__(self, url: str, tokenizer, *, base_name: str, kind: str = "auto",
                 api_key: str | None = None, adapters: dict[str, str] | None = None,
                 max_concurrency: int = 64, max_queue: int = 256, timeout: float = 600.0,
                 upstream_model: str | None = None, health_interval: float = 2.0,
                 max_reply_bytes: int = MAX_REPLY_BYTES):
        if kind not in KINDS:
            raise ValueError(f"--upstream-kind {kind!r}: one of {', '.join(KINDS)}")
        self.url, self.root = url, _root(url)
        self.tok, self.base_name = tokenizer, base_name
        register_secret(api_key)  # never echoed back: redacted from any upstream text
        self.headers = {**NO_COMPRESSION, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.timeout, self.max_reply_bytes = timeout, max_reply_bytes
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.health_interval = health_interval
        self.adapters: dict[str, str] = {}  # served name -> shown path/ref (as Engine.adapters)
        self._lora: dict[str, _Adapter] = {}
        self.draining: set[str] = set()
        self.pending: Counter[str] = Counter()
        self.running = 0
        self._waiting = 0
        self._stopping = False
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self._admin_lock = threading.Lock()
        self.stats = EngineStats()
        self._sem: asyncio.Semaphore | None = None
        self._client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.upstream_error: str | None = None  # the last health check's failure
        self.all_lora_ids: list[int] = []
        self._hidden: dict[str, _Adapter] = {}  # llama.cpp adapters unloaded from the gateway (still held)
        self.on_close: list = []  # called (in a thread) at shutdown, e.g. stopping a supervised upstream
        # called with (name, folder) / (name) after a run-time load / unload upstream, e.g. so a
        # supervised vLLM restarts with the adapters it had
        self.on_load: list = []
        self.on_unload: list = []
        self.before_load: list = []  # (name, folder) -> raise AdapterError to refuse a run-time load
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        self.upstream_protocol: str | None = None  # a shoptune upstream's task prompt protocol
        self.kind, self.upstream_model = self._discover(kind, upstream_model)
        for name, ref in (adapters or {}).items():
            self._alias(name, ref)
        if self.kind == "openai":
            log.warning("upstream %s is a plain OpenAI-compatible server: adapters cannot be "
                        "loaded there, number lists are not constrained", self.url)
        elif self.kind == "shoptune":
            log.info("upstream %s is a shoptune server (task prompts: %s); task constraints go as "
                     "shoptune_plan", self.url, self.upstream_protocol)

    # ------------------------------------------------------------------ discovery
    def _call(self, client: httpx.Client, method: str, path: str, **kw) -> Reply:
        """One blocking request; the reply read whole up to ``max_reply_bytes`` (errors: their
        first kilobytes)."""
        url = self.root + path
        try:
            with client.stream(method, url, headers=self.headers, **kw) as r:
                ok = r.status_code < 400
                body = read_capped(r, self.max_reply_bytes if ok else ERROR_BODY_BYTES, url, truncate=not ok)
                return Reply(r.status_code, body, r.headers.get("content-type", ""), r.reason_phrase)
        except httpx.HTTPError as e:
            raise transport_error(e, url) from None

    def _discover(self, kind: str, upstream_model: str | None) -> tuple[str, str]:
        """Detect the engine kind, the upstream's base model id and its adapters."""
        what = f"{self.root}/v1/models"
        with httpx.Client(timeout=30) as client:
            r = self._call(client, "GET", "/v1/models")
            if r.status >= 400:
                raise upstream_error(r, "engine")
            models = r.json(what).get("data")
            if not isinstance(models, list) or not all(
                    isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
                raise bad_reply(what, "not an OpenAI model list ({\"data\": [{\"id\": ...}, ...]}); "
                                      f"its data is {describe(models)}")
            loras = None
            if kind in ("auto", "llama.cpp"):
                lr = self._call(client, "GET", "/lora-adapters")
                listed = lr.json(f"{self.root}/lora-adapters", list) if lr.status == 200 and \
                    lr.body.lstrip().startswith(b"[") else None
                if listed is not None:
                    if not all(isinstance(a, dict) and isinstance(a.get("id"), int) for a in listed):
                        raise bad_reply(f"{self.root}/lora-adapters", "not llama-server's adapter list "
                                        "([{\"id\": 0, \"path\": ...}, ...])")
                    loras, kind = listed, "llama.cpp"
                elif kind == "llama.cpp":
                    raise upstream_error(lr, "llama.cpp") if lr.status >= 400 else \
                        UpstreamError(f"{self.root}/lora-adapters is not llama-server's adapter list")
            if kind == "auto":
                kind = "vllm" if any(m.get("owned_by") == "vllm" for m in models) else \
                    "shoptune" if any(m.get("owned_by") == "shoptune" for m in models) and \
                    self._shoptune_tasks(client, required=False) else "openai"
            elif kind == "shoptune":
                self._shoptune_tasks(client, required=True)
        bases = [m for m in models if not m.get("parent")]
        base = upstream_model or (bases or models or [{"id": self.base_name}])[0]["id"]
        if kind == "llama.cpp":
            self.all_lora_ids = [int(a["id"]) for a in loras]
            for a in loras:
                name = PurePath(a.get("path") or f"lora{a['id']}").name.removesuffix(".gguf")
                self._add(name, _Adapter(a.get("path") or str(a["id"]), int(a["id"])))
        elif kind in ("vllm", "shoptune"):
            for m in models:
                if m.get("parent"):
                    self._add(m["id"], _Adapter(m["id"]))
        return kind, base

    def _shoptune_tasks(self, client: httpx.Client, *, required: bool) -> bool:
        """Whether the upstream is a shoptune server: its ``GET /v1/tasks`` is a task list with
        the ``protocol`` it builds task prompts with (kept in ``upstream_protocol``). With
        ``required`` (``--upstream-kind shoptune``) anything else raises."""
        what = f"{self.root}/v1/tasks"
        try:
            r = self._call(client, "GET", "/v1/tasks")
            listing = r.json(what) if r.status == 200 else None
        except UpstreamError:
            if required:
                raise
            listing = None
        ok = isinstance(listing, dict) and isinstance(listing.get("protocol"), str) \
            and isinstance(listing.get("data"), list)
        if ok:
            self.upstream_protocol = listing["protocol"]
        elif required:
            raise UpstreamError(f"{what} is not a shoptune task list ({{\"protocol\": ..., \"data\": "
                                f"[...]}}; it answered {r.status}): is the upstream `shoptune serve`?")
        return ok

    def _add(self, name: str, adapter: _Adapter) -> None:
        if not ADAPTER_NAME_RE.match(name) or name in (BASE, self.base_name):
            log.warning("upstream adapter %r is not a valid served name; give it one with "
                        "--adapter NAME=%s", name, adapter.ref)
            return
        self._lora[name] = adapter
        self.adapters[name] = adapter.ref

    def _find(self, ref: str) -> tuple[str, _Adapter] | None:
        for name, a in self._lora.items():
            p = PurePath(a.ref)
            if ref in (name, a.ref, p.name, p.name.removesuffix(".gguf"), str(a.lora_id)):
                return name, a
        return None

    def _alias(self, name: str, ref: str) -> None:
        """``--adapter NAME=REF``: serve the upstream's adapter REF as NAME."""
        found = self._find(ref)
        if found is None:
            have = ", ".join(f"{n} ({a.ref})" for n, a in self._lora.items()) or "none"
            raise AdapterError(f"--adapter {name}={ref}: the upstream {self.kind} has no such "
                               f"adapter (it has: {have})", param="adapter")
        old, a = found
        if old != name:
            del self._lora[old], self.adapters[old]
        self._add(name, a)

    # ------------------------------------------------------------------ adapters
    def models(self) -> list[str]:
        return [self.base_name] + [n for n in self.adapters if n not in self.draining]

    def resolve_model(self, model: str | None) -> str | None:
        if model in (None, "", self.base_name):
            return None
        if model in self.adapters and model not in self.draining:
            return model
        shown = model if len(model) <= 100 else f"{model[:100]}... ({len(model)} characters)"
        raise UnknownModel(f"The model `{shown}` does not exist. Available: {', '.join(self.models())}",
                           param="model")

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Blocking (the app calls it in a thread). vLLM: its /v1/load_lora_adapter with the
        folder's path (which must be the same on the upstream's machine); llama.cpp: only an
        adapter llama-server already holds (e.g. one unloaded before) can be served again."""
        if not ADAPTER_NAME_RE.match(name) or name in (BASE, self.base_name):
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-'",
                               param="lora_name")
        with self._admin_lock:
            if name in self.adapters or name in self.draining:
                raise AdapterError(f"adapter {name!r} is already loaded", param="lora_name")
            if self.kind in ("vllm", "shoptune"):  # (the same endpoints; the path as the upstream sees it)
                for check in self.before_load:  # e.g. a supervised vLLM's rank limit: a clear 400
                    check(name, str(path))
                with httpx.Client(timeout=self.timeout) as client:
                    r = self._call(client, "POST", "/v1/load_lora_adapter",
                                   json={"lora_name": name, "lora_path": str(path)})
                if r.status >= 400:
                    err = upstream_error(r, self.kind)
                    if r.status == 404 and self.kind == "vllm":  # without VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
                        raise NotSupported(f"{err.message} (start vLLM with "
                                           "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")
                    raise err
                self._add(name, _Adapter(name))
                for hook in self.on_load:
                    hook(name, str(path))
            elif self.kind == "llama.cpp":
                held = self._held(Path(path))
                if held is None:
                    raise NotSupported(
                        f"llama-server cannot load adapters at run time; start it with "
                        f"--lora {Path(path).name}.gguf (see `shoptune export gguf`); it holds: "
                        f"{', '.join(self._held_paths) or 'none'}", param="lora_path")
                self._add(name, held)
            else:
                raise NotSupported("the upstream is a plain OpenAI-compatible server: it has no "
                                   "adapter loading", param="lora_name")
        log.info("serving upstream adapter %s as %s", self.adapters[name], name)

    @property
    def _held_paths(self) -> list[str]:
        return [a.ref for a in self._hidden.values()]

    def _held(self, path: Path) -> _Adapter | None:
        for key, a in list(self._hidden.items()):
            p = PurePath(a.ref)
            if path.name in (p.name, p.name.removesuffix(".gguf")) or str(path) == a.ref:
                del self._hidden[key]
                return a
        return None

    def begin_unload(self, name: str) -> None:
        if name not in self.adapters or name in self.draining:
            raise UnknownModel(f"adapter {name!r} is not loaded", param="lora_name")
        self.draining.add(name)

    def finish_unload(self, name: str) -> None:
        with self._admin_lock:
            a = self._lora[name]
            if self.kind in ("vllm", "shoptune"):
                try:
                    with httpx.Client(timeout=self.timeout) as client:
                        r = self._call(client, "POST", "/v1/unload_lora_adapter", json={"lora_name": a.ref})
                except UpstreamError:
                    self.draining.discard(name)
                    raise
                if r.status >= 400:
                    self.draining.discard(name)
                    raise upstream_error(r, self.kind)
            elif self.kind == "llama.cpp":  # llama-server keeps it in memory; the gateway hides it
                self._hidden[name] = a
            del self._lora[name], self.adapters[name]
            for hook in self.on_unload:
                hook(name)
            self.draining.discard(name)
        log.info("unloaded adapter %s", name)

    async def unload_adapter(self, name: str, timeout: float = 600.0) -> None:
        if self.kind == "openai":
            raise NotSupported("the upstream is a plain OpenAI-compatible server: it has no "
                               "adapter unloading", param="lora_name")
        self.begin_unload(name)
        deadline = time.monotonic() + timeout
        while self.pending[name] > 0:
            if time.monotonic() > deadline:
                self.draining.discard(name)
                raise EngineError(f"adapter {name!r} still busy after {timeout:.0f} s; not unloaded")
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self.finish_unload, name)

    # ------------------------------------------------------------------ requests
    def payload(self, job: Job) -> dict:
        """The upstream ``/v1/completions`` body for one job."""
        a = self._lora.get(job.model) if job.model else None
        body: dict = {"model": a.ref if (a and self.kind != "llama.cpp") else self.upstream_model,
                      "prompt": list(job.prompt_ids), "temperature": job.temperature,
                      "top_p": job.top_p}
        if self.kind == "llama.cpp":
            if self.all_lora_ids:  # every adapter's scale explicit: [] would mean "the defaults"
                body["lora"] = [{"id": i, "scale": 1.0 if a and i == a.lora_id else 0.0}
                                for i in self.all_lora_ids]
            body.update(top_k=0, min_p=0.0, cache_prompt=True)  # plain OpenAI sampling
        if job.kind == "choice":
            body.update(max_tokens=1, temperature=0.0, logprobs=5, stream=False,
                        logit_bias={str(t): CHOICE_BIAS for t in choice_tokens(self.tok, job.choices)})
            return body
        body.update(max_tokens=job.max_new_tokens, stream=True)
        if job.seed is not None:  # vLLM and llama-server both take a per-request seed
            body["seed"] = job.seed
        if self.kind in ("vllm", "shoptune", "openai"):
            body["stream_options"] = {"include_usage": True}
        if job.stop:
            body["stop"] = list(job.stop)
        if job.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in job.logit_bias.items()}
        plan = job.plan
        if plan is not None and self.kind == "shoptune":  # its engine applies the plan itself
            body["shoptune_plan"] = shoptune_plan(plan)
        elif plan is not None and plan.numeric:
            field = constraint(self.kind, plan.max_value, plan.count, plan.unique)
            if field is not None:
                body[field[0]] = field[1]
        elif plan is not None and plan.grammar is not None:
            field = grammar_constraint(self.kind, plan.grammar)
            if field is not None:
                body[field[0]] = field[1]
        return body

    def submit(self, job: Job) -> Job:
        if self._stopping:
            raise ShuttingDown("server is shutting down")
        if job.model is not None and (job.model not in self.adapters or job.model in self.draining):
            raise UnknownModel(f"The model `{job.model}` does not exist", param="model")
        if job.kind == "score" or job.logprobs is not None:
            raise NotSupported("logprobs and echo are not passed through the gateway yet; ask the "
                               f"upstream {self.kind} engine directly", param="logprobs")
        if job.plan is not None and job.plan.numeric:  # (a 400 now rather than after the queue)
            constraint(self.kind, job.plan.max_value, job.plan.count, job.plan.unique)
        if self._waiting >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); retry later")
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        job.enqueued = time.monotonic()
        self._ensure_started()
        self.pending[job.model or BASE] += 1
        with self._inflight_lock:
            self._inflight += 1
        self._waiting += 1
        asyncio.ensure_future(self._run(job))
        return job

    async def _run(self, job: Job) -> None:
        waiting = True
        try:
            async with self._sem:
                self._waiting -= 1
                waiting = False
                if job.cancelled.is_set():
                    job.done("cancelled")
                    return
                self.running += 1
                try:
                    work = asyncio.ensure_future(self._choose(job) if job.kind == "choice"
                                                 else self._generate(job))
                    while not work.done():  # the app flags cancellation on a threading.Event
                        await asyncio.wait({work}, timeout=0.05)
                        if job.cancelled.is_set() and not work.done():
                            work.cancel()
                            await asyncio.gather(work, return_exceptions=True)
                            job.done("cancelled")
                            return
                    work.result()
                finally:
                    self.running -= 1
        except EngineError as e:
            job.fail(e)
        except Exception as e:  # noqa: BLE001 - every failure reaches the client in OpenAI's shape
            log.exception("upstream request failed")
            job.fail(UpstreamError(f"upstream request failed: {type(e).__name__}: {e}"))
        finally:
            if waiting:
                self._waiting -= 1
            self.pending[job.model or BASE] -= 1
            with self._inflight_lock:
                self._inflight -= 1
            if self.stats.on_tokens and job.finish_reason not in (None, "error"):
                self.stats.on_tokens(job.model or self.base_name, len(job.prompt_ids),
                                     len(job.gen_ids))

    async def _reply(self, r: httpx.Response, what: str) -> Reply:
        ok = r.status_code < 400
        body = await aread_capped(r, self.max_reply_bytes if ok else ERROR_BODY_BYTES, what, truncate=not ok)
        return Reply(r.status_code, body, r.headers.get("content-type", ""), r.reason_phrase)

    async def _post(self, body: dict, what: str) -> dict:
        """A non-streamed completion: its reply (at most ``max_reply_bytes``) as a JSON object."""
        try:
            async with self._client.stream("POST", self.root + "/v1/completions", json=body,
                                           headers=self.headers) as r:
                reply = await self._reply(r, what)
        except httpx.HTTPError as e:
            raise transport_error(e, self.root) from None
        if reply.status >= 400:
            raise upstream_error(reply, self.kind)
        out = reply.json(what)
        if "error" in out:
            raise UpstreamError(f"{what} failed: {error_text(out['error'])}")
        self.upstream_error = None
        return out

    async def _choose(self, job: Job) -> None:
        valid = choice_tokens(self.tok, job.choices)
        what = f"upstream {self.kind} completion"
        out = await self._post(self.payload(job), what)
        choices = out.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)
                and isinstance(choices[0].get("text"), str)):
            raise bad_reply(what, "the upstream's 200 reply is not an OpenAI completion (no "
                                  f"choices[0].text; choices is {describe(choices)})")
        job.text = self._match_choice(choices[0]["text"], valid, job.choices)
        job.gen_ids = [0]
        job.emit(len(job.text))
        job.done("stop")

    def _match_choice(self, text: str, valid: dict[int, str], choices) -> str:
        """The option the upstream's one token stands for (its text is one of the valid tokens)."""
        for t, c in valid.items():
            if self.tok.decode([t]) == text:
                return c
        for c in choices:  # a different detokenization of the same token
            if text.strip().lower() == c.lower() or text.strip().lower().startswith(c.lower()):
                return c
        raise UpstreamError(f"the upstream answered {text[:100]!r}, not one of the options "
                            f"{list(choices)} (does it honour logit_bias?)")

    async def _generate(self, job: Job) -> None:
        """A streamed completion, read event by event. Complete only with ``[DONE]`` or a
        ``finish_reason`` (or at the line end the plan stops at); anything else is a 502:
        a reply that is not an event stream, an event that is not a JSON object of OpenAI's
        shape, a stream cut short, more than ``max_tokens`` tokens, more than
        ``max_reply_bytes`` bytes. Deltas already streamed to the client stay sent; the app
        then ends the client's stream with an error event and ``[DONE]``."""
        body = self.payload(job)
        plan, reason, usage, ended = job.plan, None, None, False
        what = f"upstream {self.kind} stream"
        max_deltas, max_events = job.max_new_tokens + 8, 2 * job.max_new_tokens + 64
        deltas = events = 0
        try:
            async with self._client.stream("POST", self.root + "/v1/completions", json=body,
                                           headers=self.headers) as r:
                ctype = r.headers.get("content-type", "")
                if r.status_code >= 400:
                    raise upstream_error(await self._reply(r, what), self.kind)
                if not ctype.startswith("text/event-stream"):
                    head = await aread_capped(r, ERROR_BODY_BYTES, what, truncate=True)
                    raise bad_reply(what, f"the upstream answered {r.status_code} with "
                                          f"{ctype or 'no content type'}, not an event stream "
                                          f"({describe_bytes(head)})")
                self.upstream_error = None
                async for line in sse_lines(r, self.max_reply_bytes, what):
                    if not line.startswith("data:"):
                        continue  # (comments, event names, keep-alive pings)
                    data = line[5:].strip()
                    if data == "[DONE]":
                        ended = True
                        break
                    events += 1
                    if events > max_events:
                        raise bad_reply(what, f"more than {max_events} events for max_tokens="
                                              f"{job.max_new_tokens}")
                    choices, usage = stream_event(data, what, self.kind, usage)
                    for ch in choices:
                        delta = ch.get("text") or ""
                        if delta:
                            deltas += 1
                            if deltas > max_deltas:
                                raise bad_reply(what, f"more than max_tokens={job.max_new_tokens} "
                                                      "tokens (the upstream ignores max_tokens)")
                            job.gen_ids.append(0)  # (a chunk per token; usage corrects it below)
                            job.text += delta
                            job.emit(len(job.text))
                        if ch.get("finish_reason"):
                            reason = finish_reason(ch["finish_reason"], what)
                    if plan is not None and plan.stop_newline and "\n" in job.text.lstrip():
                        ended = True
                        break  # as the built-in engine: the first line is the answer; closing stops it
        except httpx.HTTPError as e:
            raise transport_error(e, self.root) from None
        if not ended and reason is None:
            raise bad_reply(what, f"the stream ended without [DONE] or a finish_reason, after "
                                  f"{len(job.text)} characters (cut short)")
        tokens = (usage or {}).get("completion_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool) and 0 < tokens <= max_deltas:
            job.gen_ids = [0] * tokens  # (the app counts this list)
        job.done(reason or "stop")

    # ------------------------------------------------------------------ lifecycle, health
    def _ensure_started(self) -> None:
        if self._client is None:
            self._loop = asyncio.get_running_loop()
            limits = httpx.Limits(max_connections=self.max_concurrency + 8,
                                  max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=10.0),
                                             limits=limits)
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._poller = asyncio.ensure_future(self._poll_health())

    async def start(self) -> None:
        self._ensure_started()

    async def _poll_health(self) -> None:
        path = "/v1/models" if self.kind == "openai" else "/health"
        while not self._stopping:
            try:
                async with self._client.stream("GET", self.root + path, headers=self.headers,
                                               timeout=10) as r:
                    reply = Reply(r.status_code, await aread_capped(r, ERROR_BODY_BYTES, path, truncate=True),
                                  r.headers.get("content-type", ""), r.reason_phrase)
                error = None if reply.status < 400 else \
                    f"upstream {self.root}{path} answered {reply.status}: {error_message(reply)}"
            except httpx.HTTPError as e:
                error = f"upstream {self.root} unreachable: {type(e).__name__}: {e}"
            except Exception as e:  # noqa: BLE001 - the poller must outlive any one odd reply
                error = f"upstream {self.root}{path}: {type(e).__name__}: {e}"
            self._set_health(error)
            await asyncio.sleep(self.health_interval)

    def _set_health(self, error: str | None) -> None:
        """Record the health check's result; log only its changes (not every poll)."""
        error = redact(error) if error else None
        if error != self.upstream_error:
            if error is None:
                log.info("upstream %s is ready", self.root)
            else:
                log.warning("upstream not ready: %s", error)
        self.upstream_error = error

    def health(self) -> dict:
        """Live while the gateway runs (restarting it cannot fix its upstream); ready while the
        upstream answers its health check."""
        reason = "shutting down" if self._stopping else self.upstream_error
        return {"live": True, "ready": reason is None, "reason": reason}

    def stop(self, timeout: float = 60.0) -> None:
        """Refuse new jobs, wait for the running ones (called from a thread at shutdown)."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)

    async def aclose(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._client is not None:
            await self._client.aclose()
        for close in self.on_close:
            await asyncio.to_thread(close)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def dead(self) -> str | None:
        return None
