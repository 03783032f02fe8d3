"""``generation`` (``text`` in a card): free text, scored by ROUGE-L, BLEU or embedding
similarity. BLEU and ROUGE-L tasks stop at the line end (BLEU scores the first line only)."""
from __future__ import annotations

from pydantic import Field, model_validator

from shoptune.eval.parsers import parse_generation
from shoptune.tasks.outputs import GEN_LIMITS, OutputType, Plan, QuestionInput, register


class GenerationInput(QuestionInput):
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


@register
class Text(OutputType):
    name = "generation"
    aliases = ("text",)
    metrics = ("rougel", "sent-transformer", "multilingual-sent-transformer", "bleu", "jp-bleu")

    def check_gold(self, gold, input_text, card, metric):
        if not isinstance(gold, str):
            return [("output_field", f"generation needs a string, got {type(gold).__name__}")]
        if not gold.strip():
            return [("output_field", "is empty")]
        return []

    def coerce(self, value, card):
        return value if isinstance(value, str) else str(value)

    def plan(self, input_text, metric, card, max_new_tokens):
        limit = max_new_tokens or GEN_LIMITS.get(metric, 100)
        return Plan("generate", max_new_tokens=limit, stop_newline=metric in GEN_LIMITS)

    def parse(self, text, metric, card):
        return parse_generation(text)

    def answer_schema(self, card) -> dict:
        return {"type": "string"}

    def input_model(self, card):
        return GenerationInput
