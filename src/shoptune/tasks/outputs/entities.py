"""``named_entity_recognition``: the phrases of the input of one entity type, comma-separated;
scored by micro-F1 over the task."""
from __future__ import annotations

from shoptune.eval.parsers import parse_ner
from shoptune.tasks.outputs import OutputType, Plan, register


@register
class Entities(OutputType):
    name = "named_entity_recognition"
    metrics = ("micro f1",)

    def check_gold(self, gold, input_text, card, metric):
        if not (isinstance(gold, list) and all(isinstance(g, str) for g in gold)):
            return [("output_field", f"NER needs a list of strings, got {gold!r}")]
        return []

    def answer_text(self, gold, metric, card) -> str:
        return ", ".join(gold)

    def plan(self, input_text, metric, card, max_new_tokens):
        return Plan("generate", max_new_tokens=max_new_tokens or 32, stop_newline=True)

    def parse(self, text, metric, card):
        return parse_ner(text)

    def answer_schema(self, card) -> dict:
        return {"type": "array", "items": {"type": "string"}}
