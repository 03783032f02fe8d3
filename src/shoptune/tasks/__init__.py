"""Task cards: one small versioned YAML file per task, found by walking ``tasks/cards/``.

A card says what a task is (capability, task type, metric), where its data comes from, how its
prompt is rendered and how model output is parsed. Cards are read with the bounded safe loader
(:func:`shoptune.configfile.read_yaml`) into :class:`TaskCard`; extra card folders can be added with ``SHOPTUNE_TASKS_PATH`` (``:``-separated).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from shoptune.records import CAPABILITIES, METRICS, TASK_TYPES

CARDS_DIR = Path(__file__).parent / "cards"

Capability = Literal[CAPABILITIES]  # type: ignore[valid-type]
TaskType = Literal[TASK_TYPES]  # type: ignore[valid-type]
Metric = Literal[METRICS]  # type: ignore[valid-type]


class CardSource(BaseModel):
    """Where a task's rows live and how they are picked out of a shared file."""
    model_config = ConfigDict(extra="forbid")
    dataset: Literal["shopbench", "ec-guide", "shopping-mmlu", "custom"]
    file: str | None = None  # path inside the dataset folder
    task_name: str | None = None  # ShopBench task_name (task1..task18)
    task_type: TaskType | None = None  # select rows of a mixed file by type ...
    metric: Metric | None = None  # ... and/or metric


class TaskCard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    version: int = Field(ge=1)
    capability: Capability
    task_type: TaskType
    metric: Metric
    description: str
    source: CardSource
    # The prompt the model sees, identical at training, evaluation and serving time.
    # ``{input_field}`` is the ShopBench question text.
    prompt: str = "{input_field}"
    max_new_tokens: int | None = None  # None: the task type's default
    tags: list[str] = []

    def render(self, input_field: str) -> str:
        return self.prompt.replace("{input_field}", input_field)


class CardError(ValueError):
    pass


def _card_dirs() -> list[Path]:
    dirs = [CARDS_DIR]
    for p in os.environ.get("SHOPTUNE_TASKS_PATH", "").split(os.pathsep):
        if p:
            dirs.append(Path(p))
    return dirs


def load_card(path: Path) -> TaskCard:
    from shoptune.configfile import ConfigError, read_yaml
    try:  # (bounded: a regular file, size, aliases)
        data, _ = read_yaml(path, "task card")
    except OSError as e:
        raise CardError(f"{path}: cannot read task card: {e.strerror or e}") from None
    except ConfigError as e:
        raise CardError(str(e)) from None
    try:
        return TaskCard(**data)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise CardError(f"{path}: invalid task card: {errs}") from e


@lru_cache(maxsize=None)
def _registry(dirs: tuple[Path, ...]) -> dict[str, TaskCard]:
    cards: dict[str, TaskCard] = {}
    where: dict[str, Path] = {}
    for d in dirs:
        for path in sorted(d.rglob("*.yaml")):
            card = load_card(path)
            if card.name in cards:
                raise CardError(f"{path}: task {card.name!r} already defined in {where[card.name]}")
            cards[card.name] = card
            where[card.name] = path
    return cards


@lru_cache(maxsize=None)
def _sorted_cards(dirs: tuple[Path, ...]) -> dict[str, TaskCard]:
    order = {c: i for i, c in enumerate(CAPABILITIES)}
    natural = lambda name: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]
    return dict(sorted(_registry(dirs).items(), key=lambda kv: (order[kv[1].capability], natural(kv[0]))))


@lru_cache(maxsize=None)
def _cards_by_file(dirs: tuple[Path, ...]) -> dict[tuple[str, str], tuple[TaskCard, ...]]:
    by_file: dict[tuple[str, str], list[TaskCard]] = {}
    for c in _sorted_cards(dirs).values():
        by_file.setdefault((c.source.dataset, c.source.file), []).append(c)
    return {k: tuple(v) for k, v in by_file.items()}


@lru_cache(maxsize=None)
def _aliases(dirs: tuple[Path, ...]) -> dict[str, str]:
    cards = _registry(dirs)
    claims: dict[str, list[str]] = {}
    for c in cards.values():
        if c.source.task_name and c.source.task_name not in cards:
            claims.setdefault(c.source.task_name, []).append(c.name)
    return {alias: names[0] for alias, names in sorted(claims.items()) if len(names) == 1}


def task_aliases() -> dict[str, str]:
    """The other names a task goes by -> its card's name: ShopBench's own task names (``task2``
    -> ``shopbench_task2``, from each card's ``source.task_name``), which the benchmark's data and
    results written before #34 use. Accepted wherever a task is named on input; every output
    uses the card's name. A name two cards claim, or that is a card's own name, is no alias."""
    return dict(_aliases(tuple(_card_dirs())))


def card_name(name: str) -> str:
    """``name`` as its card's name: a card name as it is, an alias (``task2``) as the card it
    stands for; any other name unchanged (the caller says what it does not know)."""
    return _aliases(tuple(_card_dirs())).get(name, name)


# a task named in a config (mixtures, suites, synthesis specs): an alias becomes its card's name
TaskName = Annotated[str, AfterValidator(lambda name: card_name(name))]


def all_cards() -> dict[str, TaskCard]:
    """Every registered task card by name, sorted by capability then name."""
    return dict(_sorted_cards(tuple(_card_dirs())))


def find_card(name: str) -> TaskCard | None:
    """The card of task ``name`` (or an alias), or None (cheap: no sorting; called per question)."""
    dirs = tuple(_card_dirs())
    return _registry(dirs).get(_aliases(dirs).get(name, name))


def get_card(name: str) -> TaskCard:
    """The card named ``name`` (or by an alias, :func:`task_aliases`); KeyError otherwise."""
    cards = all_cards()
    name = card_name(name)
    if name not in cards:
        raise KeyError(f"unknown task {name!r}; `shoptune tasks ls` lists the {len(cards)} tasks")
    return cards[name]


def cards_for_file(dataset: str, file: str) -> list[TaskCard]:
    """The cards reading ``file`` of ``dataset``, in all_cards() order (called per data row)."""
    return list(_cards_by_file(tuple(_card_dirs())).get((dataset, file), ()))


def card_for_shopbench_task(task_name: str) -> TaskCard | None:
    for c in _sorted_cards(tuple(_card_dirs())).values():  # per ShopBench row: no copy
        if c.source.dataset == "shopbench" and c.source.task_name == task_name:
            return c
    return None


__all__ = ["TaskCard", "CardSource", "CardError", "all_cards", "get_card", "load_card",
           "cards_for_file", "card_for_shopbench_task", "task_aliases", "card_name", "TaskName"]
