"""``POST /v1/tasks/{task}``: the request's ``input`` -> a record -> a plan -> the parsed answer,
all asked of the task (its card and output type, :mod:`shoptune.tasks.outputs`).

A shop's own task takes its card's named ``inputs`` (the request schema is built from them) and
renders them through the card's prompt. A ShopBench task type has one structured input (its
output module's ``input_model``), rendered into the ShopBench question text (``input_field``) in
ShopBench's own layout (numbered options ``0.``, numbered candidates ``1.``), then through the
task card's prompt and the evaluation protocol, so a served question is byte-identical to an
evaluated one. ``input_field`` itself is accepted there too (the question text exactly as in the
data files), but not together with the structured fields.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, Field, create_model

from shoptune.records import Record
from shoptune.tasks import Plan, TaskCard, finish, parse_answer, plan_for
from shoptune.tasks.outputs import own_input_model


def input_model(card: TaskCard) -> type[BaseModel]:
    return own_input_model(card) if card.own else card.output_type.input_model(card)


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
    return p if card.own else card.output_type.request_plan(p, inp)


def answer(card: TaskCard, inp: BaseModel, raw: str, p: Plan) -> dict:
    """The parsed answer (the evaluator's parsers) plus readable extras."""
    text = finish(raw, p)
    value = parse_answer(card.task_type, card.metric, text, card.name)
    extras = {} if card.own else card.output_type.answer_extras(inp, value)
    return {"answer": value, "raw": text, **extras}
