"""The serving engine: one base model, many LoRA adapters, dynamic batching across adapters.

Requests arrive from the asyncio side (FastAPI handlers) as :class:`Job` objects and wait in a
bounded queue. One worker thread owns the model: it takes the first waiting job, keeps collecting
until ``max_batch_size`` jobs or ``max_wait`` seconds, and runs them together. Jobs for different
adapters share a batch: peft's mixed-batch LoRA (``adapter_names=[...]``, ``"__base__"`` for the
plain model) applies each row's adapter inside the same forward pass.

Two kinds of job, decided like the evaluator's :class:`~shoptune.eval.backends.Plan`:

* ``choice``: one forward pass, the answer is the best-scoring valid option token (multiple choice);
* ``generate``: ``model.generate`` with per-row control. A logits processor applies each row's
  ``logit_bias`` (added to that row's logits only, at every step), constraint (the evaluator's
  :class:`NumberListProcessor` for ranked ids), temperature, top-p and seed (a seeded row samples
  with its own generator, so its tokens do not depend on the batch it shares), and records the
  raw log-probabilities a row asked for (``logprobs``: the model's own distribution, before bias,
  constraint and temperature, as vLLM's default ``--logprobs-mode raw_logprobs``);
  a stopping criterion detokenizes each row incrementally, streams its new text to the waiting
  handler, honours its stop strings / token limit, and ends rows whose client went away;
* ``score``: one forward pass over the prompt, the log-probability of each prompt token given the
  ones before it and the top-k alternatives (``echo`` with ``logprobs``: how lm-evaluation-harness
  and similar clients score multiple choice through ``/v1/completions``).

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

from shoptune.decoding import (GrammarProcessor, NumberListProcessor, PrefixCache, best_choice, last_logits,
                               left_padded, positions)
from shoptune.tasks import Plan

log = logging.getLogger("shoptune.serve")
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class EngineError(Exception):
    """An error with an HTTP status and OpenAI error type, raised to the API layer."""
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] | None = None  # extra response headers (429: Retry-After)

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class UnknownModel(EngineError):
    status, type, code = 404, "not_found_error", "model_not_found"


class QueueFull(EngineError):
    status, type, code = 429, "rate_limit_error", "queue_full"
    headers = {"Retry-After": "1"}  # a batch takes about that long; the queue drains batch by batch


class ShuttingDown(EngineError):
    status, type, code = 503, "server_error", "shutting_down"


class AdapterError(EngineError):
    status, type, code = 400, "invalid_request_error", "invalid_adapter"


class RowFailed(EngineError):
    """This request's row failed inside a batch (the other rows of the batch go on)."""
    status, type, code = 500, "server_error", "generation_failed"


class EngineUnavailable(EngineError):
    status, type, code = 503, "server_error", "engine_unavailable"


@dataclass(eq=False)
class Job:
    """One sequence to produce. ``model`` is an adapter name or None for the base model."""
    prompt_ids: list[int]
    model: str | None = None
    kind: str = "generate"  # or "choice" or "score"
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    plan: Plan | None = None  # the evaluator's plan (task endpoint): constraints, line-end stop
    choices: tuple[str, ...] = ()
    logprobs: int | None = None  # record each token's log-probability and this many alternatives
    seed: int | None = None  # a sampled row's own generator seed
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's logit_bias)
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
    # logprobs: per generated token (kind "generate") or per prompt token after the first ("score")
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    _step_logprobs: torch.Tensor | None = None  # this step's raw log-softmax, until its token is known

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


def _kill_row(job: Job, scores, row: int, fallback_id: int, why: str) -> None:
    """Fail one row and give it a harmless distribution (only ``fallback_id``), so the batch's
    sampling step stays computable for every other row."""
    job.fail(RowFailed(f"generation failed for this request: {why}"))
    scores[row] = -float("inf")
    scores[row, fallback_id] = 0.0


