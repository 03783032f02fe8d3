"""An experiment file (``configs/experiments/*.yaml``): plain data expanded into runs.

    name: rank
    base: configs/train/experiment.yaml     # a training config (repo-, file- or configs-relative)
    overrides: [mixture.total=800]          # applied to every cell
    suite: core                             # evaluation suite (configs/eval/NAME.yaml or a path)
    seeds: [0, 1]                           # training seed of each repetition (`seed=S`)
    budget: {tokens: 300000}                # equal training tokens per run (or {steps: N}; null:
                                            #   the config's max_steps)
    baseline: r16                           # the cell every other one is compared with
    cells:                                  # name + `key=value` overrides (as `shoptune train`)
      - {name: r16, overrides: [lora.r=16]}
      - {name: r64, overrides: [lora.r=64], baseline: r16}   # optional: its own reference cell
      - {name: per-task, per_task: true}    # one adapter per task, the same total budget
      - {name: per-cap, per_capability: true}   # one adapter per capability
      - {name: per-cap-ties, merge_of: per-cap, merge: {method: ties, density: 0.2}}
    eval: {engine: llama.cpp, dtype: fp32}  # how runs are scored (part of the key; default builtin/auto)
    grid:                                   # and/or: the product of these, one cell per point
      lora.r: [8, 32]
      mixture.include_capabilities: [[concept_understanding], []]

A *run* is one cell at one seed. Its key is a hash of its resolved training config (everything
but ``output_dir``), the suite's fingerprint and the evaluation protocol: change any of them and
the run is new; change nothing and a finished run is skipped.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoptune import REPO_CONFIGS
from shoptune.paths import REPO_ROOT


class Budget(BaseModel):
    """Training budget per run: ``tokens`` (prompt + answer tokens, not padding; the default
    way to make cells comparable) or ``steps``."""
    model_config = ConfigDict(extra="forbid")
    tokens: int | None = Field(default=None, ge=1)
    steps: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.tokens is None) == (self.steps is None):
            raise ValueError("budget: give exactly one of tokens, steps")
        return self


class Cell(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$", max_length=80)
    overrides: list[str] = []
    baseline: str | None = None  # compare this cell with another than the experiment's baseline
    # one adapter per task of the cell's mixture instead of one for all (arXiv 2411.03644's
    # single-task arm): each trains on its task's rows with its task's share of the budget, and
    # each suite question is answered by its task's adapter (the base model for other tasks)
    per_task: bool = False
    # one adapter per capability (multi-LoRA by capability): each on its capability's rows with
    # its share of the budget; every suite question answered by its capability's adapter
    per_capability: bool = False
    # no training of its own: the adapters of cell ``merge_of`` (same seed; a per_task or
    # per_capability cell) merged into one with peft's add_weighted_adapter
    merge_of: str | None = None
    merge: "MergeSettings | None" = None

    @model_validator(mode="after")
    def _one_kind(self):
        if self.per_task and self.per_capability:
            raise ValueError("per_task and per_capability: choose one")
        if self.merge_of and (self.per_task or self.per_capability or self.overrides):
            raise ValueError("merge_of: a merge cell trains nothing (no per_task/per_capability/overrides)")
        if self.merge is not None and not self.merge_of:
            raise ValueError("merge: needs merge_of (the cell whose adapters are merged)")
        return self


class MergeSettings(BaseModel):
    """How a ``merge_of`` cell merges: peft's ``combination_type`` and TIES/DARE ``density``."""
    model_config = ConfigDict(extra="forbid")
    method: str = "ties"
    density: float = Field(default=0.2, gt=0, le=1)

    @field_validator("method")
    @classmethod
    def _peft_method(cls, v: str) -> str:
        from shoptune.experts import MERGE_METHODS
        if v not in MERGE_METHODS:
            raise ValueError(f"{v!r} is not a combination type of peft's add_weighted_adapter "
                             f"(one of {', '.join(MERGE_METHODS)})")
        return v


class EvalSettings(BaseModel):
    """How every run of the experiment is scored: the engine (``shoptune eval --engine``) and
    dtype. Part of each run's key when not the defaults (builtin, auto), so runs scored on
    different engines or dtypes are never mixed."""
    model_config = ConfigDict(extra="forbid")
    engine: str = Field(default="builtin", pattern=r"^(builtin|llama\.cpp|vllm)$")
    dtype: str = Field(default="auto", pattern=r"^(auto|bf16|fp32)$")

    def in_key(self) -> dict | None:
        return None if (self.engine, self.dtype) == ("builtin", "auto") else self.model_dump()


Cell.model_rebuild()


