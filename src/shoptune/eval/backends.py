"""Where model outputs come from: a local transformers model, or any OpenAI-compatible server.

Both backends get the same per-question :class:`~shoptune.decoding.Plan` (see
:mod:`shoptune.decoding`: prompts, plans and constraints are shared with training and serving).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from shoptune.decoding import (GrammarProcessor, NumberListProcessor, PrefixCache, StopAtLineEnd, best_choice,
                               last_logits)
from shoptune.tasks import Plan, finish
from shoptune.records import Record


class _RowProgress:
    """A stopping criterion that stops nothing: it moves the progress bar inside a generation
    batch. A row counts as answered once it has produced EOS (or the padding finished rows get);
    a row still running counts up to 0.9 with its tokens. Steps of 1/64 add up exactly, so the
    bar ends on the whole number of questions."""

    def __init__(self, n_rows: int, prompt_len: int, max_new: int, end_ids, progress):
        self.shown = [0.0] * n_rows
        self.prompt_len, self.max_new, self.progress = prompt_len, max(1, max_new), progress
        self.end_ids = {int(i) for i in end_ids if i is not None}

    def __call__(self, input_ids, scores, **kwargs):
        step = input_ids.shape[1] - self.prompt_len
        running = min(57, (64 * step) // self.max_new) / 64  # (57/64 ~ 0.9)
        delta = 0.0
        for r, tid in enumerate(input_ids[:, -1].tolist()):
            target = 1.0 if tid in self.end_ids else running
            if target > self.shown[r]:
                delta += target - self.shown[r]
                self.shown[r] = target
        if delta:
            self.progress(delta)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def finish(self) -> None:
        rest = len(self.shown) - sum(self.shown)
        if rest:
            self.progress(rest)


class LocalBackend:
    """Batched, length-sorted generation with a transformers model on this machine.

    ``prefix_cache``: the prompts' shared prefix (the protocol's preamble, at least) is run once
    per :meth:`run` and its KV reused by every batch (:class:`~shoptune.decoding.PrefixCache`;
    a fresh cache each run, so a model trained in between is never answered with stale KV).

    ``compile``: the model's decoder layers are compiled in place (:mod:`shoptune.compiling`;
    every forward, generation's KV-cache steps included, runs through them).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, prefix_cache: bool = False,
                 compile: bool = False):
        if compile:
            from shoptune.compiling import compile_layers
            compile_layers(model, inference=True)
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.tok.padding_side = "left"
        self.prefix_cache = prefix_cache
        self._cache: PrefixCache | None = None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _batches(self, idx: list[int], prompts: Sequence[str]):
        lengths = {i: len(self.tok.encode(prompts[i], add_special_tokens=False)) for i in idx}
        idx = sorted(idx, key=lambda i: lengths[i])
        for k in range(0, len(idx), self.batch_size):
            yield idx[k:k + self.batch_size]

    def _encode(self, texts):
        if self._cache is not None:
            rows = [self.tok.encode(t, add_special_tokens=False) for t in texts]
            return self._cache.inputs(self.model, rows, self.pad_id)
        enc = self.tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    @torch.inference_mode()
    def _choose(self, batch, prompts, plans) -> list[str]:
        enc = self._encode([prompts[i] for i in batch])
        if "past_key_values" in enc:
            logits = last_logits(self.model, enc)
        else:
            # Only the last position's logits are needed: skips the 49k-vocab head elsewhere (-18%).
            logits = self.model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1, :].float()
        return [best_choice(logits[row], plans[i].choices, self.tok) for row, i in enumerate(batch)]

    @torch.inference_mode()
    def _generate(self, batch, prompts, plan: Plan, progress=None) -> list[str]:
        from transformers import StoppingCriteriaList
        enc = self._encode([prompts[i] for i in batch])
        enc.pop("prefix_len", None)
        kwargs = dict(max_new_tokens=plan.max_new_tokens, do_sample=False,
                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        n = enc["input_ids"].shape[1]
        if plan.numeric:
            from transformers import LogitsProcessorList
            kwargs["logits_processor"] = LogitsProcessorList([NumberListProcessor(
                self.tok, n, plan.max_value, plan.count, plan.unique, plan.values)])
        elif plan.grammar is not None:  # an own task's label or JSON
            from transformers import LogitsProcessorList
            kwargs["logits_processor"] = LogitsProcessorList([GrammarProcessor(
                self.tok, [plan.grammar] * len(batch), n)])
        stops = [StopAtLineEnd(self.tok, n)] if plan.stop_newline else []
        rows = _RowProgress(len(batch), n, plan.max_new_tokens, (self.tok.eos_token_id, self.pad_id),
                            progress) if progress else None
        if stops or rows:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stops + ([rows] if rows else []))
        gen = self.model.generate(**enc, **kwargs)
        if rows:
            rows.finish()
        texts = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [finish(t, plan) for t in texts]

    def run(self, prompts: Sequence[str], plans: Sequence[Plan],
            progress: Callable[[int], None] | None = None) -> list[str]:
        outputs: list[str | None] = [None] * len(prompts)
        self._cache = PrefixCache() if self.prefix_cache else None
        groups: dict[Plan | str, list[int]] = defaultdict(list)
        for i, p in enumerate(plans):
            groups["choice" if p.kind == "choice" else p].append(i)
        for key, idx in groups.items():
            for batch in self._batches(idx, prompts):
                if key == "choice":  # (one forward pass for the whole batch)
                    texts = self._choose(batch, prompts, plans)
                    if progress:
                        progress(len(batch))
                else:  # the bar moves as rows finish inside the batch
                    texts = self._generate(batch, prompts, key, progress)
                for i, t in zip(batch, texts):
                    outputs[i] = t
        self.prefix_stats = self._cache.stats() if self._cache is not None else None
        self._cache = None
        return outputs  # type: ignore[return-value]