class RowLogits:
    """Per-row logits control for one generate call: logit bias, constraints, temperature, top-p,
    greedy. Each row's control touches that row's scores only.

    A row whose processing raises or whose scores stop being computable (NaN, +inf, nothing
    left) fails alone: its job gets the error and its row is pinned to ``fallback_id``.
    """

    def __init__(self, jobs: list[Job], tok, prompt_len: int, sampling: bool, fallback_id: int = 0):
        self.jobs, self.sampling, self.fallback_id = jobs, sampling, fallback_id
        self.constraints = [NumberListProcessor(tok, prompt_len, j.plan.max_value, j.plan.count,
                                                j.plan.unique, j.plan.values)
                            if j.plan and j.plan.numeric else
                            GrammarProcessor(tok, [j.plan.grammar], prompt_len)
                            if j.plan and j.plan.grammar is not None else None for j in jobs]
        self.generators, self.warpers, self.biases = [], [], []
        for j in jobs:  # each row's own setup: a value that cannot be used fails that row only
            g, w, b = None, [], None
            try:
                if j.logit_bias:
                    b = (torch.tensor(list(j.logit_bias), dtype=torch.long),
                         torch.tensor(list(j.logit_bias.values()), dtype=torch.float32))
                if j.seed is not None and j.temperature > 0:
                    g = torch.Generator().manual_seed(j.seed)
                if j.temperature not in (0, 1):
                    w.append(TemperatureLogitsWarper(j.temperature))
                if 0 < j.top_p < 1:
                    w.append(TopPLogitsWarper(j.top_p))
            except Exception as e:  # noqa: BLE001 - e.g. a NaN temperature, a seed out of range
                j.fail(RowFailed(f"generation failed for this request: {e}"))
            self.generators.append(g)
            self.warpers.append(w)
            self.biases.append(b)

    def __call__(self, input_ids, scores):
        for row, job in enumerate(self.jobs):  # the model's own distribution, before any control
            if job.logprobs is not None and job.finish_reason is None:
                job._step_logprobs = torch.log_softmax(scores[row].float(), -1)
        if self.sampling or any(self.constraints) or any(self.biases):  # (else nothing per row)
            for row, job in enumerate(self.jobs):
                if job.finish_reason is not None:
                    continue
                try:
                    s = scores[row:row + 1]
                    if self.biases[row] is not None:  # (a new tensor: the batch's scores untouched)
                        ids, values = self.biases[row]
                        s = s.index_add(-1, ids.to(s.device), values.to(s.device, s.dtype)[None])
                    if self.constraints[row] is not None:
                        s = self.constraints[row](input_ids[row:row + 1], s)
                    if self.sampling:
                        if job.temperature == 0:  # a greedy row in a sampled batch: its argmax only
                            keep = s.argmax(-1, keepdim=True)
                            s = torch.full_like(s, -float("inf")).scatter(-1, keep, 0.0)
                        else:
                            for w in self.warpers[row]:
                                s = w(input_ids[row:row + 1], s)
                            if self.generators[row] is not None:  # its own draw: batch-independent
                                pick = torch.multinomial(torch.softmax(s.float(), -1), 1,
                                                         generator=self.generators[row])
                                s = torch.full_like(s, -float("inf")).scatter(-1, pick, 0.0)
                    scores[row:row + 1] = s
                except Exception as e:  # noqa: BLE001 - this row's failure, not the batch's
                    log.exception("row %d failed", row)
                    _kill_row(job, scores, row, self.fallback_id, f"{type(e).__name__}: {e}")
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bad.any():
            for row in bad.nonzero().flatten().tolist():
                if self.jobs[row].finish_reason is None:
                    _kill_row(self.jobs[row], scores, row, self.fallback_id,
                              "the next-token scores are not finite numbers")
                else:
                    scores[row] = -float("inf")
                    scores[row, self.fallback_id] = 0.0
        return scores