class Contrast(BaseModel):
    """Does one gain differ from another? ``(b[1] - b[0]) - (a[1] - a[0])``, each a (from, to)
    pair of cells, e.g. ``{name: rank-pays-more-on-diverse, a: [narrow-r8, narrow-r32],
    b: [diverse-r8, diverse-r32]}``; reported with a paired bootstrap CI over the same questions."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=,+-]*$", max_length=80)
    a: tuple[str, str]
    b: tuple[str, str]


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    base: str
    overrides: list[str] = []
    suite: str = "core"
    protocol: str = "starter-kit"
    seeds: list[int] = Field(default=[0], min_length=1)  # distinct: a seed is one repetition
    budget: Budget | None = None
    baseline: str
    eval: EvalSettings = EvalSettings()
    cells: list[Cell] = []
    grid: dict[str, list] = {}
    contrasts: list[Contrast] = []

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"seed {dup[0]} is listed twice (each seed is one repetition of every cell)")
        return v

    def expanded_cells(self) -> list[Cell]:
        """The cells, then the grid's product, checked (linear in the number of cells: a grid of
        90,000 points is checked in well under a second)."""
        cells = list(self.cells)
        if self.grid:
            keys = list(self.grid)
            for values in itertools.product(*(self.grid[k] for k in keys)):
                name = ",".join(f"{_short(k)}={_compact(v)}" for k, v in zip(keys, values))
                cells.append(Cell(name=name, overrides=[f"{k}={json.dumps(v)}" for k, v in zip(keys, values)]))
        names = [c.name for c in cells]
        position = {n: i for i, n in enumerate(names)}
        if len(position) < len(names):
            counts = Counter(names)
            dup = sorted(n for n, k in counts.items() if k > 1)
            raise ValueError(f"experiment {self.name}: cell names used twice: {', '.join(dup)}")
        if not cells:
            raise ValueError(f"experiment {self.name}: no cells (give cells: or grid:)")
        for i, c in enumerate(cells):
            if not c.merge_of:
                continue
            src = cells[position[c.merge_of]] if c.merge_of in position else None
            if src is None or not (src.per_task or src.per_capability):
                raise ValueError(f"experiment {self.name}: cell {c.name}: merge_of {c.merge_of!r} must be "
                                 "a per_task or per_capability cell listed before it")
            if position[src.name] > i:
                raise ValueError(f"experiment {self.name}: cell {c.name} merges {src.name}, listed after it")
        for ref in [self.baseline, *(c.baseline for c in cells if c.baseline),
                    *(x for c in self.contrasts for x in (*c.a, *c.b))]:
            if ref not in position:
                shown = ", ".join(names[:20]) + (f", ... ({len(names)} cells)" if len(names) > 20 else "")
                raise ValueError(f"experiment {self.name}: {ref!r} (a baseline or contrast cell) is not a cell "
                                 f"(cells: {shown})")
        return cells


def _short(key: str) -> str:
    return key.split(".")[-1]


def _compact(v) -> str:
    if isinstance(v, list):
        return "+".join(_compact(x) for x in v) or "all"
    return re.sub(r"[^A-Za-z0-9_.-]", "", str(v))


def resolve_path(p: str | Path, relative_to: Path | None = None) -> Path:
    """As given, else beside the experiment file, else in the repo, else under shipped configs."""
    p = Path(p)
    for cand in (p, *((relative_to / p,) if relative_to else ()), REPO_ROOT / p,
                 REPO_CONFIGS / p, REPO_CONFIGS.parent / p):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{p}: no such file")


def load_spec(path: str | Path) -> ExperimentSpec:
    """The experiment in ``path``; ConfigError (a ValueError) names file, line and field."""
    from shoptune.configfile import load
    p = Path(path)
    if not (p.exists() or p.is_symlink()):  # (a symlink loop: its reader says so)
        raise FileNotFoundError(f"{p}: no such experiment file")
    spec = load(ExperimentSpec, p, what="experiment")
    spec.expanded_cells()
    return spec


def run_key(config: dict, suite_fingerprint: str, protocol: str, *, per_task: bool = False,
            per_capability: bool = False, merge: dict | None = None, eval_settings: dict | None = None) -> str:
    from shoptune.train.config import key_config

    cfg = {k: v for k, v in key_config(config).items() if k != "output_dir"}
    key = {"config": cfg, "suite": suite_fingerprint, "protocol": protocol}
    # (each only when set: keys of runs that do not use it stay what they were)
    if per_task:
        key["per_task"] = True
    if per_capability:
        key["per_capability"] = True
    if merge:
        key["merge"] = merge
    if eval_settings:
        key["eval"] = eval_settings
    blob = json.dumps(key, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def steps_for_budget(budget: Budget | None, max_steps: int, avg_tokens_per_row: float,
                     rows_per_step: int) -> int:
    """Optimizer steps that spend the budget: tokens / (average tokens per row of this cell's
    mixture x rows per step), rounded; at least 1."""
    if budget is None:
        return max_steps
    if budget.steps is not None:
        return budget.steps
    return max(1, round(budget.tokens / (avg_tokens_per_row * rows_per_step)))
