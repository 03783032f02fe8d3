"""The task card: the one description of a task (a small versioned YAML file).

A card names the task's capability, its named ``inputs`` (the prompt is a template over them),
its ``output`` type (see :mod:`shoptune.tasks.outputs`) with ``labels`` or a JSON ``schema``
where the type needs them, its ``metric`` (or metrics; the first is the task's score), and its
``source``: the data file(s) and how their columns map to the card's fields. A ShopBench or
EC-Guide card has one input, ``input_field`` (the question text as in the data files), and names
the dataset file its rows come from.

A shop's own card, as ``shoptune tasks new`` writes it::

    name: product_category
    version: 1
    capability: concept_understanding
    description: Put a product title into the shop's category tree.
    inputs:
    - {name: title, type: string, description: The product title.}
    output: label
    labels: [Electronics, Grocery, Home & Kitchen]
    metric: [accuracy, macro f1]
    prompt: |-
      Title: {title}
      Answer with exactly one of: {labels}.
      Answer:
    source:
      files: [products.csv]            # relative to this card's folder
      columns: {title: product_title, output: category}
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from shoptune.records import CAPABILITIES, Record
from shoptune.tasks.outputs import OutputType, output_for, output_names, output_type

Capability = Literal[CAPABILITIES]  # type: ignore[valid-type]
INPUT_TYPES = ("string", "number", "integer", "boolean", "array")
LEGACY_INPUT = "input_field"  # ShopBench's question text: the one input of the shipped cards
OUTPUT_COLUMN = "output"  # source.columns key of the gold answer's column
PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class InputField(BaseModel):
    """One named input of a task: a column of its data, a field of its request."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    type: Literal[INPUT_TYPES] = "string"  # type: ignore[valid-type]
    description: str = ""

    def json_schema(self) -> dict:
        s: dict = {"type": self.type} if self.type != "array" else {"type": "array", "items": {"type": "string"}}
        if self.type == "string":
            s["minLength"] = 1
        if self.description:
            s["description"] = self.description
        return s


class CardSource(BaseModel):
    """Where a task's rows live: a shipped dataset's file (``dataset`` + ``file``, rows picked out
    of a shared file by ``task_name`` / ``task_type`` / ``metric``), or a shop's own ``files``
    (relative to the card's folder) with their ``columns`` (card field -> the file's column;
    ``output`` names the gold answer's column; unmapped fields are read from a column of the same
    name)."""
    model_config = ConfigDict(extra="forbid")
    dataset: Literal["shopbench", "ec-guide", "shopping-mmlu", "custom"] | None = None
    file: str | None = None  # path inside the dataset folder
    task_name: str | None = None  # ShopBench task_name (task1..task18)
    task_type: str | None = None  # select rows of a mixed file by type ...
    metric: str | None = None  # ... and/or metric
    files: list[str] = []
    columns: dict[str, str] = {}


