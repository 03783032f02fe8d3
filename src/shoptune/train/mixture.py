"""Task mixtures: which tasks, how many rows of each, in a fixed seeded order (plain data).

A mixture is a YAML file::

    sources: [ec-guide]              # files/folders (data-dir relative), or own tasks by name
    include_capabilities: []         # empty = all four
    exclude_tasks: [ecguide_acr_gen]
    split: train                     # train | validation | test (deterministic per-task split)
    total: 2000                      # rows to draw
    temperature: 2.0                 # p(task) ~ n^(1/T); T=1 proportional, T->inf uniform
    weights: {}                      # explicit per-task weights instead (override temperature)
    max_per_task: 400                # cap before sampling (per_task_caps overrides per task)
    upsample: false                  # allow repeating rows of small tasks to reach their quota
    dedup: true
    decontaminate_against: [shopbench-dev]   # data, or suite:NAME (an evaluation suite)
    decontaminate_ngram: 13          # also drop rows sharing a word 13-gram with them (0 = off)
    seed: 0

``shoptune data mix CONFIG --out FILE`` writes FILE (JSON lines) and FILE.manifest.json.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoptune.data.loaders import ON_INVALID, DataIssue, DataValidationError, iter_records, source_digest
from shoptune.data.splits import split_of
from shoptune.records import CAPABILITIES, Record
from shoptune.tasks import TaskName


class MixtureError(ValueError):
    """A mixture that cannot be built as asked (nothing selected, an unknown task): one line."""


class MixtureConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    sources: list[str] = Field(default=["ec-guide"], min_length=1)
    include_capabilities: list[str] = []
    exclude_capabilities: list[str] = []
    include_tasks: list[TaskName] = []  # card names (ShopBench's task2 is taken as shopbench_task2)
    exclude_tasks: list[TaskName] = []
    split: Literal["train", "validation", "test"] = "train"
    split_validation: float = Field(default=0.02, ge=0, lt=1)
    split_test: float = Field(default=0.05, ge=0, lt=1)
    split_seed: int = 0
    total: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    weights: dict[TaskName, Annotated[float, Field(ge=0)]] = {}
    max_per_task: int | None = Field(default=None, ge=1)
    per_task_caps: dict[TaskName, Annotated[int, Field(ge=0)]] = {}  # 0: none of that task
    upsample: bool = False
    dedup: bool = True
    decontaminate_against: list[str] = []
    decontaminate_ngram: int = Field(default=13, ge=0)
    seed: int = 0

    @field_validator("weights")
    @classmethod
    def _some_weight(cls, v: dict[str, float]) -> dict[str, float]:
        if v and not any(w > 0 for w in v.values()):
            raise ValueError("every weight is 0: the mixture would select nothing")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | dict | None = None) -> "MixtureConfig":
        """The mixture in ``path`` with ``key=value`` overrides (or a dict of top-level values);
        ConfigError names file, line and field. A training config's mixture is its ``mixture:``
        key (the overrides apply inside it)."""
        from shoptune.configfile import apply_overrides, load, parse_override, read_yaml, validate
        data, lines = read_yaml(path, "mixture")
        if isinstance(data.get("mixture"), dict):  # a training config (MixtureConfig has no such key)
            lines = {k[1:]: n for k, n in lines.items() if k[:1] == ("mixture",) and len(k) > 1}
            data = data["mixture"]
        elif not isinstance(overrides, dict):
            return load(cls, path, overrides or (), what="mixture")
        if isinstance(overrides, dict):
            return validate(cls, {**data, **overrides}, str(path), lines, [(k,) for k in overrides])
        apply_overrides(data, overrides)
        return validate(cls, data, str(path), lines,
                        {parse_override(item)[0]: item for item in overrides or ()})


def _asked(sizes: dict[str, int], cfg: MixtureConfig) -> dict[str, int]:
    """The rows each task's share of ``total`` asks for (its weight, or its size under the
    temperature), adding up to ``total`` exactly; all of each task without a ``total``."""
    if cfg.total is None:
        return dict(sizes)
    if cfg.weights:
        # unlisted tasks get the "*" weight (0 when there is none: weights then select tasks)
        raw = {t: cfg.weights.get(t, cfg.weights.get("*", 0.0)) for t in sizes}
    else:
        raw = {t: n ** (1.0 / cfg.temperature) for t, n in sizes.items()}
    z = sum(raw.values()) or 1.0
    want = {t: cfg.total * w / z for t, w in raw.items()}
    quota = {t: math.floor(v) for t, v in want.items()}
    # largest remainders, so the quotas add up to total exactly
    for t in sorted(want, key=lambda t: want[t] - quota[t], reverse=True)[: cfg.total - sum(quota.values())]:
        quota[t] += 1
    return quota


def _quotas(sizes: dict[str, int], cfg: MixtureConfig) -> dict[str, int]:
    """The rows drawn of each task: its share (:func:`_asked`), at most its rows unless upsampled."""
    asked = _asked(sizes, cfg)
    return asked if cfg.upsample else {t: min(q, sizes[t]) for t, q in asked.items()}


def build_mixture(cfg: MixtureConfig, *, allow_empty: bool = False, on_invalid: str = "skip",
                  issues: list[DataIssue] | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[list[Record], dict]:
    """Select, split, clean and sample the records; return them (seeded order) and a manifest.
    :class:`MixtureError` when nothing is selected (unless ``allow_empty``: a validation
    sample, say) or a task list names a task the sources lack.

    Rows breaking the record rules are skipped (``on_invalid="skip"``, counted in the manifest;
    ``issues``, when given, receives them) or stop the build (``"fail"``:
    :class:`~shoptune.data.loaders.DataValidationError`). ``progress`` is told each stage."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid {on_invalid!r}: one of {', '.join(ON_INVALID)}")
    for cap in cfg.include_capabilities + cfg.exclude_capabilities:
        if cap not in CAPABILITIES:
            raise MixtureError(f"unknown capability {cap!r}; one of {', '.join(CAPABILITIES)}")
    say = progress or (lambda _msg: None)
    issues = [] if issues is None else issues
    pool: dict[str, list[Record]] = defaultdict(list)
    present: Counter[str] = Counter()  # valid rows of each task in the sources
    say(f"reading {', '.join(cfg.sources)}")
    for n, rec in enumerate(iter_records(cfg.sources, issues=issues), 1):
        present[rec.task] += 1
        if n % 5000 == 0:
            say(f"reading {', '.join(cfg.sources)}: {n} rows")
        if cfg.include_capabilities and rec.capability not in cfg.include_capabilities:
            continue
        if rec.capability in cfg.exclude_capabilities or rec.task in cfg.exclude_tasks:
            continue
        if cfg.include_tasks and rec.task not in cfg.include_tasks:
            continue
        if split_of(rec, seed=cfg.split_seed, validation=cfg.split_validation,
                    test=cfg.split_test) == cfg.split:
            pool[rec.task].append(rec)
    if issues and on_invalid == "fail":
        raise DataValidationError(issues)
    _check_tasks(cfg, present, issues)
    removed: list[dict] = []
    contamination = None
    if cfg.dedup or cfg.decontaminate_against:
        from shoptune.data.dedup import contamination_summary, decontaminate, dedup
        from shoptune.eval.suite import load_eval_set
        flat = [r for t in sorted(pool) for r in pool[t]]
        if cfg.dedup:
            say(f"de-duplicating {len(flat)} rows")
            flat, rem = dedup(flat)
            removed += rem
        if cfg.decontaminate_against:
            say(f"decontaminating {len(flat)} rows against {', '.join(cfg.decontaminate_against)}")
            evals = {a: load_eval_set(a) for a in cfg.decontaminate_against}
            flat, rem = decontaminate(flat, evals, ngram=cfg.decontaminate_ngram)
            removed += rem
            contamination = contamination_summary(evals, rem)
        pool = defaultdict(list)
        for r in flat:
            pool[r.task].append(r)
    rng = random.Random(cfg.seed)
    for t in sorted(pool):
        rng.shuffle(pool[t])
        cap = cfg.per_task_caps.get(t, cfg.max_per_task)
        if cap is not None:
            pool[t] = pool[t][:cap]
    sizes = {t: len(v) for t, v in sorted(pool.items()) if v}
    asked, quotas = _asked(sizes, cfg), _quotas(sizes, cfg)
    # tasks with fewer rows than their share asks for (without upsample: why a mixture is short)
    short = {t: {"asked": asked[t], "rows": sizes[t]} for t in asked if quotas[t] < asked[t]}
    chosen: list[Record] = []
    for t, q in quotas.items():
        rows = pool[t]
        chosen += [rows[i % len(rows)] for i in range(q)]
    if not chosen and not allow_empty:
        raise MixtureError(f"the mixture selects no rows: {sum(present.values())} "
                           f"valid rows in the sources, none left after the capability/task "
                           f"filters, the {cfg.split} split, dedup and decontamination"
                           + (", and the weights" if cfg.weights else ""))
    rng.shuffle(chosen)
    manifest = make_manifest(chosen, cfg, removed=removed, skipped_invalid=len(issues))
    manifest["short_tasks"] = short
    if contamination is not None:  # per evaluation set: its questions found in the training pool
        manifest["contamination"] = contamination
    return chosen, manifest


