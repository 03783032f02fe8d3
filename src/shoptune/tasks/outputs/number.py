"""``number``: a number (a price, a count, a weight), written as a JSON number and decoded
under a JSON-number grammar; scored by accuracy (equal values)."""
from __future__ import annotations

import json
import math
import re

from shoptune.tasks import gbnf
from shoptune.tasks.outputs import GoldError, Grammar, OutputType, Plan, register

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
NUMBER_BUDGET = 24


def _number(value) -> float | int:
    if isinstance(value, bool):
        raise GoldError(f"a number, got {value!r}")
    if isinstance(value, (int, float)):
        x = value
    else:
        text = str(value).strip()
        if not _NUMBER.fullmatch(text) or len(text) > 64:
            raise GoldError(f"a number, got {text[:40]!r}")
        x = float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(x, float) and not math.isfinite(x):
        raise GoldError(f"a finite number, got {value!r}")
    return x


@register
class Number(OutputType):
    name = "number"
    metrics = ("accuracy",)
    own = True

    def coerce(self, value, card):
        return _number(value)

    def check_gold(self, gold, input_text, card, metric):
        try:
            _number(gold)
        except GoldError as e:
            return [("output_field", str(e))]
        return [] if isinstance(gold, (int, float)) else [("output_field", f"a number, got {gold!r}")]

    def answer_text(self, gold, metric, card) -> str:
        return json.dumps(gold)

    def plan(self, input_text, metric, card, max_new_tokens):
        return Plan("generate", max_new_tokens=max_new_tokens or card.max_new_tokens or NUMBER_BUDGET,
                    grammar=Grammar(gbnf.json_schema({"type": "number"})))

    def parse(self, text, metric, card):
        m = _NUMBER.search(text)
        if not m:
            return None
        try:
            return _number(m.group())
        except GoldError:
            return None

    def answer_schema(self, card) -> dict:
        return {"type": ["number", "null"]}
