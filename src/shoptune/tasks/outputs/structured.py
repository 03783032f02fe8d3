"""``json`` (an object valid against the card's JSON ``schema``: attributes into a shop's own
schema) and ``labels`` (a subset of the card's ``labels``, written as a JSON list).

Both are decoded under a JSON-schema grammar and written in the schema's key order; a JSON answer
the token budget cut short is closed into a valid one (:func:`shoptune.tasks._json.parse`).
``json`` is scored by field-level F1 (per key, sets of values, micro-averaged over the task) and
the valid-JSON rate; ``labels`` by micro-F1 over the chosen labels.
"""
from __future__ import annotations

import json
from typing import Any

from shoptune.tasks import _json, gbnf
from shoptune.tasks.outputs import GoldError, Grammar, OutputType, Plan, register
from shoptune.tasks.outputs.label import check_labels, label_of

JSON_BUDGET = 256  # tokens for a JSON answer when the card gives no max_new_tokens


def _from_cell(value: Any) -> Any:
    """A cell holding JSON text (CSV), or a JSON value already (JSON lines, Parquet)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise GoldError(f"not JSON: {e}") from None
        except RecursionError:
            raise GoldError("JSON nested too deeply") from None
    return value


@register
class Json(OutputType):
    name = "json"
    metrics = ("field f1", "valid json")
    default_metrics = ("field f1", "valid json")
    own = True

    def check_card(self, card):
        if card.schema_ is None:
            return [("schema", "output json needs `schema:`, a JSON Schema of the answer")]
        why = _json.check_schema(card.schema_)
        if why:
            return [("schema", why)]
        try:  # (a schema a grammar cannot enforce would let answers break it)
            gbnf.json_schema(card.schema_)
        except gbnf.GrammarError as e:
            return [("schema", str(e))]
        return []

    def coerce(self, value, card):
        value = _from_cell(value)
        err = _json.first_error(value, card.schema_)
        if err:
            raise GoldError(f"breaks the task's schema: {err}")
        return value

    def check_gold(self, gold, input_text, card, metric):
        err = _json.first_error(gold, card.schema_)
        return [("output_field", f"breaks the task's schema: {err}")] if err else []

    def answer_text(self, gold, metric, card) -> str:
        return _json.dumps(gold, card.schema_)

    def plan(self, input_text, metric, card, max_new_tokens):
        return Plan("generate", max_new_tokens=max_new_tokens or card.max_new_tokens or JSON_BUDGET,
                    grammar=Grammar(gbnf.json_schema(card.schema_)))

    def parse(self, text, metric, card):
        return _json.parse(text, card.schema_)

    def answer_schema(self, card) -> dict:
        return {"anyOf": [card.schema_, {"type": "null"}],
                "description": "An answer valid against the task's schema (null: none)."}

    def prompt_hint(self, card) -> str:
        keys = list(card.schema_.get("properties", {}))
        return (f"Answer with a JSON object with the keys {', '.join(keys)}.\nJSON:" if keys
                else "Answer with JSON.\nJSON:")


def labels_schema(labels) -> dict:
    return {"type": "array", "items": {"enum": list(labels)}, "maxItems": len(labels), "uniqueItems": True,
            "description": "The labels that apply, each once, in the task's label order."}


@register
class Labels(OutputType):
    name = "labels"
    metrics = ("micro f1",)
    own = True

    def check_card(self, card):
        return check_labels(card)

    def coerce(self, value, card):
        """A JSON list, or text split at ``|``, else ``;``, else ``,`` (the first that occurs)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = _from_cell(text)
            else:
                sep = next((s for s in "|;," if s in text), None)
                value = [x for x in (text.split(sep) if sep else [text]) if x.strip()] if text else []
        if not isinstance(value, list):
            raise GoldError(f"a list of labels, got {type(value).__name__} {value!r}")
        chosen = {label_of(v, card.labels) for v in value}
        return [lab for lab in card.labels if lab in chosen]  # (a set, written in the labels' order)

    def check_gold(self, gold, input_text, card, metric):
        if not isinstance(gold, list):
            return [("output_field", f"a list of labels, got {type(gold).__name__} {gold!r}")]
        for g in gold:
            try:
                label_of(g, card.labels)
            except GoldError as e:
                return [("output_field", str(e))]
        return []

    def answer_text(self, gold, metric, card) -> str:
        """The labels as a JSON list in the card's label order (the order the grammar allows)."""
        return json.dumps([lab for lab in card.labels if lab in set(gold)], ensure_ascii=False)

    def plan(self, input_text, metric, card, max_new_tokens):
        per = max(len(lab.encode("utf-8")) for lab in card.labels) + 4  # '"' label '", '
        return Plan("generate", max_new_tokens=max_new_tokens or card.max_new_tokens
                    or min(JSON_BUDGET * 4, 2 + per * len(card.labels)),
                    grammar=Grammar(gbnf.ordered_subset(card.labels)))

    def parse(self, text, metric, card):
        """The labels named, in order, each once; [] when none can be read."""
        value = _json.parse(text, {"type": "array", "items": {"type": "string"}})
        if value is None:
            value = [x.strip().strip('"') for x in text.strip().strip("[]").split(",")]
        out = []
        for v in value:
            try:
                out.append(label_of(v, card.labels))
            except GoldError:
                continue
        return list(dict.fromkeys(out))

    def answer_schema(self, card) -> dict:
        return labels_schema(card.labels)

    def prompt_hint(self, card) -> str:
        return "Answer with a JSON list of the labels that apply, from: {labels}.\nAnswer:"


