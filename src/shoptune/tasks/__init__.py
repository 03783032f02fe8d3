"""Tasks: what a task is, owned here. A task is its card (:mod:`shoptune.tasks.card`, one YAML
file); what its answers are is its output type (:mod:`shoptune.tasks.outputs`). Training,
evaluation, serving and synthesis ask the task: :func:`render` (the question as the model sees
it), :func:`plan_for` (how it is decoded), :func:`answer_text` (what the model is trained to
write), :func:`parse_answer` (the model's text back to an answer), :func:`check_gold`.

Cards are found by walking the shipped ``tasks/cards/``, the folders in ``SHOPTUNE_TASKS_PATH``
(``:``-separated) and ``./tasks`` (where ``shoptune tasks new`` writes a shop's own cards); they are read with the bounded
safe loader (:func:`shoptune.configfile.read_yaml`).
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from shoptune.records import CAPABILITIES, Record
from shoptune.tasks.card import CardSource, InputField, TaskCard
from shoptune.tasks.outputs import (Grammar, Plan, PlanError, finish, output_for, output_names,
                                    output_type)

CARDS_DIR = Path(__file__).parent / "cards"
OWN_DIR = "tasks"  # ./tasks: a shop's own cards, read by every command


class CardError(ValueError):
    pass


def own_dirs() -> list[Path]:
    """Folders of own cards: ``SHOPTUNE_TASKS_PATH`` entries, then ``./tasks`` if it exists."""
    return list(_own_dirs(os.environ.get("SHOPTUNE_TASKS_PATH", ""), os.getcwd()))


@lru_cache(maxsize=64)
def _own_dirs(env: str, cwd: str) -> tuple[Path, ...]:  # (cached: asked per data row)
    dirs = [Path(p) for p in env.split(os.pathsep) if p]
    local = Path(cwd) / OWN_DIR
    if local.is_dir() and all(local.resolve() != d.resolve() for d in dirs if d.exists()):
        dirs.append(local)
    return tuple(dirs)


def _card_dirs() -> tuple[Path, ...]:
    return (CARDS_DIR, *_own_dirs(os.environ.get("SHOPTUNE_TASKS_PATH", ""), os.getcwd()))


def load_card(path: Path) -> TaskCard:
    """The card in ``path``; CardError names ``path:LINE: key: problem``."""
    from pydantic import ValidationError

    from shoptune.configfile import ConfigError, format_errors, read_yaml
    try:
        data, lines = read_yaml(path, "task card")
    except ConfigError as e:
        raise CardError(str(e)) from None
    except OSError as e:
        raise CardError(f"{path}: cannot read task card: {e.strerror or e}") from None
    try:
        card = TaskCard(**data)
    except ValidationError as e:
        whole = [x for x in e.errors(include_url=False) if not x["loc"]]
        if not whole:
            raise CardError(format_errors(str(path), e, data, lines)) from None
        out = []  # the card's cross-key checks: "key: problem; key: problem", each on its line
        for part in whole[0]["msg"].removeprefix("Value error, ").split("; "):
            key, _, msg = part.partition(": ")
            line = lines.get(tuple(key.split(".")))
            out.append(f"{path}:{line}: {key}: {msg}" if line else f"{path}: {key}: {msg}")
        raise CardError("\n".join(out)) from None
    card._path = Path(path)
    return card


def _is_card_file(path: Path) -> bool:
    """In an own folder (which may hold other YAML), a card is a mapping with a ``name`` and an
    ``output`` (or the older ``task_type``) key at the top level."""
    from shoptune._io import InputError, open_input
    try:
        with open_input(path, "task card") as fh:
            head = fh.read(65536).decode("utf-8", errors="replace")
    except (OSError, InputError):
        return False
    keys = set(re.findall(r"^([A-Za-z_]+)\s*:", head, re.MULTILINE))
    return "name" in keys and bool(keys & {"output", "task_type"})


@lru_cache(maxsize=None)
def _registry(dirs: tuple[Path, ...]) -> dict[str, TaskCard]:
    cards: dict[str, TaskCard] = {}
    where: dict[str, Path] = {}
    for d in dirs:
        shipped = d == CARDS_DIR
        for path in sorted(d.rglob("*.yaml")) if d.is_dir() else []:
            if not shipped and not _is_card_file(path):
                continue
            card = load_card(path)
            if card.name in cards:
                what = "the shipped task card" if where[card.name].is_relative_to(CARDS_DIR) else "task card"
                raise CardError(f"{path}: name: {card.name!r} is already the name of {what} "
                                f"{where[card.name]}; give this task another name")
            cards[card.name] = card
            where[card.name] = path
    return cards


def reload() -> None:
    """Forget the cards read so far (after ``tasks new`` wrote one)."""
    for f in (_own_dirs, _registry, _sorted_cards, _cards_by_file, _cards_by_own_file, _aliases):
        f.cache_clear()


def _natural(name: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]


@lru_cache(maxsize=None)
def _sorted_cards(dirs: tuple[Path, ...]) -> dict[str, TaskCard]:
    order = {c: i for i, c in enumerate(CAPABILITIES)}
    return dict(sorted(_registry(dirs).items(), key=lambda kv: (order[kv[1].capability], _natural(kv[0]))))


@lru_cache(maxsize=None)
def _cards_by_file(dirs: tuple[Path, ...]) -> dict[tuple[str, str], tuple[TaskCard, ...]]:
    by_file: dict[tuple[str, str], list[TaskCard]] = {}
    for c in _sorted_cards(dirs).values():
        by_file.setdefault((c.source.dataset, c.source.file), []).append(c)
    return {k: tuple(v) for k, v in by_file.items()}


@lru_cache(maxsize=None)
def _cards_by_own_file(dirs: tuple[Path, ...]) -> dict[Path, tuple[TaskCard, ...]]:
    by_file: dict[Path, list[TaskCard]] = {}
    for c in _sorted_cards(dirs).values():
        for f in c.source_files():
            try:
                by_file.setdefault(f.resolve(), []).append(c)
            except OSError:
                continue
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
    return dict(_sorted_cards(_card_dirs()))


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
    return list(_cards_by_file(_card_dirs()).get((dataset, file), ()))


def cards_for_own_file(path: Path) -> list[TaskCard]:
    """The own cards whose ``source.files`` name ``path``."""
    try:
        return list(_cards_by_own_file(_card_dirs()).get(Path(path).resolve(), ()))
    except OSError:
        return []


def card_for_shopbench_task(task_name: str) -> TaskCard | None:
    for c in _sorted_cards(_card_dirs()).values():  # per ShopBench row: no copy
        if c.source.dataset == "shopbench" and c.source.task_name == task_name:
            return c
    return None


# ----------------------------------------------------------------------------- asking the task

def render(rec: Record) -> str:
    """The question as the model sees it: its card's prompt over its inputs (a record of a task
    without a card: its ``input_field``)."""
    card = find_card(rec.task)
    return rec.input_field if card is None else card.render_record(rec)


def plan_for(rec: Record, max_new_tokens: int | None = None) -> Plan:
    """How a question is decoded (its output type's plan); ``max_new_tokens`` defaults to the
    card's, then the type's. Raises :class:`PlanError` for a question that cannot be decoded."""
    card = find_card(rec.task)
    out = output_for(rec.task_type, rec.metric)
    if out.own and card is None:
        raise PlanError(f"task {rec.task!r} has output {rec.task_type!r} but no task card: its "
                        "labels or schema are on the card")
    return out.plan(rec.input_field, rec.metric, card, max_new_tokens or (card.max_new_tokens if card else None))


def answer_text(rec: Record) -> str:
    """What the model is trained to write for the record's gold answer."""
    return output_for(rec.task_type, rec.metric).answer_text(rec.output_field, rec.metric,
                                                            find_card(rec.task))


def parse_answer(task_type: str, metric: str, text: str, task: str | None = None) -> Any:
    """The model's text as an answer of the task (ShopBench's types: the starter kit's parsers)."""
    out = output_for(task_type, metric)
    card = find_card(task) if task else None
    if out.own and card is None:
        return None
    return out.parse(text, metric, card)


def check_gold(rec_or_row: dict, card: TaskCard | None = None) -> list[tuple[str, str]]:
    """(field, problem) for a row's gold answer under its type's rules."""
    tt, metric = rec_or_row.get("task_type"), rec_or_row.get("metric")
    out = output_for(tt, metric)
    if out.own:
        card = card or find_card(rec_or_row.get("task") or "")
        if card is None:
            return [("task", f"output {tt!r} needs its task card (labels or schema): name the task "
                             "(a `task` column or --task)")]
    return out.check_gold(rec_or_row.get("output_field"), rec_or_row.get("input_field"), card, metric)


__all__ = ["TaskCard", "CardSource", "CardError", "InputField", "Grammar", "Plan", "PlanError",
           "all_cards", "get_card", "find_card", "load_card", "cards_for_file", "cards_for_own_file",
           "card_for_shopbench_task", "render", "plan_for", "answer_text", "parse_answer", "check_gold",
           "finish", "output_type", "output_for", "output_names", "reload", "own_dirs",
           "task_aliases", "card_name", "TaskName"]