def _check_tasks(cfg: MixtureConfig, present: Counter, issues: list[DataIssue]) -> None:
    """Refuse what would make a mixture silently empty or other than asked: sources without a
    valid row, ``include_tasks`` naming a task the sources lack, and other task lists naming a
    task that neither the sources nor the task cards know (a typo)."""
    if not present:
        first = f"; first: {issues[0]}" if issues else ""
        raise MixtureError(f"sources {cfg.sources}: no valid rows ({len(issues)} problem(s){first})")
    from shoptune.tasks import all_cards
    known = set(all_cards()) | set(present)
    have = ", ".join(sorted(present)[:12]) + (", ..." if len(present) > 12 else "")
    for field, names in (("include_tasks", cfg.include_tasks), ("exclude_tasks", cfg.exclude_tasks),
                         ("weights", [t for t in cfg.weights if t != "*"]),
                         ("per_task_caps", list(cfg.per_task_caps))):
        pool = present if field == "include_tasks" else known
        bad = [t for t in names if t not in pool]
        if bad:
            why = "has no rows in the sources" if field == "include_tasks" else "is not a known task"
            raise MixtureError(f"{field}: {bad[0]!r} {why} (tasks in the sources: {have})")


def make_manifest(records: list[Record], cfg: MixtureConfig, *, removed: list[dict],
                  skipped_invalid: int) -> dict:
    tasks = Counter(r.task for r in records)
    caps = Counter(r.capability for r in records)
    n = len(records) or 1
    entropy = -sum((c / n) * math.log(c / n) for c in tasks.values())
    return {
        "rows": len(records),
        "tasks": dict(sorted(tasks.items())),
        "capabilities": dict(sorted(caps.items())),
        "task_types": dict(Counter(r.task_type for r in records)),
        "unique_rows": len({r.id for r in records}),
        "chars": {"input": sum(len(r.input_field) for r in records),
                  "output": sum(len(str(r.output_field)) for r in records)},
        "diversity": {"n_tasks": len(tasks), "n_capabilities": len(caps),
                      "task_entropy_nats": round(entropy, 4),
                      "effective_tasks": round(math.exp(entropy), 2)},
        "removed": dict(Counter(r["reason"] for r in removed)),
        "skipped_invalid_rows": skipped_invalid,
        "sources": {s: source_digest(s) for s in
                    cfg.sources + cfg.decontaminate_against if not s.startswith("suite:")},
        "config": cfg.model_dump(),
    }