# ----------------------------------------------------------------------------- openai

class BackendError(RuntimeError):
    """The server cannot be reached, or refuses the requests (401, 404, ...): one line naming
    it; the evaluation stops at the first such error (the other questions are not sent)."""


def _server_error(e: Exception, base_url: str) -> BackendError:
    import openai
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e.__context__
        why = " ".join(str(cause).split()) if cause is not None and str(cause) else type(e).__name__
        kind = "timed out" if isinstance(e, openai.APITimeoutError) else "cannot connect"
        return BackendError(f"--base-url {base_url}: {kind} ({why})")
    msg = " ".join(str(getattr(e, "message", None) or e).split())[:300]
    return BackendError(f"--base-url {base_url}: the server answered {e.status_code}: {msg}")


class OpenAIBackend:
    """Any OpenAI-compatible server (vLLM, shoptune serve, a hosted API), requests in parallel.

    Multiple choice asks for one token at temperature 0; with ``guided=True`` it also sends vLLM's
    ``guided_choice`` so the server can only answer a valid option. When the server is shoptune's
    (built-in engine or a gateway to vLLM / llama.cpp: it lists ``/v1/tasks`` and builds task
    prompts with the same protocol), questions of the tasks it serves go to its task endpoint
    instead: the server applies the evaluator's constrained decoding (valid option tokens,
    number lists, line ends) whatever engine decodes.
    """

    def __init__(self, model: str, *, base_url: str, api_key: str = "EMPTY", concurrency: int = 16,
                 chat: bool = False, guided: bool = False, timeout: float = 120.0,
                 protocol: str | None = None, task_endpoint: bool = True):
        from openai import OpenAI
        self.base_url = base_url
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=3)
        self.model, self.concurrency, self.chat, self.guided = model, concurrency, chat, guided
        self.protocol = protocol or ("chat" if chat else "starter-kit")
        self.task_endpoint = task_endpoint
        self.tasks_used = 0  # questions answered through the task endpoint (reported by the runner)

    def served_tasks(self) -> set[str]:
        """Tasks whose ``/v1/tasks/{task}`` builds the same prompt as this evaluation; empty when
        the server has no task endpoint or builds task prompts with another protocol."""
        import logging

        import openai
        if not self.task_endpoint or self.protocol == "fewshot":
            return set()
        try:
            listing = self.client.get("/tasks", cast_to=object)
        except (openai.NotFoundError, openai.UnprocessableEntityError, openai.BadRequestError):
            return set()
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            return set()
        if listing.get("protocol") != self.protocol:
            logging.getLogger("shoptune.eval").warning(
                "the server builds task prompts with protocol %r, this evaluation uses %r: "
                "asking plain completions (no constrained decoding)", listing.get("protocol"), self.protocol)
            return set()
        return {t.get("id") for t in listing["data"] if isinstance(t, dict)}

    def _task(self, rec: Record, plan: Plan) -> str:
        body = {"input": rec.inputs if rec.inputs is not None else {"input_field": rec.input_field}}
        if self.model is not None:  # (None: the server routes each task to its own adapter)
            body["model"] = self.model
        r = self.client.post(f"/tasks/{rec.task}", cast_to=object, body=body)
        return finish(r.get("raw") or "", plan)

    def _one(self, prompt: str, plan: Plan) -> str:
        max_tokens = 1 if plan.kind == "choice" else plan.max_new_tokens
        extra = {"guided_choice": list(plan.choices)} if plan.kind == "choice" and self.guided else None
        stop = ["\n"] if plan.stop_newline else None
        if self.chat:
            r = self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0,
                max_tokens=max_tokens, stop=stop, extra_body=extra)
            text = r.choices[0].message.content or ""
        else:
            r = self.client.completions.create(model=self.model, prompt=prompt, temperature=0,
                                               max_tokens=max_tokens, stop=stop, extra_body=extra)
            text = r.choices[0].text or ""
        return finish(text, plan)

    def run(self, prompts: Sequence[str], plans: Sequence[Plan],
            progress: Callable[[int], None] | None = None,
            records: Sequence[Record] | None = None) -> list[str]:
        """Every prompt's answer; :class:`BackendError` at the first connection failure or
        error status (after the client's retries)."""
        import openai
        try:
            return self._run(prompts, plans, progress, records)
        except (openai.APIConnectionError, openai.APIStatusError) as e:
            raise _server_error(e, self.base_url) from None

    def _run(self, prompts, plans, progress, records) -> list[str]:
        served = self.served_tasks() if records is not None else set()
        via_task = [records is not None and records[i].task in served for i in range(len(prompts))]
        self.tasks_used = sum(via_task)

        def work(i):
            out = self._task(records[i], plans[i]) if via_task[i] else self._one(prompts[i], plans[i])
            if progress:
                progress(1)
            return out

        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = [pool.submit(work, i) for i in range(len(prompts))]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:  # stop at the first failure: do not send the rest
                    f.cancel()
                raise
