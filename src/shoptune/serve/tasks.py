"""Structured task inputs for ``POST /v1/tasks/{task}``: schema, rendering, answer parsing.

A shop's own task takes its card's named ``inputs`` (the request schema is built from them) and
renders them through the card's prompt. A ShopBench task type has one input schema: the
structured input is rendered into the ShopBench question text (``input_field``) in ShopBench's
own layout (numbered options ``0.``, numbered candidates ``1.``), then through the task card's
prompt and the evaluation protocol, so a served question is byte-identical to an evaluated one.
``input_field`` itself is always accepted there too (the question text exactly as in the data
files), but not together with the structured fields.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from shoptune.records import Record
from shoptune.tasks import Plan, TaskCard, finish, parse_answer, plan_for


class _Input(BaseModel):
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


class MultipleChoiceInput(_Input):
    question: str | None = Field(default=None, min_length=1)
    options: list[str] | None = Field(default=None, min_length=2, max_length=10,
                                      description="Answer options; the answer is an index into them.")

    @model_validator(mode="after")
    def _one_form(self):
        if self.structured() and (self.question is None or self.options is None):
            raise ValueError("give `question` and `options`, or `input_field`")
        return self

    def render(self) -> str:
        if self.input_field is not None:
            return self.input_field
        opts = "".join(f"{i}. {o}\n" for i, o in enumerate(self.options))
        return f"{self.question}\n{opts}Answer: "


class YesNoInput(_Input):
    question: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self):
        if self.structured() and self.question is None:
            raise ValueError("give `question`, or `input_field`")
        return self

    def render(self) -> str:
        return self.input_field if self.input_field is not None else f"{self.question}\nAnswer: "


class CandidatesInput(_Input):
    question: str | None = Field(default=None, min_length=1, description=(
        "The instruction, e.g. the query and what to select; candidates are appended numbered from 1."))
    candidates: list[str] | None = Field(default=None, min_length=1, max_length=99)

    @model_validator(mode="after")
    def _one_form(self):
        if self.structured() and (self.question is None or self.candidates is None):
            raise ValueError("give `question` and `candidates`, or `input_field`")
        return self

    def render(self) -> str:
        if self.input_field is not None:
            return self.input_field
        cands = "".join(f"{i}. {c}\n" for i, c in enumerate(self.candidates, 1))
        return f"{self.question}\n{cands}Output: "


class RankingInput(CandidatesInput):
    candidates: list[str] | None = Field(default=None, min_length=2, max_length=5, description=(
        "Up to 5 candidates (ShopBench ranking answers are permutations of 1..5)."))


class EntityInput(_Input):
    text: str | None = Field(default=None, min_length=1, description="The query or text to tag.")
    entity_type: str | None = Field(default=None, min_length=1, description="e.g. 'product type', 'brand'.")

    @model_validator(mode="after")
    def _one_form(self):
        if self.structured() and (self.text is None or self.entity_type is None):
            raise ValueError("give `text` and `entity_type`, or `input_field`")
        return self

    def render(self) -> str:
        if self.input_field is not None:
            return self.input_field
        return ("You are a helpful online shop assistant and a linguist. A customer on an online "
                "shopping platform has made the following query. Please extract phrases from the "
                f"query that correspond to the entity type '{self.entity_type}'. \nPlease directly "
                "output the entity without repeating the entity type. If there are multiple such "
                "entities, separate them with comma. Do not give explanations. \n"
                f"Query: {self.text}\nOutput: ")


class GenerationInput(_Input):
    instruction: str | None = Field(default=None, min_length=1)
    input: str | None = Field(default=None, description="Optional input the instruction is about.")

    @model_validator(mode="after")
    def _one_form(self):
        if self.structured() and self.instruction is None:
            raise ValueError("give `instruction` (and optionally `input`), or `input_field`")
        return self

    def render(self) -> str:
        if self.input_field is not None:
            return self.input_field
        if self.input is None:
            return f"{self.instruction}\nOutput: "
        return f"Instructions: {self.instruction}\nInput: {self.input}\nOutput:"


_PY_TYPES = {"string": str, "number": float, "integer": int, "boolean": bool, "array": list[str]}
_OWN_MODELS: dict[tuple[str, int], type[BaseModel]] = {}


def _own_input_model(card: TaskCard) -> type[BaseModel]:
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


def input_model(card: TaskCard) -> type[BaseModel]:
    if card.own:
        return _own_input_model(card)
    if card.metric == "bool":
        return YesNoInput
    return {"multiple-choice": MultipleChoiceInput, "retrieval": CandidatesInput,
            "ranking": RankingInput, "named_entity_recognition": EntityInput,
            "generation": GenerationInput}[card.task_type]


@lru_cache(maxsize=None)
def _request_model(inp: type[BaseModel]) -> type[BaseModel]:
    from shoptune.serve.protocol import TaskRequest
    return create_model(f"{inp.__name__}Request", __base__=TaskRequest,
                        input=(inp, Field(description="The task's input fields.")))


def request_schema(card: TaskCard) -> dict:
    """JSON schema of the whole ``POST /v1/tasks/{task}`` body, ``{"model": ..., "input": {...}}``
    with the task's input model under ``input``."""
    schema = _request_model(input_model(card)).model_json_schema()
    schema["title"] = f"POST /v1/tasks/{card.name}"
    return schema


def to_record(card: TaskCard, inp: BaseModel) -> Record:
    if card.own:
        return card.record(inp.model_dump(), None, source="request")
    return Record(input_field=inp.render(), output_field=None, task_type=card.task_type,
                  metric=card.metric, task=card.name, capability=card.capability, source="request")


def plan(card: TaskCard, inp: BaseModel, rec: Record) -> Plan:
    p = plan_for(rec, card.max_new_tokens)
    if isinstance(inp, RankingInput) and inp.candidates is not None:
        n = len(inp.candidates)  # a permutation of exactly the given candidates
        p = replace(p, max_value=n, count=n)
    elif isinstance(inp, CandidatesInput) and inp.candidates is not None:
        n = len(inp.candidates)  # the given candidates only (a candidate's text may hold "7. ")
        p = replace(p, max_value=n, count=min(3, n), values=tuple(range(1, n + 1)))
    elif isinstance(inp, MultipleChoiceInput) and inp.options is not None:
        p = replace(p, choices=tuple(str(i) for i in range(len(inp.options))))
    return p


def answer(card: TaskCard, inp: BaseModel, raw: str, p: Plan) -> dict:
    """The parsed answer (the evaluator's parsers) plus readable extras."""
    text = finish(raw, p)
    value = parse_answer(card.task_type, card.metric, text, card.name)
    out: dict = {"answer": value, "raw": text}
    if isinstance(inp, MultipleChoiceInput) and inp.options and isinstance(value, int) \
            and 0 <= value < len(inp.options):
        out["answer_text"] = inp.options[value]
    if isinstance(inp, CandidatesInput) and inp.candidates and isinstance(value, list):
        out["answer_items"] = [inp.candidates[i - 1] for i in value if 1 <= i <= len(inp.candidates)]
    return out
