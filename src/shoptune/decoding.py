"""One decoding core for training, evaluation and serving: prompts, plans and constraints.

* :func:`build_prompts`: the text a question is sent as, by protocol (starter-kit, chat,
  fewshot), each question rendered through its task card's ``prompt``;
* :class:`Plan` / :func:`plan_for`: how a question is decoded, by task type (and the card's
  ``max_new_tokens``):

  - multiple choice: the answer is the highest-scoring *valid option token* after one forward
    pass (:func:`best_choice`; options found in the prompt, yes/no for EC-Guide's bool metric);
  - retrieval / ranking: only digit/comma/space tokens may be generated
    (:class:`NumberListProcessor`), short limit, stop at "\\n";
  - NER: short limit, stop at "\\n"; generation: the task's own length limit (BLEU/ROUGE-L
    tasks stop at "\\n", since BLEU scores the first line only).

``shoptune eval`` (``eval.backends.LocalBackend``), the serving engine (``serve.engine``), its
task endpoint and the gateway (``serve.upstream``), and training's prompt formatting all take
these from here, so a question is asked and constrained the same way everywhere.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from shoptune.data.loaders import option_numbers
from shoptune.records import Record
from shoptune.tasks import find_card


def card_render(rec: Record) -> str:
    """The question as the model sees it: the task card's prompt around ``input_field``."""
    card = find_card(rec.task)
    return card.render(rec.input_field) if card else rec.input_field


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
    """How a question is decoded; ``max_new_tokens`` defaults to the task card's, then the task
    type's."""
    card = find_card(rec.task)
    max_new_tokens = max_new_tokens or (card.max_new_tokens if card else None)
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


def choice_token_ids(tok, choice: str) -> list[int]:
    """The tokens that stand for an option: the word with and without a leading space, as is
    and capitalised (a multi-token word by its first token)."""
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
    return max(choices, key=lambda c: max(logits[t].item() for t in choice_token_ids(tok, c)))


# ----------------------------------------------------------------------------- prompts

PROTOCOLS = ("starter-kit", "chat", "fewshot")


def build_prompts(records: Sequence[Record], protocol: str, tokenizer=None,
                  render: Callable[[Record], str] | None = None) -> list[str]:
    """The text each question is sent as.

    Each question is rendered through its task card's ``prompt`` (the same text at training,
    evaluation and serving time); a record of a task without a card is its ``input_field``.
    starter-kit: the KDD Cup prefix + question (no chat template). chat: the tokenizer's chat
    template with the prefix as system message. fewshot: starter-kit with one solved question of
    the same task (another question of the evaluated set) in front.
    """
    render = render or card_render
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
