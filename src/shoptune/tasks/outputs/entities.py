"""``named_entity_recognition``: the phrases of the input of one entity type, comma-separated;
scored by micro-F1 over the task."""
from __future__ import annotations

from pydantic import Field, model_validator

from shoptune.eval.parsers import parse_ner
from shoptune.tasks.outputs import OutputType, Plan, QuestionInput, register


class EntityInput(QuestionInput):
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

    def input_model(self, card):
        return EntityInput
