"""The serving engine: one base model, many LoRA adapters, dynamic batching across adapters.

Requests arrive from the asyncio side (FastAPI handlers) as :class:`Job` objects and wait in a
bounded queue. One worker thread owns the model: it takes the first waiting job, keeps collecting
until ``max_batch_size`` jobs or ``max_wait`` seconds, and runs them together. Jobs for different
adapters share a batch: peft's mixed-batch LoRA (``adapter_names=[...]``, ``"__base__"`` for the
plain model) applies each row's adapter inside the same forward pass.

Two kinds of job, decided like the evaluator's :class:`~shoptune.eval.backends.Plan`:

* ``choice``: one forward pass, the answer is the best-scoring valid option token (multiple choice);
* ``generate``: ``model.generate`` with per-row control. A logits processor applies each row's
  constraint (the evaluator's :class:`NumberListProcessor` for ranked ids), temperature and top-p;
  a stopping criterion detokenizes each row incrementally, streams its new text to the waiting
  handler, honours its stop strings / token limit, and ends rows whose client went away.

Adapters are loaded and unloaded between batches (the worker holds ``model_lock`` while a batch
runs); an adapter being unloaded first stops taking new requests and waits for its queued and
running ones, so nothing in flight is dropped.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (GenerationConfig, LogitsProcessorList, StoppingCriteriaList,
                          TemperatureLogitsWarper, TopPLogitsWarper)

from shoptune.eval.backends import NumberListProcessor, Plan, best_choice

log = logging.getLogger("shoptune.serve")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class EngineError(Exception):
    """An error with an HTTP status and OpenAI error type, raised to the API layer."""
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class UnknownModel(EngineError):
    status, type, code = 404, "not_found_error", "model_not_found"


class QueueFull(EngineError):
    status, type, code = 429, "rate_limit_error", "queue_full"


class ShuttingDown(EngineError):
    status, type, code = 503, "server_error", "shutting_down"


class AdapterError(EngineError):
    status, type, code = 400, "invalid_request_error", "invalid_adapter"


@dataclass(eq=False)
class Job:
    """One sequence to produce. ``model`` is an adapter name or None for the base model."""
    prompt_ids: list[int]
    model: str | None = None
    kind: str = "generate"  # or "choice"
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    plan: Plan | None = None  # the evaluator's plan (task endpoint): constraints, line-end stop
    choices: tuple[str, ...] = ()
    # filled in by the engine
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None
    enqueued: float = 0.0
    first_token: float | None = None

    def _post(self, event) -> None:
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def emit(self, upto: int) -> None:
        if upto > self.sent:
            if self.first_token is None:
                self.first_token = time.monotonic()
            self._post(("delta", self.text[self.sent:upto]))
            self.sent = upto

    def done(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._post(("done", reason))

    def fail(self, exc: BaseException) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self._post(("error", exc))


class RowLogits:
    """Per-row logits control for one generate call: constraints, temperature, top-p, greedy."""

    def __init__(self, jobs: list[Job], tok, prompt_len: int, sampling: bool):
        self.jobs, self.sampling = jobs, sampling
        self.constraints = [NumberListProcessor(tok, prompt_len, j.plan.max_value, j.plan.count,
                                                j.plan.unique) if j.plan and j.plan.numeric else None
                            for j in jobs]
        self.warpers = [[TemperatureLogitsWarper(j.temperature)] if j.temperature not in (0, 1) else []
                        for j in jobs]
        for w, j in zip(self.warpers, jobs):
            if 0 < j.top_p < 1:
                w.append(TopPLogitsWarper(j.top_p))

    def __call__(self, input_ids, scores):
        if not self.sampling and not any(self.constraints):
            return scores  # plain greedy batch: nothing to do per row
        for row, job in enumerate(self.jobs):
            s = scores[row:row + 1]
            if self.constraints[row] is not None:
                s = self.constraints[row](input_ids[row:row + 1], s)
            if self.sampling:
                if job.temperature == 0:  # a greedy row in a sampled batch: only its argmax survives
                    keep = s.argmax(-1, keepdim=True)
                    s = torch.full_like(s, -float("inf")).scatter(-1, keep, 0.0)
                else:
                    for w in self.warpers[row]:
                        s = w(input_ids[row:row + 1], s)
            scores[row:row + 1] = s
        return scores


class RowControl:
    """Stopping criterion that also streams: per-row stop strings, limits and cancellation."""

    def __init__(self, jobs: list[Job], tok, eos_ids: set[int]):
        self.jobs, self.tok, self.eos = jobs, tok, eos_ids
        self.finished = [False] * len(jobs)

    def _hold_back(self, job: Job, text: str) -> int:
        """How much of ``text`` can be streamed: not a broken UTF-8 tail, not a stop-string prefix."""
        end = len(text.rstrip("\ufffd"))
        for s in job.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        return end

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if self.finished[row]:
                continue
            if job.cancelled.is_set():
                self._finish(row, "cancelled")
                continue
            if last[row] in self.eos:
                job.emit(len(job.text))
                self._finish(row, "stop")
                continue
            job.gen_ids.append(last[row])
            job.text = self.tok.decode(job.gen_ids, skip_special_tokens=True)
            hits = [i for i in (job.text.find(s) for s in job.stop) if i >= 0]
            if hits:
                job.text = job.text[:min(hits)]
                job.emit(len(job.text))
                self._finish(row, "stop")
            elif job.plan is not None and job.plan.stop_newline and "\n" in job.text.lstrip():
                job.emit(len(job.text))
                self._finish(row, "stop")
            elif len(job.gen_ids) >= job.max_new_tokens:
                job.emit(len(job.text))
                self._finish(row, "length")
            else:
                job.emit(self._hold_back(job, job.text))
        return torch.tensor(self.finished, device=input_ids.device)

    def _finish(self, row: int, reason: str) -> None:
        self.finished[row] = True
        self.jobs[row].done(reason)

    def close(self) -> None:
        """After generate returns: rows still open ran into the batch's token limit."""
        for row, job in enumerate(self.jobs):
            if not self.finished[row]:
                job.emit(len(job.text))
                self._finish(row, "length")


