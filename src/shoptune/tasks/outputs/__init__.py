"""Output types: what a task's answer is, in one small module each.

An output type says, for every task whose card names it (``output:``):

* what the model is trained to write (:meth:`OutputType.answer_text`),
* which gold values are valid, and how a user's cell becomes one (:meth:`check_gold`,
  :meth:`coerce`),
* how a question is decoded (:meth:`plan`: one-token choice, or generation under a constraint),
* how the model's text is parsed back (:meth:`parse`; ShopBench's types use the starter kit's
  parsers exactly), and which metrics fit (``metrics``, the first is the default),
* the JSON schema of the served answer (:meth:`answer_schema`).

The types: ``multiple-choice`` (ShopBench's numbered options; with metric ``bool``, EC-Guide's
yes/no), ``retrieval``, ``ranking``, ``named_entity_recognition``, ``generation`` (alias
``text``), and for a shop's own tasks ``label`` (one of ``labels``), ``labels`` (a subset of
them), ``json`` (an object valid against the card's JSON ``schema``) and ``number``.

A constraint is one GBNF grammar (:class:`Grammar`, written by :mod:`shoptune.tasks.gbnf`: one
of these labels, or JSON valid against this schema), the same text for every engine, so the
built-in engine (llguidance), llama.cpp and vLLM allow exactly the same answers.
"""
from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

GEN_LIMITS = {"rougel": 32, "bleu": 64, "jp-bleu": 64}  # generation, others: 100 (starter kit)
_LIST_RE = re.compile(r"^\s*(\d+)\.", re.MULTILINE)
# A numbered line ("12. ...") of a multiple-choice, retrieval or ranking question may start with at
# most this many digits: list numbers are written out as answers (retrieval: 3 of them, one token
# per digit, about 125 tokens at this length), and Python's int() refuses more than 4,300 digits.
MAX_LIST_DIGITS = 40


class PlanError(ValueError):
    """A question that cannot be decoded as its task type asks (one sentence, naming the line)."""


class GoldError(ValueError):
    """A user's value that cannot be this task's gold answer (the message says why)."""


@dataclass(frozen=True)
class Grammar:
    """An answer constraint as one GBNF grammar (:mod:`shoptune.tasks.gbnf`), the same text for
    every engine: the built-in engine compiles it with llguidance, llama.cpp takes it as
    ``grammar``, vLLM as ``structured_outputs.grammar``. Hashable: batches group by it."""
    gbnf: str


@dataclass(frozen=True)
class Plan:
    """How one question is decoded: ``choice`` (one forward pass, the best valid option token)
    or ``generate`` (up to ``max_new_tokens``, under ``numeric`` (number lists) or ``grammar``)."""
    kind: str  # "choice" or "generate"
    choices: tuple[str, ...] = ()
    max_new_tokens: int = 100
    numeric: bool = False
    stop_newline: bool = False
    max_value: int = 99  # numeric answers: the largest valid number
    count: int = 3  # numeric answers: how many numbers
    unique: bool = False
    values: tuple[int, ...] = ()  # numeric answers: exactly these numbers (empty: 1..max_value)
    grammar: Grammar | None = None  # own tasks' answers: a label or JSON, enforced by every engine


def check_list_numbers(text: str) -> None:
    """Raise :class:`PlanError` when a numbered line starts with more than ``MAX_LIST_DIGITS``
    digits."""
    for m in _LIST_RE.finditer(text):
        if len(m[1]) > MAX_LIST_DIGITS:
            line = text.count("\n", 0, m.start(1)) + 1
            raise PlanError(f"line {line} starts with a {len(m[1])}-digit number; numbered lines "
                            f"(options, candidates) may start with at most {MAX_LIST_DIGITS} digits")


def finish(text: str, plan: Plan) -> str:
    """Single-line answers: the first non-blank line, stripped (the same answer whether the
    generation stopped at the line end or ran past it; the parsers strip anyway)."""
    return text.strip().split("\n", 1)[0].strip() if plan.stop_newline else text


