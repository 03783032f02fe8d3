"""Parsers from raw model output to answers: the KDD Cup 2024 starter kit's rules, exactly.

Every parser first cuts the output to 5000 characters. Registered by task type; EC-Guide's
``bool`` metric has its own yes/no parser.
"""
from __future__ import annotations

import ast
from collections.abc import Callable

MAX_CHARS = 5000
PARSERS: dict[str, Callable[[str], object]] = {}


def register(name: str):
    def deco(fn):
        PARSERS[name] = fn
        return fn
    return deco


def _clean_numbers(text: str) -> list[int]:
    """Keep digits, commas and spaces; split on commas; keep what int() accepts."""
    cleaned = "".join(c for c in text if c.isdigit() or c in ", ")
    out = []
    for item in cleaned.split(","):
        try:
            out.append(int(item))
        except ValueError:
            continue
    return out


@register("multiple-choice")
def parse_multiple_choice(text: str) -> int:
    """Strip, then int of the first character; -1 if that fails."""
    text = text[:MAX_CHARS].strip()
    try:
        return int(text[0])
    except (IndexError, ValueError):
        return -1


@register("ranking")
def parse_ranking(text: str) -> list[int]:
    """Ints <= 5, first 5; any duplicate left makes the answer []."""
    items = [i for i in _clean_numbers(text[:MAX_CHARS]) if i <= 5][:5]
    return [] if len(set(items)) != len(items) else items


@register("retrieval")
def parse_retrieval(text: str) -> list[int]:
    """Ints (no <= 5 filter), first 3."""
    return _clean_numbers(text[:MAX_CHARS])[:3]


@register("named_entity_recognition")
def parse_ner(text: str) -> list[str]:
    """A Python list literal of strings, else comma-separated, stripped, empties dropped."""
    text = text[:MAX_CHARS]
    try:
        value = ast.literal_eval(text)
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return value
    except Exception:  # literal_eval raises many types on arbitrary text
        pass
    return [x.strip() for x in text.split(",") if x.strip()]


@register("generation")
def parse_generation(text: str) -> str:
    return text[:MAX_CHARS].strip()


@register("bool")
def parse_bool(text: str) -> str:
    """EC-Guide yes/no answers: the first word, lower-cased, without punctuation ('' if neither)."""
    words = text[:MAX_CHARS].strip().lower().split()
    first = words[0].strip(".,!?:;\"'()") if words else ""
    return first if first in ("yes", "no") else ""


def parser_for(task_type: str, metric: str) -> Callable[[str], object]:
    return PARSERS["bool" if metric == "bool" else task_type]


def parse(task_type: str, metric: str, text: str):
    return parser_for(task_type, metric)(text)