def check_adapter_dir(path: Path) -> None:
    """A loadable adapter folder: PEFT config + safetensors weights, and no pickled weights."""
    if not path.is_dir():
        raise AdapterError(f"{path}: not a directory")
    if not (path / "adapter_config.json").is_file():
        raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
    if not (path / "adapter_model.safetensors").is_file():
        raise AdapterError(f"{path}: no adapter_model.safetensors (only safetensors weights are loaded)")
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if pickled:
        raise AdapterError(f"{path}: refusing a folder with pickled weights ({', '.join(pickled)})")


@dataclass
class EngineStats:
    """Callbacks the API layer hooks its Prometheus metrics into (no-ops by default)."""
    on_batch: object = None  # (size, n_adapters, tokens, seconds)
    on_tokens: object = None  # (model, prompt_tokens, generated_tokens)


class Engine:
    def __init__(self, model, tokenizer, *, base_name: str = "base", max_batch_size: int = 16,
                 max_wait: float = 0.005, max_queue: int = 256, stats: EngineStats | None = None):
        self.model, self.tok = model, tokenizer
        self.base_name = base_name
        self.max_batch_size, self.max_wait = max_batch_size, max_wait
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.adapters: dict[str, Path] = {}
        self.draining: set[str] = set()
        self.pending: Counter[str] = Counter()  # queued + running jobs per adapter
        self.running = 0
        self.model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._stopping = False
        self.stats = stats or EngineStats()
        eos = tokenizer.eos_token_id
        self.eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= {gen_eos} if isinstance(gen_eos, int) else set(gen_eos or [])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._thread = threading.Thread(target=self._worker, name="shoptune-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ adapters
    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load an adapter folder under ``name`` (blocking; call from a thread)."""
        if not ADAPTER_NAME_RE.match(name) or name in (BASE, self.base_name):
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-'",
                               param="lora_name")
        if name in "lora_":  # peft matches weights by substring: such names can clobber others
            raise AdapterError(f"invalid adapter name {name!r}: peft cannot load an adapter whose "
                               "name is part of 'lora_'", param="lora_name")
        path = Path(path)
        check_adapter_dir(path)
        if name in self.adapters or name in self.draining:
            raise AdapterError(f"adapter {name!r} is already loaded", param="lora_name")
        from peft import PeftModel
        with self.model_lock:
            try:
                if self.is_peft:
                    self.model.load_adapter(str(path), adapter_name=name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            except Exception as e:  # shape mismatch, bad config, corrupt safetensors ...
                if self.is_peft and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                raise AdapterError(f"{path}: cannot load adapter: {e}") from e
            self.model.eval()
            self.adapters[name] = path
        log.info("loaded adapter %s from %s", name, path)

    def begin_unload(self, name: str) -> None:
        if name not in self.adapters or name in self.draining:
            raise UnknownModel(f"adapter {name!r} is not loaded", param="lora_name")
        self.draining.add(name)  # new requests for it are refused from now on

    def finish_unload(self, name: str) -> None:
        """Remove a draining adapter once its queued and running requests are done."""
        with self.model_lock:
            if len(self.adapters) == 1:  # peft cannot hold zero adapters: back to the plain model
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
            self.draining.discard(name)
        log.info("unloaded adapter %s", name)

    async def unload_adapter(self, name: str, timeout: float = 600.0) -> None:
        self.begin_unload(name)
        deadline = time.monotonic() + timeout
        while self.pending[name] > 0:
            if time.monotonic() > deadline:
                self.draining.discard(name)
                raise EngineError(f"adapter {name!r} still busy after {timeout:.0f} s; not unloaded")
            await asyncio.sleep(0.01)
        await asyncio.to_thread(self.finish_unload, name)

    def models(self) -> list[str]:
        return [self.base_name] + [n for n in self.adapters if n not in self.draining]

    def resolve_model(self, model: str | None) -> str | None:
        """The request's ``model`` to an adapter name (None: the base model)."""
        if model in (None, "", self.base_name):
            return None
        if model in self.adapters and model not in self.draining:
            return model
        raise UnknownModel(f"The model `{model}` does not exist. Available: {', '.join(self.models())}",
                           param="model")

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> Job:
        """Queue a job (from the event loop). Raises QueueFull / ShuttingDown / UnknownModel."""
        if self._stopping:
            raise ShuttingDown("server is shutting down")
        if job.model is not None and (job.model not in self.adapters or job.model in self.draining):
            raise UnknownModel(f"The model `{job.model}` does not exist", param="model")
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        job.enqueued = time.monotonic()
        with self._count_lock:
            self.pending[job.model or BASE] += 1
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self._release(job)
            raise QueueFull(f"the request queue is full ({self.queue.maxsize} waiting); retry later") from None
        return job

    def _release(self, job: Job) -> None:
        with self._count_lock:
            self.pending[job.model or BASE] -= 1

    async def events(self, job: Job):
        """Yield ("delta", text) events until the job ends; returns on ("done", reason)."""
        while True:
            kind, value = await job.events.get()
            if kind == "delta":
                yield value
            elif kind == "done":
                return
            else:
                raise value

    async def complete(self, job: Job) -> str:
        async for _ in self.events(job):
            pass
        return job.text

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopping:
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get(timeout=remaining) if remaining > 0
                                 else self.queue.get_nowait())
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.cancelled.is_set():
                job.done("cancelled")
                self._release(job)
            elif job.model is not None and job.model not in self.adapters:
                job.fail(UnknownModel(f"adapter {job.model!r} was unloaded", param="model"))
                self._release(job)  # (not reachable through the API: unloading waits for its jobs)
            else:
                live.append(job)
        if not live:
            return
        t0 = time.monotonic()
        self.running = len(live)
        try:
            with self.model_lock, torch.inference_mode():
                choice = [j for j in live if j.kind == "choice"]
                gen = [j for j in live if j.kind != "choice"]
                if choice:
                    self._choose(choice)
                if gen:
                    self._generate(gen)
        except Exception as e:  # noqa: BLE001 - every waiting client gets the error, the worker lives
            log.exception("batch of %d failed", len(live))
            for j in live:
                j.fail(e)
        finally:
            self.running = 0
            for j in live:
                self._release(j)
        seconds = time.monotonic() - t0
        tokens = sum(len(j.gen_ids) or 1 for j in live)
        if self.stats.on_batch:
            self.stats.on_batch(len(live), len({j.model for j in live}), tokens, seconds)
        if self.stats.on_tokens:
            for j in live:
                self.stats.on_tokens(j.model or self.base_name, len(j.prompt_ids), len(j.gen_ids))

    def _inputs(self, jobs: list[Job]) -> dict:
        """Left-padded batch with position ids that start at 0 on each row's first real token."""
        n = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), n), dtype=torch.long)
        for row, j in enumerate(jobs):
            ids[row, n - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[row, n - len(j.prompt_ids):] = 1
        out = {"input_ids": ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}
        if self.is_peft:
            out["adapter_names"] = [j.model or BASE for j in jobs]
        return out

    def _choose(self, jobs: list[Job]) -> None:
        inputs = self._inputs(jobs)
        pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**inputs, position_ids=pos, logits_to_keep=1).logits[:, -1, :].float()
        for row, job in enumerate(jobs):
            job.text = best_choice(logits[row], job.choices, self.tok)
            job.gen_ids = [0]  # one decision
            job.emit(len(job.text))
            job.done("stop")

    def _generate(self, jobs: list[Job]) -> None:
        inputs = self._inputs(jobs)
        sampling = any(j.temperature > 0 for j in jobs)
        cfg = GenerationConfig(max_new_tokens=max(j.max_new_tokens for j in jobs), do_sample=sampling,
                               top_k=0 if sampling else None, top_p=1.0, temperature=1.0,
                               pad_token_id=self.pad_id,
                               eos_token_id=sorted(self.eos_ids))
        control = RowControl(jobs, self.tok, self.eos_ids)
        logits = RowLogits(jobs, self.tok, inputs["input_ids"].shape[1], sampling)
        self.model.generate(**inputs, generation_config=cfg,
                            logits_processor=LogitsProcessorList([logits]),
                            stopping_criteria=StoppingCriteriaList([control]))
        control.close()

    # ------------------------------------------------------------------ lifecycle
    def stop(self, timeout: float = 60.0) -> None:
        """Refuse new jobs, finish the queued and running ones, stop the worker."""
        self._stopping = True
        self._thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize()
