"""Where model outputs come from: a local transformers model, or any OpenAI-compatible server.

Both backends get the same per-question :class:`Plan`, decided by the task type:

* multiple choice: the answer is the highest-scoring *valid option token* after one forward pass
  (options found in the prompt; yes/no for EC-Guide's bool metric), no sampling loop at all;
* retrieval / ranking: only digit/comma/space tokens may be generated, short limit, stop at "\\n";
* NER: short limit, stop at "\\n"; generation: the task's own length limit (BLEU/ROUGE-L tasks stop
  at "\\n", since BLEU scores the first line only).
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from shoptune.data.loaders import option_numbers
from shoptune.records import Record

STARTER_KIT_PREFIX = ("You are a helpful online shopping assistant. Please answer the following "
                      "question about online shopping and follow the given instructions.\n\n")
_LIST_RE = re.compile(r"^\s*(\d+)\.", re.MULTILINE)
GEN_LIMITS = {"rougel": 32, "bleu": 64, "jp-bleu": 64}  # others: 100, as the starter kit


@dataclass(frozen=True)
class Plan:
    kind: str  # "choice" or "generate"
    choices: tuple[str, ...] = ()
    max_new_tokens: int = 100
    numeric: bool = False
    stop_newline: bool = False
    max_value: int = 99  # numeric answers: the largest valid number
    count: int = 3  # numeric answers: how many numbers
    unique: bool = False


def plan_for(rec: Record, max_new_tokens: int | None = None) -> Plan:
    if rec.task_type == "multiple-choice":
        if rec.metric == "bool":
            return Plan("choice", ("yes", "no"))
        opts = option_numbers(rec.input_field)
        return Plan("choice", tuple(str(o) for o in opts if o < 10) or tuple("0123456789"))
    if rec.task_type in ("retrieval", "ranking"):
        listed = option_numbers(rec.input_field) or [int(n) for n in _LIST_RE.findall(rec.input_field)]
        ranking = rec.task_type == "ranking"
        return Plan("generate", max_new_tokens=max_new_tokens or 16, numeric=True, stop_newline=True,
                    max_value=5 if ranking else max(listed, default=99), count=5 if ranking else 3,
                    unique=ranking)
    if rec.task_type == "named_entity_recognition":
        return Plan("generate", max_new_tokens=max_new_tokens or 32, stop_newline=True)
    limit = max_new_tokens or GEN_LIMITS.get(rec.metric, 100)
    return Plan("generate", max_new_tokens=limit, stop_newline=rec.metric in GEN_LIMITS)


def finish(text: str, plan: Plan) -> str:
    """Single-line answers: leading blank lines dropped, cut at the first line end."""
    return text.strip().split("\n", 1)[0] if plan.stop_newline else text


# ----------------------------------------------------------------------------- local

class NumberListProcessor:
    """Logits processor for retrieval/ranking answers: only "n, n, n" lists of valid numbers.

    Numbers stay within 1..``max_value`` (the prompt's numbered list); ranking answers are a
    permutation (no number twice). After ``count`` numbers the answer may only end. The output
    is still parsed by the unchanged rules; this only keeps the model on the answer format.
    """

    def __init__(self, tok, prompt_len: int, max_value: int, count: int, unique: bool):
        self.tok, self.prompt_len = tok, prompt_len
        self.max_value, self.count, self.unique = max_value, count, unique
        self.digit = {str(d): tok.convert_tokens_to_ids(str(d)) for d in range(10)}
        self.comma = tok.encode(",", add_special_tokens=False)[0]
        self.space = tok.encode(" ", add_special_tokens=False)[0]
        self.end = [tok.eos_token_id] + tok.encode("\n", add_special_tokens=False)

    def allowed(self, text: str) -> list[int]:
        nums = re.findall(r"\d+", text)
        if text and text[-1].isdigit():
            part = nums[-1]
            ids = [t for d, t in self.digit.items() if int(part + d) <= self.max_value
                   and not (self.unique and str(int(part + d)) in nums[:-1])]
            more = len(nums) < min(self.count, self.max_value)
            return ids + ([self.comma] if more else []) + ([] if more else self.end)
        if text.endswith(","):
            return [self.space]
        used = set(nums) if self.unique else set()
        return [t for d, t in self.digit.items() if d != "0" and int(d) <= self.max_value
                and d not in used] or self.end

    def __call__(self, input_ids, scores):
        mask = torch.full_like(scores, -math.inf)
        for row in range(input_ids.shape[0]):
            text = self.tok.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)
            mask[row, self.allowed(text)] = 0
        return scores + mask


class StopAtLineEnd:
    """Stopping criterion: a row is done once a newline follows some content."""

    def __init__(self, tok, prompt_len: int):
        self.tok, self.prompt_len = tok, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tok.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], device=input_ids.device)


def _choice_token_ids(tok, choice: str) -> list[int]:
    ids = set()
    for variant in (choice, " " + choice, choice.capitalize(), " " + choice.capitalize()):
        enc = tok.encode(variant, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
        elif enc:  # multi-token word: its first token stands for it
            ids.add(enc[0])
    return sorted(ids)


def best_choice(logits: torch.Tensor, choices: Sequence[str], tok) -> str:
    """The option whose token(s) score highest in one position's logits."""
    return max(choices, key=lambda c: max(logits[t].item() for t in _choice_token_ids(tok, c)))


class LocalBackend:
    """Batched, length-sorted generation with a transformers model on this machine."""

    def __init__(self, model, tokenizer, *, batch_size: int = 16):
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self.tok.padding_side = "left"

    def _batches(self, idx: list[int], prompts: Sequence[str]):
        lengths = {i: len(self.tok.encode(prompts[i], add_special_tokens=False)) for i in idx}
        idx = sorted(idx, key=lambda i: lengths[i])
        for k in range(0, len(idx), self.batch_size):
            yield idx[k:k + self.batch_size]

    def _encode(self, texts):
        enc = self.tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in enc.items()}

    @torch.inference_mode()
    def _choose(self, batch, prompts, plans) -> list[str]:
        enc = self._encode([prompts[i] for i in batch])
        # Only the last position's logits are needed: skips the 49k-vocab head elsewhere (-18%).
        logits = self.model(**enc, logits_to_keep=1).logits[:, -1, :].float()
        return [best_choice(logits[row], plans[i].choices, self.tok) for row, i in enumerate(batch)]

    @torch.inference_mode()
    def _generate(self, batch, prompts, plan: Plan) -> list[str]:
        enc = self._encode([prompts[i] for i in batch])
        kwargs = dict(max_new_tokens=plan.max_new_tokens, do_sample=False,
                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        n = enc["input_ids"].shape[1]
        if plan.numeric:
            from transformers import LogitsProcessorList
            kwargs["logits_processor"] = LogitsProcessorList([NumberListProcessor(
                self.tok, n, plan.max_value, plan.count, plan.unique)])
        if plan.stop_newline:
            from transformers import StoppingCriteriaList
            kwargs["stopping_criteria"] = StoppingCriteriaList([StopAtLineEnd(self.tok, n)])
        gen = self.model.generate(**enc, **kwargs)
        texts = self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [finish(t, plan) for t in texts]

    def run(self, prompts: Sequence[str], plans: Sequence[Plan],
            progress: Callable[[int], None] | None = None) -> list[str]:
        outputs: list[str | None] = [None] * len(prompts)
        groups: dict[Plan | str, list[int]] = defaultdict(list)
        for i, p in enumerate(plans):
            groups["choice" if p.kind == "choice" else p].append(i)
        for key, idx in groups.items():
            for batch in self._batches(idx, prompts):
                if key == "choice":
                    texts = self._choose(batch, prompts, plans)
                else:
                    texts = self._generate(batch, prompts, key)
                for i, t in zip(batch, texts):
                    outputs[i] = t
                if progress:
                    progress(len(batch))
        return outputs  # type: ignore[return-value]


# ----------------------------------------------------------------------------- openai

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
        r = self.client.post(f"/tasks/{rec.task}", cast_to=object,
                             body={"model": self.model, "input": {"input_field": rec.input_field}})
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
        served = self.served_tasks() if records is not None else set()
        via_task = [records is not None and records[i].task in served for i in range(len(prompts))]
        self.tasks_used = sum(via_task)

        def work(i):
            out = self._task(records[i], plans[i]) if via_task[i] else self._one(prompts[i], plans[i])
            if progress:
                progress(1)
            return out

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(work, range(len(prompts))))


