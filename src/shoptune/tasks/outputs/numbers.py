"""``retrieval`` (pick up to 3 of the numbered candidates) and ``ranking`` (order 5 of them):
answers are number lists ("3, 1, 7"), decoded under :class:`~shoptune.decoding.NumberListProcessor`
(only numbers of the question's list, ", " between, stop at the line end)."""
from __future__ import annotations

from dataclasses import replace

from pydantic import Field, model_validator

from shoptune.eval.parsers import parse_ranking, parse_retrieval
from shoptune.tasks.outputs import _LIST_RE, OutputType, Plan, QuestionInput, check_list_numbers, register
from shoptune.tasks.outputs.choice import is_int, option_numbers


def number_list_tokens(numbers: int, max_value: int) -> int:
    """Tokens an answer of ``numbers`` numbers up to ``max_value`` takes at most: a token per
    digit (how NumberListProcessor writes them), ", " between them, the line end."""
    return numbers * len(str(max_value)) + 2 * (numbers - 1) + 1


def _listed(input_text: str) -> list[int]:
    return option_numbers(input_text) or [int(n) for n in _LIST_RE.findall(input_text)]


class CandidatesInput(QuestionInput):
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


def _items(inp, value) -> dict:
    if inp.candidates and isinstance(value, list):
        return {"answer_items": [inp.candidates[i - 1] for i in value if 1 <= i <= len(inp.candidates)]}
    return {}


@register
class Retrieval(OutputType):
    name = "retrieval"
    metrics = ("hit rate@3",)

    def check_gold(self, gold, input_text, card, metric):
        if not (isinstance(gold, list) and gold and all(is_int(g) and g >= 0 for g in gold)):
            return [("output_field", f"retrieval needs a non-empty list of ints >= 0, got {gold!r}")]
        if len(set(gold)) != len(gold):
            return [("output_field", f"retrieval gold has duplicates: {gold!r}")]
        return []

    def answer_text(self, gold, metric, card) -> str:
        return ", ".join(str(g) for g in gold)

    def plan(self, input_text, metric, card, max_new_tokens):
        check_list_numbers(input_text)
        listed = _listed(input_text)
        values = tuple(sorted({n for n in listed if n >= 1}))  # (a list numbered from 0: not 0)
        max_value = max(listed, default=99)
        needed = number_list_tokens(min(3, len(values) or max_value), max(values, default=max_value))
        return Plan("generate", max_new_tokens=max(max_new_tokens or 16, needed), numeric=True,
                    stop_newline=True, max_value=max_value, count=3, values=values)

    def parse(self, text, metric, card):
        return parse_retrieval(text)

    def answer_schema(self, card) -> dict:
        return {"type": "array", "items": {"type": "integer"}, "maxItems": 3,
                "description": "The chosen candidates' numbers, best first."}

    def input_model(self, card):
        return CandidatesInput

    def request_plan(self, plan, inp):
        if inp.candidates is None:
            return plan
        n = len(inp.candidates)  # the given candidates only (a candidate's text may hold "7. ")
        return replace(plan, max_value=n, count=min(3, n), values=tuple(range(1, n + 1)))

    def answer_extras(self, inp, value):
        return _items(inp, value)


@register
class Ranking(OutputType):
    name = "ranking"
    metrics = ("ndcg",)

    def check_gold(self, gold, input_text, card, metric):
        if not (isinstance(gold, list) and gold and all(
                isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in gold)):
            return [("output_field", f"ranking needs a non-empty list of relevance weights "
                                     f">= 0, got {gold!r}")]
        return []

    def answer_text(self, gold, metric, card) -> str:
        order = sorted(range(len(gold)), key=lambda i: (-gold[i], i))  # best first
        return ", ".join(str(i + 1) for i in order)

    def plan(self, input_text, metric, card, max_new_tokens):
        check_list_numbers(input_text)
        return Plan("generate", max_new_tokens=max_new_tokens or 16, numeric=True,
                    stop_newline=True, max_value=5, count=5, unique=True)

    def parse(self, text, metric, card):
        return parse_ranking(text)

    def answer_schema(self, card) -> dict:
        return {"type": "array", "items": {"type": "integer"}, "maxItems": 5,
                "description": "The candidates' numbers, best first ([]: unparseable)."}

    def input_model(self, card):
        return RankingInput

    def request_plan(self, plan, inp):
        if inp.candidates is None:
            return plan
        n = len(inp.candidates)  # a permutation of exactly the given candidates
        return replace(plan, max_value=n, count=n)

    def answer_extras(self, inp, value):
        return _items(inp, value)
