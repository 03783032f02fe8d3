"""``shoptune tasks new``: a shop's own file (CSV, JSON lines, JSON, Parquet) with its own column
names becomes a task card.

    shoptune tasks new product_category --from products.csv --input title --label category

The output type follows from the option: ``--label COL`` (one label per row; the label set is the
values seen), ``--labels COL`` (several per row: a JSON list, or text split at ``|``/``;``/``,``),
``--json COL`` (a JSON object per row; the schema is inferred from the values: types and keys
seen, lists and strings bounded), ``--target COL`` (text, or ``number`` when every value is a
number). Every row is read through the new card before it is written; the card goes to
``--tasks-dir`` (``./tasks``, which every command reads).
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from shoptune import tasks
from shoptune.records import CAPABILITIES
from shoptune.tasks import _json
from shoptune.tasks.card import NAME_PATTERN, OUTPUT_COLUMN, TaskCard
from shoptune.tasks.outputs import GoldError
from shoptune.tasks.outputs.number import _number

HEADER = "# A task card written by `shoptune tasks new`; edit it freely (docs/own-tasks.md).\n"
MAX_LABELS = 1000
DEFAULT_CAPABILITY = "concept_understanding"


class NewTaskError(ValueError):
    """A task that cannot be made from what was given (one line)."""


@dataclass
class NewTask:
    card: TaskCard
    path: Path
    rows: int = 0
    invalid: list = field(default_factory=list)  # DataIssue
    distribution: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def field_name(column: str) -> str:
    """A card field name for a column: lower case, runs of other characters as ``_``."""
    name = re.sub(r"[^a-z0-9]+", "_", column.strip().lower()).strip("_")
    if not name or not name[0].isalpha():
        name = "f_" + name
    return name[:64]


def _read(file: Path) -> tuple[list[tuple[str, dict]], list]:
    from shoptune.data.loaders import iter_raw
    rows, issues = [], []
    for loc, row, issue in iter_raw(file):
        if issue is not None:
            issues.append(issue)
        else:
            rows.append((loc, row))
    return rows, issues


def _cells(rows, column: str) -> list[Any]:
    return [r[column] for _, r in rows if column in r and r[column] not in (None, "")]


def _split_labels(cell: Any) -> list[str]:
    if isinstance(cell, list):
        return [str(x).strip() for x in cell if str(x).strip()]
    text = str(cell).strip()
    if text.startswith("["):
        import json
        try:
            value = json.loads(text)
            if isinstance(value, list):
                return [str(x).strip() for x in value if str(x).strip()]
        except ValueError:
            pass
    sep = next((s for s in "|;," if s in text), None)
    return [x.strip() for x in (text.split(sep) if sep else [text]) if x.strip()]


def _json_cells(rows, column: str) -> list[Any]:
    import json
    out = []
    for _, r in rows:
        v = r.get(column)
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except (ValueError, RecursionError):
                continue
        if v is not None:
            out.append(v)
    return out


def _all_numbers(values: list[Any]) -> bool:
    try:
        for v in values:
            _number(v)
    except GoldError:
        return False
    return bool(values)


def _prompt(card_inputs: list[dict], columns: dict[str, str], hint: str) -> str:
    lines = [f"{columns.get(i['name'], i['name'])}: {{{i['name']}}}" for i in card_inputs]
    return "\n".join(lines) + "\n" + hint


class _Literal(str):
    pass


def _dump(data: dict) -> str:
    class Dumper(yaml.SafeDumper):
        pass
    Dumper.add_representer(_Literal, lambda d, s: d.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
    return HEADER + yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=100)


def make(name: str, file: Path, *, inputs: list[str], label: str | None = None,
         labels: str | None = None, json_col: str | None = None, target: str | None = None,
         output: str | None = None, capability: str | None = None, metrics: list[str] | None = None,
         description: str | None = None, tasks_dir: Path = Path(tasks.OWN_DIR),
         overwrite: bool = False) -> NewTask:
    """Infer the card, read every row through it, write it (temp file, then rename)."""
    if not re.match(NAME_PATTERN, name):
        raise NewTaskError(f"task name {name!r}: lower-case letters, digits and _, starting with a letter")
    given = [(k, v) for k, v in (("--label", label), ("--labels", labels), ("--json", json_col),
                                 ("--target", target)) if v]
    if len(given) != 1:
        raise NewTaskError("give exactly one of --label COL, --labels COL, --json COL, --target COL "
                           "(the column holding the answer)" + (f"; got {', '.join(k for k, _ in given)}"
                                                                if given else ""))
    if not inputs:
        raise NewTaskError("give the input column(s): --input COL (repeatable)")
    if capability is not None and capability not in CAPABILITIES:
        raise NewTaskError(f"--capability {capability!r}: one of {', '.join(CAPABILITIES)}")
    path = tasks_dir / f"{name}.yaml"
    existing = tasks.find_card(name)
    if existing is not None and not (overwrite and existing.path and existing.path.resolve() == path.resolve()):
        where = existing.path or "the shipped cards"
        raise NewTaskError(f"task {name!r} exists already ({where}); choose another name"
                           + ("" if existing.own is False else " or pass --overwrite to replace it"))
    if path.exists() and not overwrite:
        raise NewTaskError(f"{path} exists (--overwrite replaces it, if `shoptune tasks new` wrote it)")
    if path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(HEADER):
        raise NewTaskError(f"{path} was not written by `shoptune tasks new`: not replaced")
    file = Path(file)
    if not file.is_file():
        raise NewTaskError(f"--from {file}: no such file")
    rows, unreadable = _read(file)
    if not rows:
        first = f" ({unreadable[0]})" if unreadable else ""
        raise NewTaskError(f"{file}: no rows to read{first}")
    seen = list(dict.fromkeys(k for _, r in rows for k in r))
    answer_col = next(v for _, v in given)
    for col in [*inputs, answer_col]:
        if col not in seen:
            raise NewTaskError(f"{file}: no column {col!r} (columns: {', '.join(map(repr, seen[:20]))})")
    if answer_col in inputs:
        raise NewTaskError(f"--input {answer_col!r} is also the answer column")
    notes: list[str] = []

    names = [field_name(c) for c in inputs]
    dup = [n for n in names if names.count(n) > 1 or n == OUTPUT_COLUMN]
    if dup:
        raise NewTaskError(f"input columns give the field name {dup[0]!r} twice (or the reserved "
                           f"{OUTPUT_COLUMN!r}); rename the column")
    card_inputs = [{"name": n, "type": "string", "description": f"The {c!r} column."}
                   for n, c in zip(names, inputs)]
    columns = {n: c for n, c in zip(names, inputs) if n != c}
    columns[OUTPUT_COLUMN] = answer_col
    data: dict[str, Any] = {"name": name, "version": 1,
                            "capability": capability or DEFAULT_CAPABILITY,
                            "description": description or f"{', '.join(inputs)} -> {answer_col} ({file.name})",
                            "inputs": card_inputs}
    if capability is None:
        notes.append(f"capability: {DEFAULT_CAPABILITY} (the default; --capability names another "
                     f"of {', '.join(CAPABILITIES)})")
    cells = _cells(rows, answer_col)
    if not cells:
        raise NewTaskError(f"{file}: column {answer_col!r} is empty in every row")
    if label:
        found = sorted({str(c).strip() for c in cells if str(c).strip()})
        if len(found) < 2:
            raise NewTaskError(f"{file}: column {label!r} holds {len(found)} distinct label(s); a label "
                               "task needs at least 2")
        if len(found) > MAX_LABELS:
            raise NewTaskError(f"{file}: column {label!r} holds {len(found)} distinct values, over "
                               f"{MAX_LABELS}: free text? (--target {label} makes a text task)")
        data.update(output="label", labels=found)
        if len(found) > len(cells) / 2:
            notes.append(f"{len(found)} labels for {len(cells)} rows: is {label!r} free text? "
                         f"(--target {label} makes a text task)")
    elif labels:
        found = sorted({x for c in cells for x in _split_labels(c)})
        if not found:
            raise NewTaskError(f"{file}: column {labels!r} names no label")
        data.update(output="labels", labels=found)
    elif json_col:
        values = _json_cells(rows, json_col)
        if not values:
            raise NewTaskError(f"{file}: column {json_col!r} holds no JSON value")
        schema = _json.infer_schema(values)
        longest = max(len(_json.dumps(v, schema).encode("utf-8")) for v in values)
        data.update(output="json", schema=schema, max_new_tokens=max(32, min(1024, 2 * longest)))
    else:
        kind = output or ("number" if _all_numbers(cells) else "text")
        if kind not in ("text", "number"):
            raise NewTaskError(f"--output {output!r} with --target: text or number")
        data["output"] = kind
        if kind == "number" and output is None:
            notes.append("output: number (every value is a number; --output text keeps text)")
    if metrics:
        data["metric"] = metrics if len(metrics) > 1 else metrics[0]
    shape = SimpleNamespace(labels=data.get("labels"), schema_=data.get("schema"))
    hint = tasks.output_type(data["output"]).prompt_hint(shape)
    data["prompt"] = _Literal(_prompt(card_inputs, columns, hint))
    rel = Path(os.path.relpath(file.resolve(), tasks_dir.resolve())).as_posix()
    data["source"] = {"files": [rel], "columns": columns}
    data["tags"] = ["own"]

    from shoptune.configfile import ConfigError, validate
    try:
        card = validate(TaskCard, dict(data), f"{path} (inferred)")
    except ConfigError as e:
        raise NewTaskError(str(e)) from None
    card._path = path
    from shoptune.data.loaders import iter_records
    issues: list = []
    recs = list(iter_records([file], card=card, issues=issues))
    if not recs:
        raise NewTaskError(f"{file}: none of its {len(rows)} rows is valid for the task"
                           + (f" (first: {issues[0]})" if issues else ""))
    dist: Counter = Counter()
    for r in recs:
        g = r.output_field
        if isinstance(g, list):
            dist.update(g)
        elif isinstance(g, dict):
            dist.update(k for k, v in g.items() if v not in (None, "", []))
        elif data["output"] == "label":
            dist[g] += 1
    from shoptune._io import atomic_open
    tasks_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        fh.write(_dump(data))
    tasks.reload()
    return NewTask(card=card, path=path, rows=len(recs), invalid=unreadable + issues,
                   distribution=dist, notes=notes)
