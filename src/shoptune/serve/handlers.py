"""Request handlers of the OpenAI-compatible server, one class per API area (vLLM's
``serving_completion`` / ``serving_chat`` shape): :class:`Completions`, :class:`Chat`,
:class:`Tasks` and :class:`Admin`.

Each takes the engine and the :class:`ServeSettings`, and is called with a parsed request model
from :mod:`shoptune.serve.protocol` and the caller (anything with ``state`` and ``async
is_disconnected()``: Starlette's ``Request`` in the app, a stand-in in unit tests). It returns a
response model, a ``StreamingResponse`` (``stream: true``) or a bare 499 when the client went
away; errors are raised as :class:`~shoptune.serve.engine.EngineError` with the request field
they concern. :mod:`shoptune.serve.app` only routes HTTP to them.
"""
from __future__ import annotations

import asyncio
import difflib
import functools
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Protocol

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from shoptune.decoding import build_prompts
from shoptune.serve import tasks as task_io
from shoptune.serve.engine import ADAPTER_NAME_RE, AdapterError, Engine, EngineError, Job, UnknownModel
from shoptune.serve.protocol import (AdapterStatus, AssistantMessage, ChatChoice,
                                     ChatCompletionChunk, ChatCompletionRequest,
                                     ChatCompletionResponse, ChatLogprobs, ChatStreamChoice,
                                     CompletionChoice, CompletionLogProbs, CompletionRequest,
                                     CompletionResponse, DeltaMessage, HealthStatus,
                                     LoadAdapterRequest, ModelCard, ModelList, TaskInfo, TaskList,
                                     TaskRequest, TaskResult, TokenLogprob, TopLogprob,
                                     UnloadAdapterRequest, UsageInfo)
from shoptune.tasks import Grammar, Plan, PlanError, all_cards, task_aliases


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


class Timeout(EngineError):
    status, type, code = 504, "server_error", "timeout"


class NotFound(EngineError):
    status, type, code = 404, "not_found_error", "task_not_found"


class ClientGone(Exception):
    pass


class Caller(Protocol):
    """What a handler needs of the HTTP request: a ``state`` to label metrics with the resolved
    model, and whether the client is still there."""
    state: Any

    async def is_disconnected(self) -> bool: ...


CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, the metrics count it


def sse(obj: BaseModel | dict) -> str:
    body = obj.model_dump() if isinstance(obj, BaseModel) else obj
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- logprobs
def kept_tokens(tok, ids: list[int], text: str) -> int:
    """How many of ``ids`` produced ``text`` (generation cut by a stop string drops the rest)."""
    full = tok.decode(ids, skip_special_tokens=True)
    if len(text) >= len(full):
        return len(ids)
    return sum(1 for k in range(len(ids)) if len(tok.decode(ids[:k], skip_special_tokens=True)) < len(text))


LOGPROB_FLOOR = -9999.0  # vLLM's clamp: JSON has no -inf, and clients parse -9999.0 where null would break them


def finite(lp: float | None) -> float | None:
    """A log-probability fit for JSON: -inf (a token masked by a logits processor, or an overflow)
    and nan become ``LOGPROB_FLOOR``; nothing above 0 (a log-probability) gets through."""
    if lp is None:
        return None
    return LOGPROB_FLOOR if math.isnan(lp) or lp < LOGPROB_FLOOR else min(float(lp), 0.0)


def completion_logprobs(tok, ids: list[int], lps: list, tops: list, start: int = 0) -> CompletionLogProbs:
    """OpenAI's ``/v1/completions`` logprobs object for tokens ``ids`` (their text starting at
    character ``start`` of the choice's text); ``lps``/``tops`` may hold None (a prompt's first
    token has no log-probability)."""
    offsets = [start + len(tok.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids))]
    return CompletionLogProbs(
        tokens=[tok.decode([t]) for t in ids], token_logprobs=[finite(lp) for lp in lps],
        top_logprobs=[None if top is None else {tok.decode([t]): finite(lp) for t, lp in top} for top in tops],
        text_offset=offsets)