# ----------------------------------------------------------------------------- prompts

PROTOCOLS = ("starter-kit", "chat", "fewshot")


def build_prompts(records: Sequence[Record], protocol: str, tokenizer=None,
                  render: Callable[[Record], str] | None = None) -> list[str]:
    """The text each question is sent as.

    starter-kit: the KDD Cup prefix + question (no chat template). chat: the tokenizer's chat
    template with the prefix as system message. fewshot: starter-kit with one solved question of
    the same task (another question of the evaluated set) in front.
    """
    render = render or (lambda r: r.input_field)
    if protocol == "starter-kit":
        return [STARTER_KIT_PREFIX + render(r) for r in records]
    if protocol == "chat":
        if tokenizer is None:
            return [render(r) for r in records]
        return [tokenizer.apply_chat_template(
            [{"role": "system", "content": STARTER_KIT_PREFIX.strip()},
             {"role": "user", "content": render(r)}], tokenize=False, add_generation_prompt=True)
            for r in records]
    if protocol == "fewshot":
        by_task: dict[str, list[Record]] = defaultdict(list)
        for r in records:
            by_task[r.task].append(r)
        out = []
        for r in records:
            others = [o for o in by_task[r.task] if o.id != r.id]
            shot = ""
            if others:
                o = others[0]
                gold = o.output_field if isinstance(o.output_field, str) else \
                    ", ".join(map(str, o.output_field)) if isinstance(o.output_field, list) else str(o.output_field)
                shot = render(o) + gold + "\n\n"
            out.append(STARTER_KIT_PREFIX + shot + render(r))
        return out
    raise ValueError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
