"""``label``: exactly one of the card's ``labels`` (a shop's taxonomy: categories, topics,
intents). Decoded under a grammar that allows only the label strings, so even an untuned model
answers with a label; scored by accuracy and macro-F1."""
from __future__ import annotations

from shoptune.tasks import gbnf
from shoptune.tasks.outputs import GoldError, Grammar, OutputType, Plan, register


def check_labels(card) -> list[tuple[str, str]]:
    labels = card.labels or []
    if not labels:
        return [("labels", f"output {card.output!r} needs `labels:`, the list of allowed labels")]
    bad = [lab for lab in labels if not isinstance(lab, str) or not lab.strip() or lab != lab.strip()]
    if bad:
        return [("labels", f"a label must be non-empty text without surrounding spaces, got {bad[0]!r}")]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        return [("labels", f"label {dup[0]!r} is listed twice")]
    return []


def label_of(value, labels) -> str:
    """``value`` as one of ``labels`` (exact, after stripping); :class:`GoldError` naming the
    label set, with the closest label when only case or spacing differs."""
    text = str(value).strip() if value is not None else ""
    if text in labels:
        return text
    near = [lab for lab in labels if lab.casefold() == text.casefold()]
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    shown = ", ".join(map(repr, labels[:8])) + (f", ... ({len(labels)} labels)" if len(labels) > 8 else "")
    raise GoldError(f"{text!r} is not one of the labels{hint}: {shown}")


def budget(labels) -> int:
    """Tokens the longest label can take (a token is at least one byte), plus the end token."""
    return max(len(lab.encode("utf-8")) for lab in labels) + 1


@register
class Label(OutputType):
    name = "label"
    metrics = ("accuracy", "macro f1")
    default_metrics = ("accuracy", "macro f1")
    own = True

    def check_card(self, card):
        return check_labels(card)

    def coerce(self, value, card):
        return label_of(value, card.labels)

    def check_gold(self, gold, input_text, card, metric):
        try:
            label_of(gold, card.labels)
        except GoldError as e:
            return [("output_field", str(e))]
        return [] if isinstance(gold, str) else [("output_field", f"a label is text, got {gold!r}")]

    def plan(self, input_text, metric, card, max_new_tokens):
        return Plan("generate", max_new_tokens=max_new_tokens or card.max_new_tokens or budget(card.labels),
                    grammar=Grammar(gbnf.choice(card.labels)))

    def parse(self, text, metric, card):
        """The label the text is (exactly, or but for case); a label cut short by the token budget
        is the first label it starts; None when it is none of them."""
        text = text.strip()
        if text in card.labels:
            return text
        for lab in card.labels:
            if lab.casefold() == text.casefold():
                return lab
        if text:
            for lab in card.labels:
                if lab.startswith(text):
                    return lab
        return None

    def answer_schema(self, card) -> dict:
        return {"enum": [*card.labels, None], "description": "One of the task's labels (null: none)."}

    def prompt_hint(self, card) -> str:
        return "Answer with exactly one of: {labels}.\nAnswer:"