def chat_logprobs(tok, ids: list[int], lps: list[float], tops: list, k: int) -> ChatLogprobs:
    """OpenAI's chat ``logprobs`` object: ``content`` entries with ``k`` alternatives each."""
    def entry(t: int, lp: float) -> dict:
        s = tok.decode([t])
        return {"token": s, "logprob": finite(lp), "bytes": list(s.encode("utf-8"))}
    return ChatLogprobs(content=[TokenLogprob(**entry(t, lp), top_logprobs=[TopLogprob(**entry(a, b)) for a, b in top[:k]])
                                 for t, lp, top in zip(ids, lps, tops)])


@functools.lru_cache(maxsize=8)
def _longest_token_bytes(tok) -> int | None:
    """The UTF-8 length of the longest token text in ``tok``'s vocabulary, when every token is a
    piece of the input as written (no normalizer that could drop characters); else None."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    return max((len(t.encode("utf-8")) for t in tok.get_vocab()), default=None) or None


def min_tokens(tok, text: str) -> int:
    """A lower bound on the tokens of ``text`` (0 when none is known): each token covers at most
    the longest token's bytes. Cheap: what a huge prompt can be refused by before tokenising."""
    longest = _longest_token_bytes(tok)
    return -(-len(text.encode("utf-8", "surrogatepass")) // longest) if longest else 0


def finish_reason(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


def usage(jobs: list[Job], prompts: list[list[int]]) -> UsageInfo:
    p = sum(len(x) for x in prompts)
    c = sum(len(j.gen_ids) for j in jobs)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


class Serving:
    """What every handler shares: prompt limits, model resolution, submitting jobs and waiting
    for them (cancelled when the client goes or the request times out), and streaming."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings, self.tok = engine, settings, engine.tok

    def check_least(self, least: int, param: str) -> None:
        """A prompt known to be at least ``least`` tokens: refused now if that is over the limit."""
        if least > self.settings.max_prompt_tokens:
            raise EngineError(f"prompt is at least {least} tokens; this server takes at most "
                              f"{self.settings.max_prompt_tokens}", param=param)

    async def encode(self, text: str, *, special: bool, param: str) -> list[int]:
        """Token ids of a prompt, tokenised off the event loop (a 1 MB prompt takes ~1 s, during
        which every other request, /health included, would wait); a text too long for the limit
        whatever its tokens is refused without tokenising it."""
        self.check_least(min_tokens(self.tok, text), param)
        ids = await asyncio.to_thread(self.tok.encode, text, add_special_tokens=special)
        if len(ids) > self.settings.max_prompt_tokens:
            raise EngineError(f"prompt is {len(ids)} tokens; this server takes at most "
                              f"{self.settings.max_prompt_tokens}", param=param)
        if not ids:
            raise EngineError("prompt is empty", param=param)
        return ids

    def resolve(self, caller: Caller, model: str | None) -> str | None:
        """The adapter for ``model``; labels the request's metrics with the resolved name only
        (a client's junk never becomes a Prometheus label value)."""
        adapter = self.engine.resolve_model(model)
        caller.state.model = adapter or self.engine.base_name
        return adapter

    def check(self, req, caller: Caller) -> tuple[str | None, float, float]:
        """(adapter, temperature, top_p) of an OpenAI request; refuses what is not implemented."""
        bad = req.unsupported()
        if bad == ["logprobs"]:
            raise EngineError("logprobs is not supported with stream by this server; ask without "
                              "stream", param="logprobs")
        if bad and bad[0] == "shoptune_plan":
            raise EngineError("shoptune_plan is an extension of /v1/completions only; send the "
                              "prompt there (token ids or text)", param="shoptune_plan")
        if bad:
            raise EngineError(f"{bad[0]} is not supported by this server", param=bad[0])
        temperature = 1.0 if req.temperature is None else req.temperature
        return self.resolve(caller, req.model), temperature, 1.0 if req.top_p is None else req.top_p

    def logit_bias(self, req) -> dict[int, float] | None:
        """The request's ``logit_bias`` by token id, every id checked against the vocabulary
        (None: no bias, or only zeros)."""
        vocab = len(self.tok)
        for key in req.logit_bias or {}:
            if int(key) >= vocab:
                raise EngineError(f"logit_bias: token id {key} is not in the vocabulary (ids "
                                  f"0..{vocab - 1})", param="logit_bias")
        return req.token_bias()

    def check_fits(self, sequences: int) -> None:
        """A request bigger than the whole queue can never be served: 400, not 429 "retry later"."""
        limit = self.engine.max_queue
        if 0 < limit < sequences:
            raise EngineError(f"this request needs {sequences} sequences (prompts x n), which exceeds "
                              f"the server's limit of {limit} queued sequences", param="n")

    def max_tokens(self, value: int | None, default: int, param: str) -> int:
        value = default if value is None else value
        if value > self.settings.max_new_tokens:
            raise EngineError(f"{param}={value} is above this server's limit of "
                              f"{self.settings.max_new_tokens}", param=param)
        return value

    def submit_all(self, jobs: list[Job]) -> None:
        """All or nothing: a job refused (queue full, shutting down) cancels the ones before it."""
        self.check_fits(len(jobs))
        try:
            for j in jobs:
                self.engine.submit(j)
        except EngineError:
            for j in jobs:
                j.cancelled.set()
            raise

    async def wait_all(self, caller: Caller, jobs: list[Job]) -> None:
        """Wait for every job; cancel them if the client disconnects (:class:`ClientGone`) or the
        timeout passes (:class:`Timeout`)."""
        gathered = asyncio.ensure_future(asyncio.gather(*(self.engine.complete(j) for j in jobs)))
        deadline = time.monotonic() + self.settings.request_timeout
        try:
            while True:
                done, _ = await asyncio.wait({gathered}, timeout=0.1)
                if done:
                    gathered.result()
                    return
                if await caller.is_disconnected():
                    raise ClientGone()
                if time.monotonic() > deadline:
                    raise Timeout(f"request took longer than {self.settings.request_timeout:.0f} s")
        finally:
            if not gathered.done():
                for j in jobs:
                    j.cancelled.set()
                gathered.cancel()
                # (its CancelledError is ours: retrieved, or asyncio logs a traceback per request)
                gathered.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def merged(self, jobs: list[Job]):
        """(index, kind, value) events of several jobs as they come, kind in delta/done."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: Job):
            try:
                async for delta in self.engine.events(job):
                    await q.put((i, "delta", delta))
                await q.put((i, "done", job.finish_reason))
            except Exception as e:  # noqa: BLE001 - reported on the stream
                await q.put((i, "error", e))

        pumps = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        deadline = time.monotonic() + self.settings.request_timeout
        open_ = len(jobs)
        try:
            while open_:
                try:
                    item = await asyncio.wait_for(q.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise Timeout(f"request took longer than {self.settings.request_timeout:.0f} s") from None
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

    async def stream_events(self, jobs: list[Job], chunk, usage_chunk):
        try:
            async for i, kind, value in self.merged(jobs):
                yield sse(chunk(i, value if kind == "delta" else None, value if kind == "done" else None))
            if usage_chunk is not None:
                yield sse(usage_chunk())
        except EngineError as e:
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
        except Exception as e:  # noqa: BLE001 - the status line is already sent: report in-band
            yield sse({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                 "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    def stream_response(self, req, jobs: list[Job], prompts, chunk_model, head: dict, choice) -> StreamingResponse:
        """SSE reply: a chunk per delta and per finish (``choice(i, text, finish_reason)`` builds
        the choice), then the usage chunk if ``stream_options.include_usage``, then [DONE]."""
        def chunk(i, text, reason):
            return chunk_model(**head, choices=[choice(i, text, None if reason is None else finish_reason(jobs[i]))])

        def usage_chunk():
            return chunk_model(**head, choices=[], usage=usage(jobs, prompts))
        include = req.stream_options is not None and req.stream_options.include_usage
        return StreamingResponse(self.stream_events(jobs, chunk, usage_chunk if include else None),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Completions(Serving):
    """``POST /v1/completions``: text, token ids or batches of either; ``n``, ``stop``, ``seed``,
    ``logit_bias``, ``logprobs`` (top-k), ``echo`` (with prompt logprobs; ``max_tokens: 0`` scores
    only), and shoptune's ``shoptune_plan`` (the task endpoint's constraint)."""

    @staticmethod
    def plan(req: CompletionRequest, limit: int) -> Plan | None:
        """``shoptune_plan`` as the engine's :class:`Plan`: what the task endpoint decodes with
        (``max_tokens`` is its token limit)."""
        p = req.shoptune_plan
        if p is None:
            return None
        return Plan("generate", max_new_tokens=limit, numeric=p.numeric, stop_newline=p.stop_newline,
                    max_value=p.max_value, count=p.count, unique=p.unique, values=tuple(p.values),
                    grammar=Grammar(p.grammar) if p.grammar is not None else None)

    async def prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """(token ids, text to echo) per prompt."""
        p, tok, limit = req.prompt, self.tok, self.settings.max_prompt_tokens
        if isinstance(p, str):
            prompts, texts = [await self.encode(p, special=True, param="prompt")], [p]
        elif p and all(isinstance(x, str) for x in p):
            prompts, texts = [await self.encode(x, special=True, param="prompt") for x in p], list(p)
        elif p and all(isinstance(x, int) for x in p):
            prompts, texts = [list(p)], None
        elif p:
            prompts, texts = [list(x) for x in p], None
        else:
            raise EngineError("prompt is empty", param="prompt")
        for ids in prompts:
            if not ids or len(ids) > limit or any(not 0 <= t < len(tok) for t in ids):
                raise EngineError(f"each prompt needs 1..{limit} valid tokens", param="prompt")
        return prompts, texts if texts is not None else [tok.decode(ids) for ids in prompts]

    async def create(self, req: CompletionRequest, caller: Caller) -> CompletionResponse | Response:
        adapter, temperature, top_p = self.check(req, caller)
        p = req.prompt
        self.check_fits(req.n * (len(p) if isinstance(p, list) and p and not isinstance(p[0], int) else 1))
        prompts, texts = await self.prompts(req)
        limit = self.max_tokens(req.max_tokens, 16, "max_tokens")
        if limit == 0 and req.stream:
            raise EngineError("max_tokens 0 (prompt logprobs only) needs stream false", param="max_tokens")
        all_prompts = [ids for ids in prompts for _ in range(req.n)]
        bias, plan = self.logit_bias(req), self.plan(req, limit)
        # choice k of a seeded request samples with seed + k: reproducible, and the n differ
        jobs = [Job(ids, adapter, max_new_tokens=limit, temperature=temperature, top_p=top_p,
                    stop=req.stops(), logprobs=req.logprobs, logit_bias=bias, plan=plan,
                    seed=None if req.seed is None else req.seed + k)
                for ids in prompts for k in range(req.n)] if limit > 0 else []
        scored = [Job(ids, adapter, kind="score", logprobs=req.logprobs) for ids in prompts] \
            if req.echo and req.logprobs is not None else []
        self.submit_all(scored + jobs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        echoed = [texts[i // req.n] if req.echo else "" for i in range(len(all_prompts))]
        if req.stream:
            started = set()

            def choice(i, text, reason):
                if i not in started:  # the echoed prompt leads the first chunk
                    started.add(i)
                    text = echoed[i] + (text or "")
                return CompletionChoice(index=i, text=text or "", logprobs=None, finish_reason=reason)
            return self.stream_response(req, jobs, all_prompts, CompletionResponse, head, choice)
        try:
            await self.wait_all(caller, scored + jobs)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)

        def logprobs(i: int) -> CompletionLogProbs | None:
            if req.logprobs is None:
                return None
            parts = []  # (ids, logprobs, alternatives, where their text starts in the choice's)
            if scored:  # the echoed prompt; its first token has no log-probability
                sj = scored[i // req.n]
                parts.append((sj.prompt_ids, [None, *sj.token_logprobs], [None, *sj.top_logprobs], 0))
            if jobs:
                j = jobs[i]
                n = kept_tokens(self.tok, j.gen_ids, j.text)
                parts.append((j.gen_ids[:n], j.token_logprobs[:n], j.top_logprobs[:n], len(echoed[i])))
            out = CompletionLogProbs()
            for part in parts:
                got = completion_logprobs(self.tok, *part)
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(out, key).extend(getattr(got, key))
            return out

        choices = [CompletionChoice(index=i, text=echoed[i] + (jobs[i].text if jobs else ""),
                                    logprobs=logprobs(i),
                                    finish_reason=finish_reason(jobs[i]) if jobs else "length")
                   for i in range(len(all_prompts))]
        return CompletionResponse(**head, choices=choices, usage=usage(jobs, all_prompts))


class Chat(Serving):
    """``POST /v1/chat/completions`` through the tokenizer's chat template."""

    async def create(self, req: ChatCompletionRequest, caller: Caller) -> ChatCompletionResponse | Response:
        adapter, temperature, top_p = self.check(req, caller)
        for i, m in enumerate(req.messages):
            if (problem := m.problem()) is not None:
                raise EngineError(f"messages.{i}.{problem[0]}: {problem[1]}", param=f"messages.{i}.{problem[0]}")
        self.check_fits(req.n)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        self.check_least(sum(min_tokens(self.tok, m["content"]) for m in messages), "messages")
        try:  # (off the event loop: a template over large messages takes a while)
            text = await asyncio.to_thread(self.tok.apply_chat_template, messages, tokenize=False,
                                           add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - template errors (e.g. role order) are the client's
            raise EngineError(f"cannot apply the chat template: {e}", param="messages") from e
        ids = await self.encode(text, special=False, param="messages")
        limit = self.max_tokens(req.max_completion_tokens or req.max_tokens, self.settings.default_max_tokens,
                                "max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        bias = self.logit_bias(req)
        jobs = [Job(ids, adapter, max_new_tokens=limit, temperature=temperature, top_p=top_p,
                    stop=req.stops(), logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                    logit_bias=bias, seed=None if req.seed is None else req.seed + k)
                for k in range(req.n)]
        self.submit_all(jobs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model}
        prompts = [ids] * req.n
        if req.stream:
            started = set()

            def choice(i, text, reason):
                first = i not in started  # the first chunk of each choice carries the role
                started.add(i)
                delta = DeltaMessage(role="assistant" if first else None,
                                     content=text if reason is None else None)
                return ChatStreamChoice(index=i, delta=delta, logprobs=None, finish_reason=reason)
            return self.stream_response(req, jobs, prompts, ChatCompletionChunk, head, choice)
        try:
            await self.wait_all(caller, jobs)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)

        def logprobs(j: Job) -> ChatLogprobs | None:
            if not req.logprobs:
                return None
            n = kept_tokens(self.tok, j.gen_ids, j.text)
            return chat_logprobs(self.tok, j.gen_ids[:n], j.token_logprobs[:n], j.top_logprobs[:n],
                                 req.top_logprobs or 0)
        return ChatCompletionResponse(
            **head, choices=[ChatChoice(index=i, message=AssistantMessage(content=j.text),
                                        logprobs=logprobs(j), finish_reason=finish_reason(j))
                             for i, j in enumerate(jobs)],
            usage=usage(jobs, prompts))


class Tasks(Serving):
    """``/v1/tasks``: task cards with input schemas, and structured input -> the card's prompt
    (as at evaluation) -> constrained decoding -> the parsed answer."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        super().__init__(engine, settings)
        self.cards = all_cards()
        self.aliases = task_aliases()  # ShopBench's own task names (task2) for their cards

    def default_model(self, card) -> str | None:
        """The adapter answering ``card`` when a request names none (None: the base model):
        ``--task-adapter`` for its name or its ShopBench name, else an adapter named like it;
        only one that is loaded now (an expert unloaded, or being reloaded, leaves its tasks to
        the base model, as a task without an expert)."""
        s, e = self.settings, self.engine
        names = [s.task_adapters[k] for k in (card.name, card.source.task_name) if k and k in s.task_adapters]
        for name in [*names, card.name]:
            if name in e.adapters and name not in e.draining:
                return name
        return None

    def info(self, card) -> TaskInfo:
        request = task_io.request_schema(card)
        return TaskInfo(id=card.name, capability=card.capability, task_type=card.task_type,
                        metric=card.metric, metrics=list(card.metrics), labels=card.labels,
                        answer_schema=card.output_type.answer_schema(card), description=card.description,
                        adapter=self.default_model(card),
                        aliases=[a for a, name in self.aliases.items() if name == card.name],
                        request_schema=request, input_schema=task_io.input_model(card).model_json_schema())

    def card(self, task: str):
        """The card named ``task``: its name or a ShopBench task name, in any case; a 404 listing
        close names otherwise."""
        for name in (task, task.lower()):
            if name in self.cards:
                return self.cards[name]
            if name in self.aliases:
                return self.cards[self.aliases[name]]
        shown = task if len(task) <= 100 else f"{task[:100]}... ({len(task)} characters)"
        close = difflib.get_close_matches(task.lower()[:200], [*self.cards, *self.aliases], n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise NotFound(f"unknown task {shown!r}{hint} (GET /v1/tasks lists the {len(self.cards)} tasks)",
                       param="task")

    def list(self) -> TaskList:
        return TaskList(protocol=self.settings.protocol, data=[self.info(c) for c in self.cards.values()])

    def get(self, task: str) -> TaskInfo:
        return self.info(self.card(task))

    async def run(self, task: str, req: TaskRequest, caller: Caller) -> TaskResult | Response:
        card, engine = self.card(task), self.engine
        model = req.model or self.default_model(card) or engine.base_name
        adapter = self.resolve(caller, model)
        schema = task_io.input_model(card)
        try:
            inp = schema.model_validate(req.input)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in ("input", *first.get("loc", ())))
            raise EngineError(f"{loc}: {first['msg']} (task {card.name} takes: "
                              f"{', '.join(schema.model_fields)} under `input`)", param=loc) from None
        rec = task_io.to_record(card, inp)

        def prepare():  # the prompt and the constraint: off the event loop (large inputs take time)
            return task_io.plan(card, inp, rec), build_prompts(
                [rec], self.settings.protocol, self.tok, render=card.render_record)[0]
        self.check_least(min_tokens(self.tok, rec.input_field or ""), "input")
        try:
            plan, prompt = await asyncio.to_thread(prepare)
        except PlanError as e:
            loc = "input.input_field" if getattr(inp, "input_field", None) is not None else "input"
            raise EngineError(f"{loc}: {e}", param=loc) from None
        ids = await self.encode(prompt, special=False, param="input")

        def job_for(adapter):
            return (Job(ids, adapter, kind="choice", choices=plan.choices) if plan.kind == "choice" else
                    Job(ids, adapter, max_new_tokens=plan.max_new_tokens, temperature=0.0, plan=plan))
        job = job_for(adapter)
        try:
            self.submit_all([job])
        except UnknownModel:
            if req.model or adapter is None:  # (the client named it: theirs to hear)
                raise
            model, job = engine.base_name, job_for(None)  # its expert was unloaded meanwhile
            caller.state.model = model
            self.submit_all([job])
        try:
            await self.wait_all(caller, [job])
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        return TaskResult(id=f"task-{uuid.uuid4().hex}", task=card.name, task_type=card.task_type,
                          metric=card.metric, model=model, **task_io.answer(card, inp, job.text, plan),
                          usage=usage([job], [ids]))


class Admin(Serving):
    """Models, runtime adapters (vLLM's ``/v1/load_lora_adapter`` contract, confined to
    ``--adapters-dir``) and health."""

    def models(self) -> ModelList:
        e, now = self.engine, int(time.time())
        return ModelList(data=[ModelCard(id=e.base_name, created=now, root=e.base_name, parent=None)]
                         + [ModelCard(id=name, created=now, root=self.shown_root(e.adapters[name]),
                                      parent=e.base_name)
                            for name in e.models()[1:]])

    def shown_root(self, ref) -> str | None:
        """An adapter's ``root`` in /v1/models, as vLLM shows the path it was loaded from, but no
        folder of this machine: the folder relative to --adapters-dir (what lora_path takes), None
        for one loaded from elsewhere (--adapter); a gateway's upstream reference by its last part."""
        if not isinstance(ref, Path):
            return PurePath(str(ref)).name or None
        root = self.settings.adapters_dir
        if root is None:
            return None
        try:
            return ref.resolve().relative_to(root.resolve()).as_posix()
        except (OSError, ValueError):
            return None

    def adapter_path(self, name: str, given: str | None) -> Path:
        root = self.settings.adapters_dir
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
        try:  # the files too: a link inside the folder may point anywhere
            escaping = sorted(f.name for f in full.iterdir() if not f.resolve().is_relative_to(root)) \
                if full.is_dir() else []
        except (OSError, RuntimeError) as e:
            raise AdapterError(f"lora_path {given or name!r}: {e}", param="lora_path") from None
        if escaping:
            raise AdapterError(f"lora_path {given or name!r}: {escaping[0]} is a link to a file outside "
                               "the adapters folder", param="lora_path")
        return full

    async def load_adapter(self, req: LoadAdapterRequest) -> AdapterStatus:
        path = self.adapter_path(req.lora_name, req.lora_path)
        try:
            await asyncio.to_thread(self.engine.load_adapter, req.lora_name, path)
        except EngineError as e:
            if e.param not in (None, "lora_path"):
                raise
            # the engine names the folder by its absolute path: say it as the client gave it
            # (relative to --adapters-dir, as every other lora_path error does), under its param
            rel = path.relative_to(self.settings.adapters_dir.resolve()).as_posix()
            msg = e.message
            if msg.startswith(f"{path}: "):
                msg = f"lora_path {rel!r}: {msg[len(str(path)) + 2:]}"
            msg = msg.replace(str(path), rel)
            e.message, e.args, e.param = msg, (msg,), "lora_path"
            raise
        return AdapterStatus(lora_name=req.lora_name, models=self.engine.models())

    async def unload_adapter(self, req: UnloadAdapterRequest) -> AdapterStatus:
        await self.engine.unload_adapter(req.lora_name)
        return AdapterStatus(lora_name=req.lora_name, models=self.engine.models())

    def health(self, check: str) -> HealthStatus:
        """``check`` is "ready" or "live"; the reply's ``status`` says whether it passed."""
        e = self.engine
        h = e.health()
        return HealthStatus(status="ok" if h[check] else "unavailable", live=h["live"], ready=h["ready"],
                            reason=h["reason"], model=e.base_name, adapters=e.models()[1:],
                            queue_depth=e.queue_depth)