class StopMatcher:
    """A request's stop strings as one Aho-Corasick automaton, fed only the new text each step.

    ``feed(text)`` takes the row's whole decoded text so far and returns ``(start, streamable)``:
    where the earliest stop string found in the text starts (-1: none), and how many characters
    can be streamed (not a broken UTF-8 tail, not a tail that may grow into a stop string). The
    work per step is the new characters, whatever the number of stop strings.
    """

    def __init__(self, stops):
        self.goto: list[dict[str, int]] = [{}]
        self.depth, self.longest_end = [0], [0]  # node string length; longest stop ending here
        for s in stops:
            node = 0
            for ch in s:
                if ch not in self.goto[node]:
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.longest_end.append(0)
                    self.goto[node][ch] = len(self.goto) - 1
                node = self.goto[node][ch]
            self.longest_end[node] = len(s)
        self.fail = [0] * len(self.goto)
        order = list(self.goto[0].values())
        for node in order:  # breadth first: a node's failure link is known before its children's
            for ch, child in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(ch, 0)
                if not self.longest_end[child]:
                    self.longest_end[child] = self.longest_end[self.fail[child]]
                order.append(child)
        self.state, self.fed = 0, ""

    def feed(self, text: str) -> tuple[int, int]:
        end = len(text.rstrip("\ufffd"))
        if end < len(self.fed) or not text.startswith(self.fed):  # decoding rewrote the tail
            self.state, self.fed = 0, ""
        state, start, goto, fail, longest = self.state, -1, self.goto, self.fail, self.longest_end
        for i in range(len(self.fed), end):
            ch = text[i]
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if longest[state]:
                at = i + 1 - longest[state]
                start = at if start < 0 else min(start, at)
        self.state, self.fed = state, text[:end]
        return start, end - self.depth[state]


def top_k(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return list(zip(ids.tolist(), values.tolist()))


def record_logprobs(job: Job, logprobs: torch.Tensor, token: int) -> None:
    """Append ``token``'s log-probability and the row's top ``job.logprobs`` alternatives (plus the
    token itself when it is not among them, as vLLM reports it)."""
    lp = logprobs[token].item()
    top = top_k(logprobs, job.logprobs or 0)
    if job.logprobs and token not in {t for t, _ in top}:
        top.append((token, lp))
    job.token_logprobs.append(lp)
    job.top_logprobs.append(top)


class RowControl:
    """Stopping criterion that also streams: per-row stop strings, limits and cancellation.

    A row whose bookkeeping raises fails alone (its job gets the error), as in :class:`RowLogits`.
    """

    def __init__(self, jobs: list[Job], tok, eos_ids: set[int]):
        self.jobs, self.tok, self.eos = jobs, tok, eos_ids
        self.finished = [False] * len(jobs)
        self.matchers = [StopMatcher(j.stop) if j.stop else None for j in jobs]

    def __call__(self, input_ids, scores, **kwargs):
        last = input_ids[:, -1].tolist()
        for row, job in enumerate(self.jobs):
            if self.finished[row]:
                continue
            try:
                self._step(row, job, last[row])
            except Exception as e:  # noqa: BLE001 - this row's failure, not the batch's
                log.exception("row %d failed", row)
                job.fail(RowFailed(f"generation failed for this request: {type(e).__name__}: {e}"))
            if job.finish_reason is not None:  # done, cancelled or failed (here or in RowLogits)
                self.finished[row] = True
        return torch.tensor(self.finished, device=input_ids.device)

    def _step(self, row: int, job: Job, token: int) -> None:
        if job.finish_reason is not None:
            return
        if job.cancelled.is_set():
            self._finish(row, "cancelled")
            return
        if token in self.eos:
            job.emit(len(job.text))
            self._finish(row, "stop")
            return
        job.gen_ids.append(token)
        if job._step_logprobs is not None:
            record_logprobs(job, job._step_logprobs, token)
            job._step_logprobs = None
        job.text = self.tok.decode(job.gen_ids, skip_special_tokens=True)
        start, streamable = (-1, len(job.text.rstrip("\ufffd"))) if self.matchers[row] is None \
            else self.matchers[row].feed(job.text)
        if start >= 0:
            job.text = job.text[:start]
            job.emit(len(job.text))
            self._finish(row, "stop")
        elif job.plan is not None and job.plan.stop_newline and "\n" in job.text.lstrip():
            job.emit(len(job.text))
            self._finish(row, "stop")
        elif len(job.gen_ids) >= job.max_new_tokens:
            job.emit(len(job.text))
            self._finish(row, "length")
        else:
            job.emit(streamable)

    def _finish(self, row: int, reason: str) -> None:
        self.finished[row] = True
        self.jobs[row].done(reason)

    def close(self) -> None:
        """After generate returns: rows still open ran into the batch's token limit."""
        for row, job in enumerate(self.jobs):
            if not self.finished[row] and job.finish_reason is None:
                job.emit(len(job.text))
                self._finish(row, "length")


def _strip_peft(model) -> None:
    """Put every module PEFT wrapped back to its original, drop the ``peft_config`` it attached."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def walk(module):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                child = child.get_base_layer()
                setattr(module, child_name, child)
            elif hasattr(child, "original_module") and hasattr(child, "modules_to_save"):
                child = child.original_module
                setattr(module, child_name, child)
            walk(child)
    walk(model)
    if "peft_config" in vars(model):
        del model.peft_config


def _unwrap_empty_wrappers(model) -> None:
    """Put back the original module of every peft training wrapper (modules_to_save, trainable
    tokens) that holds no adapter any more: an empty one still fails every adapter's rows."""
    from peft.utils.other import AuxiliaryTrainingWrapper

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, AuxiliaryTrainingWrapper):
                try:
                    empty = not child._get_available_adapters()
                except Exception:  # noqa: BLE001 - unknown wrapper kind: leave it
                    continue
                if empty:
                    setattr(parent, child_name, child.original_module)


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


