"""Reading an evaluation run folder (``scores.json``, ``predictions.jsonl``, as ``shoptune eval``
writes them) for ``eval compare``: bounded (:mod:`shoptune._io`) and checked, so a folder that
is not what ``shoptune eval`` wrote (a file edited by hand, truncated, from another tool) is one
line naming ``file:line: field: why``, never a traceback or a statistic computed on NaN.

    run = read_run("runs/base")      # RunFolderError if malformed
    run.scores, run.predictions
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from shoptune._io import ROW_CAP, InputError, JsonBoundsError, iter_lines, json_loads, open_input, read_json
from shoptune.records import CAPABILITIES, METRICS


class RunFolderError(ValueError):
    """An evaluation folder that cannot be compared: one line naming the file (and line)."""


class _TaskScore(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    score: Optional[float]


class _Coverage(BaseModel):
    model_config = ConfigDict(extra="allow")
    partial: bool = False
    questions: int = 0
    of: int = 0


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")
    fingerprint: str
    n_questions: int
    ids: list = []
    sources: dict = {}


class _Scores(BaseModel):
    """The part of ``scores.json`` that ``eval compare`` reads (the rest is kept as is)."""
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    overall: Optional[float]
    overall_tasks: Optional[float]
    tracks: dict[str, Optional[float]]
    tasks: dict[str, _TaskScore]
    coverage: Optional[_Coverage] = None
    manifest: Optional[_Manifest] = None


@dataclass
class Run:
    folder: Path
    scores: dict
    predictions: list[dict]


def _first_error(where: str, e: ValidationError, data) -> str:
    from shoptune.configfile import format_errors
    lines = format_errors(where, e, data).splitlines()
    return lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")


def read_scores(folder: str | Path) -> dict:
    """``FOLDER/scores.json``, checked (numbers finite, the fields compare reads present)."""
    f = Path(folder) / "scores.json"
    if not (f.exists() or f.is_symlink()):
        raise FileNotFoundError(f"{f}: no scores.json (run `shoptune eval ... --out {folder}` first)")
    try:
        data = read_json(f, "scores.json")
    except InputError as e:
        raise RunFolderError(str(e)) from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{f}: expected a JSON object (as `shoptune eval` writes), got "
                             f"{type(data).__name__}")
    try:
        _Scores(**data)
    except ValidationError as e:
        raise RunFolderError(_first_error(str(f), e, data)) from None
    return _card_names(data)


def _card_names(s: dict) -> dict:
    """A run's tasks (scores, per-task adapters, single-question tasks) under their cards' names:
    runs written before #34 used ShopBench's ``task2``, so a run of then and one of now pair."""
    from shoptune.tasks import card_name
    s["tasks"] = {card_name(t): v for t, v in (s.get("tasks") or {}).items()}
    if s.get("task_adapters"):
        s["task_adapters"] = {card_name(t): a for t, a in s["task_adapters"].items()}
    single = (s.get("bootstrap") or {}).get("single_question_tasks")
    if single:
        s["bootstrap"]["single_question_tasks"] = [card_name(t) for t in single]
    return s


def _row_problem(row) -> tuple[str | None, str] | None:
    """(field, why) for the first way a predictions row is not what `shoptune eval` writes."""
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    for key in ("task_name", "capability", "metric", "score"):
        if key not in row:
            return key, "missing"
    if not isinstance(row["task_name"], str) or not row["task_name"]:
        return "task_name", f"must be a task name, got {row['task_name']!r}"
    if row["capability"] not in CAPABILITIES:
        return "capability", f"unknown capability {row['capability']!r}; one of {', '.join(CAPABILITIES)}"
    if row["metric"] not in METRICS:
        return "metric", f"unknown metric {row['metric']!r}; one of {', '.join(METRICS)}"
    score = row["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        return "score", f"must be a number, got {type(score).__name__} {score!r}"
    if not math.isfinite(score):
        return "score", f"must be a finite number, got {score!r}"
    if row["metric"] == "micro f1":
        c = row.get("counts")
        if not (isinstance(c, list) and len(c) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                for x in c)):
            return "counts", f"micro F1 needs [tp, fp, fn] (3 numbers >= 0), got {c!r}"
    return None


def read_predictions(folder: str | Path) -> list[dict]:
    """``FOLDER/predictions.jsonl`` (or that file itself), every row checked (a JSON object with
    ``task_name``, a known ``capability`` and ``metric``, a finite ``score``, ``counts`` for micro
    F1), each ``task_name`` its card's name (older runs wrote ShopBench's ``task2``)."""
    from shoptune.tasks import card_name
    f = Path(folder)
    f, folder = (f, f.parent) if f.suffix == ".jsonl" else (f / "predictions.jsonl", f)
    rows = []
    try:
        fh = open_input(f, "predictions.jsonl")
    except FileNotFoundError:
        raise FileNotFoundError(f"{f}: no predictions.jsonl (run `shoptune eval ... --out {folder}` "
                                "first)") from None
    except InputError as e:
        raise RunFolderError(str(e)) from None
    with fh:
        for n, raw in iter_lines(fh, ROW_CAP):
            if raw is None:
                raise RunFolderError(f"{f}:{n}: a row longer than the limit ({ROW_CAP[0]} raises it)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RunFolderError(f"{f}:{n}: invalid UTF-8 at byte {e.start}") from None
            if not text.strip():
                continue
            try:
                row = json_loads(text)
            except json.JSONDecodeError as e:
                raise RunFolderError(f"{f}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
            except JsonBoundsError as e:
                raise RunFolderError(f"{f}:{n}: {e}") from None
            problem = _row_problem(row)
            if problem:
                field, why = problem
                raise RunFolderError(f"{f}:{n}: {field + ': ' if field else ''}{why}")
            row["task_name"] = card_name(row["task_name"])
            rows.append(row)
    if not rows:
        raise RunFolderError(f"{f}: no rows")
    return rows


def read_run(folder: str | Path) -> Run:
    """Both files of an evaluation folder, checked against each other: as many rows as the
    questions ``scores.json`` lists, with the same ids in the same order."""
    scores = read_scores(folder)
    rows = read_predictions(folder)
    m = scores.get("manifest")
    if m is not None:
        where = Path(folder) / "predictions.jsonl"
        if len(rows) != m["n_questions"]:
            raise RunFolderError(f"{where}: {len(rows)} rows, but scores.json lists "
                                 f"{m['n_questions']} questions (a truncated or edited file?)")
        ids = m.get("ids") or []
        if ids and [r.get("id") for r in rows] != ids:
            n = next(i for i, (r, x) in enumerate(zip(rows, ids), 1) if r.get("id") != x)
            raise RunFolderError(f"{where}:{n}: id {rows[n - 1].get('id')!r}, but scores.json lists "
                                 f"{ids[n - 1]!r} as question {n}")
    return Run(Path(folder), scores, rows)


def check_compare_args(n_boot: int, n_perm: int) -> str | None:
    """Why ``--n-boot`` / ``--n-perm`` cannot be used (None when they can)."""
    for name, n in (("--n-boot", n_boot), ("--n-perm", n_perm)):
        if n < 1:
            return (f"{name} {n}: at least 1 resample is needed for an interval and a p-value "
                    "(the default, 2000, is the usual choice)")
    return None