class OutputType:
    """One kind of answer. Subclasses set ``name`` and ``metrics`` and override what differs;
    ``card`` is the task's card (None for rows of a task without one)."""
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...]]  # the metrics that fit, the first is the default
    default_metrics: ClassVar[tuple[str, ...] | None] = None  # None: (metrics[0],)
    own: ClassVar[bool] = False  # a shop's own kind (label, labels, json, number): needs its card

    def defaults(self) -> tuple[str, ...]:
        return self.default_metrics or self.metrics[:1]

    def check_card(self, card) -> list[tuple[str, str]]:
        """(card key, problem) for a card of this type."""
        return []

    def coerce(self, value: Any, card) -> Any:
        """A user's cell (CSV text or a JSON value) as this type's gold; :class:`GoldError`."""
        return value

    def check_gold(self, gold: Any, input_text: str, card, metric: str) -> list[tuple[str, str]]:
        """(field, problem) for every way ``gold`` breaks this type's rules."""
        return []

    def answer_text(self, gold: Any, metric: str, card) -> str:
        """What the model is trained to write for ``gold``."""
        return str(gold).strip()

    def plan(self, input_text: str, metric: str, card, max_new_tokens: int | None) -> Plan:
        raise NotImplementedError

    def parse(self, text: str, metric: str, card) -> Any:
        raise NotImplementedError

    def answer_schema(self, card) -> dict:
        """JSON schema of the parsed answer the task endpoint returns."""
        return {}

    def input_model(self, card) -> type[BaseModel]:
        """The request ``input`` of ``POST /v1/tasks/{task}`` (an own task: its card's inputs)."""
        return own_input_model(card)

    def request_plan(self, plan: Plan, inp: BaseModel) -> Plan:
        """The plan for a request's structured input (e.g. exactly its listed candidates)."""
        return plan

    def answer_extras(self, inp: BaseModel, value: Any) -> dict:
        """Readable extras of a served answer (the chosen option's text, ...)."""
        return {}

    def prompt_hint(self, card) -> str:
        """The instruction a new card's default prompt ends with (``shoptune tasks new``)."""
        return "Answer:"


class QuestionInput(BaseModel):
    """A ShopBench task type's structured request input: its fields, or the question text as in
    the data files (``input_field``), not both; :meth:`render` gives the question text."""
    model_config = ConfigDict(extra="forbid")
    input_field: str | None = Field(default=None, min_length=1, description=(
        "The question text exactly as in ShopBench/EC-Guide files (instead of the structured fields)."))

    def structured(self) -> bool:
        return self.input_field is None

    @model_validator(mode="after")
    def _not_both(self):
        given = sorted(k for k in self.model_fields_set - {"input_field"} if getattr(self, k) is not None)
        if self.input_field is not None and given:
            raise ValueError(f"give `input_field` or the structured fields, not both (got "
                             f"`input_field` and {', '.join(f'`{k}`' for k in given)})")
        return self


_PY_TYPES = {"string": str, "number": float, "integer": int, "boolean": bool, "array": list[str]}
_OWN_MODELS: dict[tuple[str, int], type[BaseModel]] = {}


def own_input_model(card) -> type[BaseModel]:
    """The request ``input`` of an own task: its card's inputs, each required."""
    key = (card.name, id(card))
    if key not in _OWN_MODELS:
        fields = {}
        for f in card.input_fields:
            extra = {"min_length": 1} if f.type == "string" else {}
            fields[f.name] = (_PY_TYPES[f.type], Field(description=f.description or None, **extra))
        _OWN_MODELS[key] = create_model(
            f"{''.join(w.title() for w in card.name.split('_'))}Input",
            __config__=ConfigDict(extra="forbid", strict=True), **fields)
    return _OWN_MODELS[key]


OUTPUTS: dict[str, OutputType] = {}


def register(cls: type[OutputType]) -> type[OutputType]:
    inst = cls()
    for name in (cls.name, *cls.aliases):
        OUTPUTS[name] = inst
    return cls


def output_type(name: str) -> OutputType:
    """The output type called ``name`` (or an alias: ``text`` is ``generation``)."""
    try:
        return OUTPUTS[name]
    except KeyError:
        raise KeyError(f"unknown output type {name!r}; one of {', '.join(output_names())}") from None


def output_names() -> list[str]:
    return list(dict.fromkeys(o.name for o in OUTPUTS.values()))


def output_for(task_type: str, metric: str) -> OutputType:
    """The type of a record: multiple choice with EC-Guide's ``bool`` metric is yes/no."""
    if metric == "bool" and task_type == "multiple-choice":
        from shoptune.tasks.outputs.choice import YES_NO
        return YES_NO
    return output_type(task_type)


for _module in ("choice", "numbers", "entities", "text", "label", "structured", "number"):
    importlib.import_module(f"{__name__}.{_module}")  # each registers its types