class JobStream:
    """How a request handler reads a submitted job, whatever engine runs it."""

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


class Engine(JobStream):
    def __init__(self, model, tokenizer, *, base_name: str = "base", max_batch_size: int = 16,
                 max_wait: float = 0.005, max_queue: int = 256, stats: EngineStats | None = None,
                 prefix_cache: PrefixCache | None | bool = True, compile: bool = False):
        if compile:  # (shoptune.compiling: the decoder layers, in place, before the worker starts)
            from shoptune.compiling import compile_layers
            compile_layers(model, inference=True)
        self.compiled = compile
        self.model, self.tok = model, tokenizer
        self.base_name = base_name
        self.max_batch_size, self.max_wait = max_batch_size, max_wait
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.adapters: dict[str, Path] = {}
        self.draining: set[str] = set()
        self.pending: Counter[str] = Counter()  # queued + running jobs per adapter
        self.running = 0
        self.model_lock = threading.Lock()
        self._admin_lock = threading.Lock()  # one adapter load / unload at a time, name check included
        self._count_lock = threading.Lock()
        self._stopping = False
        self.last_error: str | None = None  # the last batch failed as a whole (cleared by a good one)
        self.broken: str | None = None  # the model is in an unknown state: only a restart helps
        self.dead: str | None = None  # the worker thread ended with this error
        self.probe_interval = 5.0
        self._current: list[Job] = []
        self._last_probe = 0.0
        self.stats = stats or EngineStats()
        # prompts of a batch that share a prefix (chat template + system prompt, the task
        # protocol's preamble) reuse its KV; cleared whenever the adapters change
        self.prefix_cache = PrefixCache(max_tokens=4096) if prefix_cache is True else (prefix_cache or None)
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
        """The live model is a PeftModel (a plain model with leftover LoRA layers never is)."""
        from peft import PeftModel
        return isinstance(self.model, PeftModel)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load an adapter folder under ``name`` (blocking; call from a thread). All or nothing:
        the adapter is checked against the base before the live model is touched (including what
        peft cannot apply per row of a mixed batch: DoRA, modules_to_save, ...), a one-token batch
        of the base and every adapter must then compute, and any failure puts the model back
        exactly as it was."""
        if not ADAPTER_NAME_RE.match(name) or name in (BASE, self.base_name):
            raise AdapterError(f"invalid adapter name {name!r}: letters, digits, '.', '_', '-'",
                               param="lora_name")
        if name in "lora_":  # peft matches weights by substring: such names can clobber others
            raise AdapterError(f"invalid adapter name {name!r}: peft cannot load an adapter whose "
                               "name is part of 'lora_'", param="lora_name")
        from peft import PeftModel

        from shoptune.models import InvalidAdapterError, check_adapter, load_error_line
        path = Path(path)
        with self._admin_lock:  # the name check and the load are one step for concurrent callers
            if name in self.adapters or name in self.draining:
                raise AdapterError(f"adapter {name!r} is already loaded", param="lora_name")
            check_adapter_dir(path)
            try:
                check_adapter(self.model, path, base_name=self.base_name, per_row=True)
            except InvalidAdapterError as e:
                raise AdapterError(str(e), param="lora_path") from None
            with self.model_lock:
                grads = {n: p.requires_grad for n, p in self.model.named_parameters()}
                plain = None if self.is_peft else self.model
                try:
                    if plain is None:
                        self.model.load_adapter(str(path), adapter_name=name)
                    else:
                        self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                    self.model.eval()
                except Exception as e:  # noqa: BLE001 - whatever slipped past check_adapter
                    log.exception("loading adapter %s from %s failed; restoring the model", name, path)
                    self._restore_after_failed_load(name, plain, grads)
                    raise AdapterError(f"{path}: cannot load adapter: {load_error_line(e)}",
                                       param="lora_path") from None
                try:  # the new adapter next to the base and every other one, as batches mix them
                    self._check_rows([*self.adapters, name])
                except Exception as e:  # noqa: BLE001 - it loaded but cannot be batched: take it out
                    log.exception("adapter %s loaded but a mixed batch with it fails; unloading it", name)
                    self._restore_after_failed_load(name, plain, grads)
                    why = f"{type(e).__name__}: {load_error_line(e)}"
                    others = f" and {', '.join(self.adapters)}" if self.adapters else ""
                    raise AdapterError(f"{path}: cannot be served next to other adapters: a one-token "
                                       f"batch of it with the base model{others} failed ({why}); it "
                                       "was not loaded",
                                       param="lora_path") from None
                self.adapters[name] = path
                self._forget_prefixes()
        log.info("loaded adapter %s from %s", name, path)

    def _forget_prefixes(self) -> None:
        """Cached prefix KV belongs to the model as it was: drop it when adapters change."""
        if self.prefix_cache is not None:
            self.prefix_cache = PrefixCache(self.prefix_cache.max_tokens, self.prefix_cache.min_prefix)

    def _restore_after_failed_load(self, name: str, plain=None, grads: dict | None = None) -> None:
        """Undo a partial load of ``name``: peft may have injected layers and configs already.
        ``plain`` is the model before a first adapter (None: adapters were loaded before), whose
        ``requires_grad`` flags were ``grads``. If the model still cannot compute a batch of the
        base and every adapter afterwards, the engine is marked broken (only a restart helps)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        if plain is not None and self.model is not plain:  # peft wrapped it: unwrap in place
            self.model = plain
        if self.is_peft:  # adapters were loaded before: take out only this one
            try:
                if name in self.model.peft_config:
                    self.model.delete_adapter(name)
            except Exception:  # noqa: BLE001 - fall back to removing it layer by layer
                log.exception("delete_adapter(%s) failed", name)
                self.model.peft_config.pop(name, None)
                for m in self.model.modules():
                    if isinstance(m, BaseTunerLayer):
                        try:
                            m.delete_adapter(name)
                        except Exception:  # noqa: BLE001
                            pass
            _unwrap_empty_wrappers(self.model)
            left = [n for n, m in self.model.named_modules()
                    if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {})]
        else:  # the first adapter: the plain model must come back without any PEFT layer
            _strip_peft(self.model)
            left = [n for n, m in self.model.named_modules() if isinstance(m, BaseTunerLayer)]
        for n, p in self.model.named_parameters():
            p.requires_grad_((grads or {}).get(n, p.requires_grad))
        self.model.eval()
        if left:
            self.broken = f"a failed load of adapter {name!r} left layers behind ({left[0]} ...)"
            log.error("engine broken: %s", self.broken)
            return
        try:
            self._check_rows(list(self.adapters))
        except Exception as e:  # noqa: BLE001 - reported by /health/live
            self.broken = (f"after a failed load of adapter {name!r} the model cannot compute: "
                           f"{type(e).__name__}: {e}")
            log.error("engine broken: %s", self.broken)

    def begin_unload(self, name: str) -> None:
        if name not in self.adapters or name in self.draining:
            raise UnknownModel(f"adapter {name!r} is not loaded", param="lora_name")
        self.draining.add(name)  # new requests for it are refused from now on

    def finish_unload(self, name: str) -> None:
        """Remove a draining adapter once its queued and running requests are done."""
        with self._admin_lock, self.model_lock:
            if len(self.adapters) == 1:  # peft cannot hold zero adapters: back to the plain model
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            del self.adapters[name]
            self.draining.discard(name)
            self._forget_prefixes()
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
        shown = model if len(model) <= 100 else f"{model[:100]}... ({len(model)} characters)"  # no echo of junk
        raise UnknownModel(f"The model `{shown}` does not exist. Available: {', '.join(self.models())}",
                           param="model")

    # ------------------------------------------------------------------ requests
    def submit(self, job: Job) -> Job:
        """Queue a job (from the event loop). Raises QueueFull / ShuttingDown / UnknownModel."""
        if self._stopping:
            raise ShuttingDown("server is shutting down")
        if self.dead or self.broken:
            raise EngineUnavailable(f"the engine cannot serve: {self.dead or self.broken}")
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

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - recorded for /health, then waiting jobs fail
            self.dead = f"{type(e).__name__}: {e}"
            log.exception("engine worker died")
            gone = EngineUnavailable(f"the engine stopped: {self.dead}")
            for j in self._current:
                j.fail(gone)
            while True:
                try:
                    self.queue.get_nowait().fail(gone)
                except queue.Empty:
                    break

    def _loop(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopping:
                    return
                if self.last_error and time.monotonic() - self._last_probe > self.probe_interval:
                    self._probe()
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
            self._current = batch
            self._run(batch)
            self._current = []

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
            with self.model_lock:
                if self._run_isolated(live) is None:
                    self.last_error = None
        except Exception as e:  # noqa: BLE001 - every waiting client gets the error, the worker lives
            log.exception("batch of %d failed", len(live))
            self.last_error = f"{type(e).__name__}: {e}"
            for j in live:
                j.fail(e)
        finally:
            self.running = 0
            for j in live:
                self._release(j)
        if self.last_error:  # a request-specific failure, or can the model not compute at all?
            self._probe()
        seconds = time.monotonic() - t0
        tokens = sum(len(j.gen_ids) or 1 for j in live)
        if self.stats.on_batch:
            self.stats.on_batch(len(live), len({j.model for j in live}), tokens, seconds)
        if self.stats.on_tokens:
            for j in live:
                self.stats.on_tokens(j.model or self.base_name, len(j.prompt_ids), len(j.gen_ids))

    def _check_rows(self, adapters: list[str]) -> None:
        """One forward pass of a one-token batch: a row for the base model and one per adapter in
        ``adapters`` (peft's mixed batch, as requests share batches). Raises if it cannot compute.
        (The caller holds ``model_lock``.)"""
        with torch.inference_mode(), self._stance():
            inputs = self._inputs([Job([self.pad_id])] + [Job([self.pad_id], a) for a in adapters],
                                  prefix=False)
            inputs.pop("prefix_len")
            logits = self.model(**inputs, logits_to_keep=1, use_cache=False).logits
            if not torch.isfinite(logits).all():
                raise RuntimeError("the check's logits are not finite")

    def _probe(self) -> None:
        """The model check after a failed batch: a one-token batch of the base model and every
        loaded adapter (:meth:`_check_rows`); clears ``last_error`` if it computes."""
        self._last_probe = time.monotonic()
        try:
            with self.model_lock:
                self._check_rows(list(self.adapters))
        except Exception as e:  # noqa: BLE001 - reported by /health
            log.warning("engine probe failed: %s: %s", type(e).__name__, e)
            self.last_error = f"{type(e).__name__}: {e}"
        else:
            if self.last_error:
                log.info("engine probe passed; ready again")
            self.last_error = None

    def health(self) -> dict:
        """Liveness (the worker runs and the model is intact) and readiness (also: not shutting
        down, and the last batch did not fail in a way a probe pass could not clear)."""
        alive = self._thread.is_alive() or (self._stopping and self.dead is None)
        reason = self.dead or self.broken or (None if alive else "the engine worker is not running")
        live = reason is None
        if live and self._stopping:
            reason = "shutting down"
        elif live and self.last_error:
            reason = f"the last batch failed and the model check has not passed since: {self.last_error}"
        return {"live": live, "ready": reason is None, "reason": reason}

    def _stance(self):
        """Compiled layers run eagerly while adapters are loaded: peft's per-row adapters pick
        each adapter's rows by name in Python (``adapter_names``), which a compiled graph would
        freeze to one combination of names per graph. The base model and a merged adapter
        (``--merge``) run compiled."""
        import contextlib
        return torch.compiler.set_stance("force_eager") if self.compiled and self.is_peft \
            else contextlib.nullcontext()

    def _run_kinds(self, jobs: list[Job]) -> None:
        with torch.inference_mode(), self._stance():
            for kind, step in (("choice", self._choose), ("score", self._score), ("generate", self._generate)):
                part = [j for j in jobs if j.kind == kind]
                if part:
                    step(part)

    def _run_isolated(self, jobs: list[Job]) -> BaseException | None:
        """Run ``jobs`` as one batch. If the batch as a whole fails, the rows that caused it are
        found by running again apart: first per adapter, then (within a failing adapter) per
        request, so one bad request or adapter fails only its own rows. A row that already streamed
        text cannot be run again: it fails with the batch's error. Returns the last error (None:
        everything ran). (The caller holds ``model_lock``.)"""
        try:
            self._run_kinds(jobs)
            return None
        except Exception as e:  # noqa: BLE001 - narrowed down below
            error = e
        groups: dict = {}
        for j in jobs:
            groups.setdefault(j.model, []).append(j)
        parts = list(groups.values()) if len(groups) > 1 else [[j] for j in jobs] if len(jobs) > 1 else []
        if not parts:
            log.error("request failed", exc_info=error)
            self._fail(jobs[0], error)
            return error
        log.warning("batch of %d failed (%s: %s); running its %d parts apart", len(jobs),
                    type(error).__name__, error, len(parts))
        last = None
        for part in parts:
            fresh = []
            for j in part:
                if j.finish_reason is not None:
                    continue  # finished (or failed alone) before the batch failed
                if j.sent or j.gen_ids:
                    self._fail(j, error)  # its text is out already: cannot be produced again
                    last = error
                else:
                    j.token_logprobs, j.top_logprobs, j._step_logprobs = [], [], None
                    fresh.append(j)
            if fresh:
                last = self._run_isolated(fresh) or last
        return last

    def _fail(self, job: Job, error: BaseException) -> None:
        # last_error first: a client that checks /health right after its 500 sees it
        self.last_error = f"{type(error).__name__}: {error}"
        job.fail(error)

    def _inputs(self, jobs: list[Job], *, prefix: bool = True) -> dict:
        """The batch: left-padded prompts, and with ``prefix`` (and the cache on) a shared prompt
        prefix's KV from the prefix cache (``past_key_values``, ``prefix_len``)."""
        rows = [j.prompt_ids for j in jobs]
        peft = self.is_peft
        if prefix and self.prefix_cache is not None:
            out = self.prefix_cache.inputs(
                self.model, rows, self.pad_id, adapters=[j.model or BASE for j in jobs],
                forward_kwargs=lambda a: {"adapter_names": [a]} if peft else {})
        else:
            out = {**left_padded(rows, self.pad_id, self.model.device), "prefix_len": 0}
        if peft:
            out["adapter_names"] = [j.model or BASE for j in jobs]
        return out

    def _choose(self, jobs: list[Job]) -> None:
        inputs = self._inputs(jobs)
        extra = {"adapter_names": inputs["adapter_names"]} if "adapter_names" in inputs else {}
        logits = last_logits(self.model, inputs, **extra)
        for row, job in enumerate(jobs):
            try:
                if not torch.isfinite(logits[row]).all():
                    raise ValueError("the scores are not finite numbers")
                job.text = best_choice(logits[row], job.choices, self.tok)
            except Exception as e:  # noqa: BLE001 - this row's failure, not the batch's
                job.fail(RowFailed(f"generation failed for this request: {type(e).__name__}: {e}"))
                continue
            job.gen_ids = [0]  # one decision
            job.emit(len(job.text))
            job.done("stop")

    SCORE_TOKENS = 2048  # padded prompt tokens per scoring forward pass (bounds the logits' memory)

    def _score(self, jobs: list[Job]) -> None:
        """Prompt-token log-probabilities: token i given tokens < i, from one forward pass."""
        jobs = sorted(jobs, key=lambda j: len(j.prompt_ids))
        while jobs:
            n = 1
            while n < len(jobs) and (n + 1) * len(jobs[n].prompt_ids) <= self.SCORE_TOKENS:
                n += 1
            part, jobs = jobs[:n], jobs[n:]
            inputs = self._inputs(part, prefix=False)  # every position's logits: no prefix skipped
            inputs.pop("prefix_len")
            pos = positions(inputs["attention_mask"])
            logits = self.model(**inputs, position_ids=pos, use_cache=False).logits
            width = logits.shape[1]
            for row, job in enumerate(part):
                try:
                    m = len(job.prompt_ids)
                    lps = torch.log_softmax(logits[row, width - m:width - 1].float(), -1)
                    if not torch.isfinite(lps).all():
                        raise ValueError("the scores are not finite numbers")
                    for i, token in enumerate(job.prompt_ids[1:]):
                        record_logprobs(job, lps[i], token)
                except Exception as e:  # noqa: BLE001 - this row's failure, not the batch's
                    job.fail(RowFailed(f"scoring failed for this request: {type(e).__name__}: {e}"))
                    continue
                job.done("length")
            del logits

    def _generate(self, jobs: list[Job]) -> None:
        inputs = self._inputs(jobs)
        sampling = any(j.temperature > 0 for j in jobs)
        cfg = GenerationConfig(max_new_tokens=max(j.max_new_tokens for j in jobs), do_sample=sampling,
                               top_k=0 if sampling else None, top_p=1.0, temperature=1.0,
                               pad_token_id=self.pad_id,
                               eos_token_id=sorted(self.eos_ids))
        inputs.pop("prefix_len")
        control = RowControl(jobs, self.tok, self.eos_ids)
        logits = RowLogits(jobs, self.tok, inputs["input_ids"].shape[1], sampling, fallback_id=self.pad_id)
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

    @property
    def max_queue(self) -> int:
        return self.queue.maxsize