class TaskCard(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=NAME_PATTERN, max_length=64)
    version: int = Field(ge=1)
    capability: Capability
    description: str
    inputs: list[InputField] | None = None  # None: one input, ShopBench's `input_field`
    output: str
    labels: list[str] | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    metric_: str | list[str] | None = Field(default=None, alias="metric")
    source: CardSource = CardSource()
    # The prompt the model sees, identical at training, evaluation and serving time: a template
    # over the inputs ({title}); {labels} is the label list. Shipped cards: "{input_field}".
    prompt: str = "{" + LEGACY_INPUT + "}"
    max_new_tokens: int | None = Field(default=None, ge=1, le=4096)  # None: the output type's
    tags: list[str] = []
    _path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _legacy_task_type(cls, data):
        """``task_type:`` (cards before 0.x) is ``output:``."""
        if isinstance(data, dict) and "task_type" in data:
            data = dict(data)
            tt = data.pop("task_type")
            if "output" in data:
                raise ValueError("give `output:` (the task_type key is its old name), not both")
            data["output"] = tt
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.output not in output_names() + ["text"]:
            raise ValueError(f"output: unknown output type {self.output!r}; one of "
                             f"{', '.join(output_names())}")
        out = self.output_type
        problems = list(out.check_card(self))
        if not out.own and (self.labels is not None or self.schema_ is not None):
            problems.append(("labels" if self.labels is not None else "schema",
                             f"output {self.output!r} takes no {'labels' if self.labels is not None else 'schema'}"))
        allowed = out.metrics + (("bool",) if out.name == "multiple-choice" else ())
        for m in self.metrics:
            if m not in allowed:
                problems.append(("metric", f"{m!r} does not fit output {self.output!r}; one of "
                                           f"{', '.join(allowed)}"))
        names = [i.name for i in self.input_fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            problems.append(("inputs", f"input {dup[0]!r} is listed twice"))
        if OUTPUT_COLUMN in names:
            problems.append(("inputs", f"an input may not be called {OUTPUT_COLUMN!r} (the answer's column key)"))
        used = set(PLACEHOLDER.findall(self.prompt))
        known = set(names) | ({"labels"} if self.labels else set())
        unknown = sorted(p for p in used if p not in known and p != LEGACY_INPUT)
        if self.inputs is not None and unknown:
            problems.append(("prompt", f"{{{unknown[0]}}} is not an input of the task "
                                       f"(inputs: {', '.join(names)})"))
        unused = [n for n in names if n not in used]
        if self.inputs is not None and unused:
            problems.append(("prompt", f"input {unused[0]!r} never appears in the prompt "
                                       f"(write {{{unused[0]}}} where the model should see it)"))
        bad_cols = sorted(k for k in self.source.columns if k not in names and k != OUTPUT_COLUMN)
        if bad_cols:
            problems.append(("source.columns", f"{bad_cols[0]!r} is neither an input nor "
                                               f"{OUTPUT_COLUMN!r}"))
        if problems:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in problems))
        return self

    # ------------------------------------------------------------------ what the task is

    @property
    def output_type(self) -> OutputType:
        """The output type (multiple choice with the ``bool`` metric: yes/no)."""
        first = self.metric_ if isinstance(self.metric_, str) else (self.metric_ or [None])[0]
        return output_for(output_type(self.output).name, first)

    @property
    def task_type(self) -> str:
        """The records' ``task_type``: the output type's name (``text`` is ``generation``)."""
        return self.output_type.name

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.metric_ is None:
            return self.output_type.defaults()
        return (self.metric_,) if isinstance(self.metric_, str) else tuple(self.metric_)

    @property
    def metric(self) -> str:
        """The task's score (its first metric)."""
        return self.metrics[0]

    @property
    def input_fields(self) -> list[InputField]:
        return self.inputs if self.inputs is not None else [InputField(
            name=LEGACY_INPUT, description="The question text exactly as in ShopBench/EC-Guide files.")]

    @property
    def own(self) -> bool:
        """A card with named inputs (a shop's own task), rather than ShopBench's one question text."""
        return self.inputs is not None

    @property
    def path(self) -> Path | None:
        return self._path

    def column(self, field: str) -> str:
        """The data file's column that holds ``field`` (an input name or ``output``)."""
        return self.source.columns.get(field, field)

    def source_files(self) -> list[Path]:
        """The card's own data files, relative paths taken from the card's folder."""
        base = self._path.parent if self._path else Path.cwd()
        return [Path(os.path.normpath(f if Path(f).is_absolute() else base / f)) for f in self.source.files]

    # ------------------------------------------------------------------ prompts and records

    def render(self, values: dict[str, Any] | str) -> str:
        """The question as the model sees it (before the evaluation protocol): the prompt with
        each ``{input}`` replaced by its value and ``{labels}`` by the label list. A string is
        the ShopBench question text (``input_field``)."""
        if isinstance(values, str):
            values = {LEGACY_INPUT: values}
        if self.labels:
            values = {**values, "labels": ", ".join(self.labels)}
        return PLACEHOLDER.sub(lambda m: _text(values[m[1]]) if m[1] in values else m[0], self.prompt)

    def render_record(self, rec: Record) -> str:
        """A record of this task as the model sees it (an own task: from its named inputs)."""
        return self.render(rec.inputs if self.own and rec.inputs is not None else rec.input_field)

    def record(self, inputs: dict[str, Any], gold: Any, *, source: str, id: str = "") -> Record:
        """A record of this (own) task from its named inputs and gold answer."""
        return Record(input_field=self.render(inputs), output_field=gold, task_type=self.task_type,
                      metric=self.metric, task=self.name, capability=self.capability, source=source,
                      id=id, is_multiple_choice=self.task_type == "multiple-choice", inputs=dict(inputs))


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return json.dumps(value, ensure_ascii=False)
