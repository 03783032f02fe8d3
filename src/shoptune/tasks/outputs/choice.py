"""``multiple-choice``: ShopBench's numbered options ("0. ...") and an int answer; EC-Guide's
``bool`` metric: "yes" or "no". Decoded in one forward pass: the best-scoring valid option token."""
from __future__ import annotations

import re
from typing import Any

from shoptune.eval.parsers import parse_bool, parse_multiple_choice
from dataclasses import replace

from pydantic import Field, model_validator

from shoptune.tasks.outputs import OutputType, Plan, QuestionInput, check_list_numbers, register

_OPTION_RE = re.compile(r"^\s*(\d+)\.\s", re.MULTILINE)


def option_numbers(input_field: str) -> list[int]:
    """Option numbers of a multiple-choice prompt ("0. foo" lines), in order.

    ShopBench options are numbered from 0; numbered lines that do not start at 0 (a review
    quoting "1. ... 2. ...") are not options.
    """
    nums = [int(m) for m in _OPTION_RE.findall(input_field)]
    return nums if nums and 0 in nums else []


class MultipleChoiceInput(QuestionInput):
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


class YesNoInput(QuestionInput):
    question: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self):
        if self.structured() and self.question is None:
            raise ValueError("give `question`, or `input_field`")
        return self

    def render(self) -> str:
        return self.input_field if self.input_field is not None else f"{self.question}\nAnswer: "


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@register
class MultipleChoice(OutputType):
    name = "multiple-choice"
    metrics = ("accuracy",)

    def coerce(self, value: Any, card) -> Any:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,4}\s*", value):
            return int(value)
        return value

    def check_gold(self, gold, input_text, card, metric):
        if not is_int(gold):
            return [("output_field", f"multiple choice needs an int option, got "
                                     f"{type(gold).__name__} {gold!r}")]
        if not isinstance(input_text, str):
            return []
        opts = option_numbers(input_text)
        if opts and gold not in opts:
            listed = sorted(set(opts))
            if listed == list(range(listed[0], listed[-1] + 1)):
                return [("output_field", f"option index {gold} out of range "
                                         f"(options {listed[0]}-{listed[-1]})")]
            return [("output_field", f"option index {gold} is not one of the listed "  # a gap (0, 1, 3)
                                     f"options ({', '.join(map(str, listed))})")]
        if not opts and not 0 <= gold <= 9:
            return [("output_field", f"answer {gold} is not a single digit")]
        return []

    def answer_text(self, gold, metric, card) -> str:
        return str(gold)

    def plan(self, input_text, metric, card, max_new_tokens):
        check_list_numbers(input_text)
        opts = option_numbers(input_text)
        return Plan("choice", tuple(str(o) for o in opts if o < 10) or tuple("0123456789"))

    def parse(self, text, metric, card):
        return parse_multiple_choice(text)

    def answer_schema(self, card) -> dict:
        return {"type": "integer", "description": "The chosen option's number (-1: unparseable)."}

    def input_model(self, card):
        return MultipleChoiceInput

    def request_plan(self, plan, inp):
        if inp.options is not None:
            return replace(plan, choices=tuple(str(i) for i in range(len(inp.options))))
        return plan

    def answer_extras(self, inp, value):
        if inp.options and isinstance(value, int) and 0 <= value < len(inp.options):
            return {"answer_text": inp.options[value]}
        return {}


class YesNo(OutputType):
    """Multiple choice with EC-Guide's ``bool`` metric (a card says ``output: multiple-choice``,
    ``metric: bool``): the answer is "yes" or "no"."""
    name = "multiple-choice"
    metrics = ("bool",)

    def check_gold(self, gold, input_text, card, metric):
        if not (isinstance(gold, str) and gold.strip().lower() in ("yes", "no")):
            return [("output_field", f"bool metric needs 'yes' or 'no', got {gold!r}")]
        return []

    def coerce(self, value, card):
        if isinstance(value, bool):
            return "yes" if value else "no"
        return value

    def answer_text(self, gold, metric, card) -> str:
        return str(gold).strip().lower()

    def plan(self, input_text, metric, card, max_new_tokens):
        return Plan("choice", ("yes", "no"))

    def parse(self, text, metric, card):
        return parse_bool(text)

    def answer_schema(self, card) -> dict:
        return {"type": "string", "enum": ["yes", "no", ""], "description": "'' : unparseable."}

    def input_model(self, card):
        return YesNoInput


YES_NO = YesNo()
