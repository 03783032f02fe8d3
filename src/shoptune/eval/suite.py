"""Evaluation suites: a fixed, versioned set of questions defined as data (``configs/eval/*.yaml``).

    shoptune eval --suite core --model smollm2-135m --out runs/suite-base
    shoptune eval suite core            # what is in it (counts per capability, task, type)

A suite is a list of parts; each part is a set of sources, optionally restricted to the
project's deterministic split (``shoptune.data.splits``, the same one training mixtures draw
from, so a ``test`` part is never trained on) and sampled per task: up to ``per_task_cap``
questions of each task, a seeded shuffle, i.e. a stratified seeded sample. The manifest of the
built suite (ordered question ids, source hashes, name, version, fingerprint) goes into every
``scores.json``; runs are comparable only when their fingerprints match.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoptune import REPO_CONFIGS
from shoptune.records import Record
from shoptune.tasks import TaskName

SUITES_DIR = REPO_CONFIGS / "eval"


class SuitePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    sources: list[str]
    split: Literal["train", "validation", "test"] | None = None  # None: every row of the sources
    split_validation: float = 0.02  # must equal the training mixtures' split settings
    split_test: float = 0.05
    split_seed: int = 0
    include_tasks: list[TaskName] = []  # card names (or ShopBench's task2)
    exclude_tasks: list[TaskName] = []
    per_task_cap: int | None = Field(default=None, ge=1)
    per_task_caps: dict[TaskName, int] = {}
    seed: int = 0


class SuiteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: int = 1
    description: str = ""
    parts: list[SuitePart] = Field(min_length=1)


def suite_path(name_or_path: str | Path) -> Path:
    """A suite name (``core`` -> configs/eval/core.yaml) or a YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not (p.exists() or p.is_symlink()):  # (a symlink loop: its reader says so)
            raise FileNotFoundError(f"{p}: no such suite file")
        return p
    cand = SUITES_DIR / f"{name_or_path}.yaml"
    if not cand.exists():
        known = ", ".join(sorted(x.stem for x in SUITES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"unknown suite {str(name_or_path)!r}; shipped: {known} (or a .yaml path)")
    return cand


def _shown(path: Path) -> str:
    """A shipped suite as ``configs/eval/NAME.yaml`` (the same on every machine and checkout, so
    committed manifests do not change with where the package lives); another file as given."""
    try:
        return "configs/" + path.resolve().relative_to(REPO_CONFIGS.resolve()).as_posix()
    except ValueError:
        return str(path)


def load_suite_config(name_or_path: str | Path) -> SuiteConfig:
    from shoptune.configfile import read_yaml
    p = suite_path(name_or_path)
    data, _ = read_yaml(p, "suite")  # (bounded: size, aliases; a ConfigError is a ValueError)
    try:
        return SuiteConfig(**data)
    except ValidationError as e:
        raise ValueError(f"{p}: {e}") from None


def _part_records(part: SuitePart) -> list[Record]:
    from shoptune.data.loaders import iter_records
    from shoptune.data.splits import split_of

    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in iter_records(part.sources, issues=[]):  # rows breaking the record rules are skipped
        if part.include_tasks and r.task not in part.include_tasks or r.task in part.exclude_tasks:
            continue
        if part.split and split_of(r, seed=part.split_seed, validation=part.split_validation,
                                   test=part.split_test) != part.split:
            continue
        by_task[r.task].append(r)
    out: list[Record] = []
    for t in sorted(by_task):
        rows = by_task[t]
        cap = part.per_task_caps.get(t, part.per_task_cap)
        if cap and len(rows) > cap:  # seeded per task (adding a task leaves the others alone)
            pick = sorted(random.Random(f"{part.seed}:{t}").sample(range(len(rows)), cap))
            rows = [rows[i] for i in pick]  # file order kept
        out += rows
    return out


def fingerprint(ids: list[str], sources: dict[str, str]) -> str:
    """Hash of the ordered question ids and the source files' contents (not their paths)."""
    blob = json.dumps({"ids": ids, "sources": sorted(sources.values())}).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_suite(name_or_path: str | Path) -> tuple[list[Record], dict]:
    """The suite's questions (parts in order, tasks sorted within a part) and its manifest."""
    from shoptune.data.loaders import source_digest

    cfg = load_suite_config(name_or_path)
    records: list[Record] = []
    parts = []
    sources: dict[str, str] = {}
    for part in cfg.parts:
        recs = _part_records(part)
        if not recs:
            raise ValueError(f"suite {cfg.name}: part {part.name!r} selected no questions")
        for s in part.sources:
            sources[s] = source_digest(s)
        parts.append({"name": part.name, "n": len(recs),
                      "tasks": dict(sorted(Counter(r.task for r in recs).items()))})
        records += recs
    ids = [r.id for r in records]
    manifest = {
        "suite": cfg.name, "version": cfg.version, "config": _shown(suite_path(name_or_path)),
        "n_questions": len(records), "fingerprint": fingerprint(ids, sources),
        "sources": sources, "parts": parts,
        "capabilities": dict(Counter(r.capability for r in records)),
        "task_types": dict(Counter(r.task_type for r in records)),
        "ids": ids,
    }
    return records, manifest


def data_manifest(records: list[Record], data: list[str]) -> dict:
    """The same manifest for a plain ``--data`` run (no suite name)."""
    from shoptune.data.loaders import source_digest

    ids = [r.id for r in records]
    sources = {str(d): source_digest(d) for d in data}
    return {"suite": None, "version": None, "n_questions": len(records),
            "fingerprint": fingerprint(ids, sources), "sources": sources,
            "capabilities": dict(Counter(r.capability for r in records)),
            "task_types": dict(Counter(r.task_type for r in records)), "ids": ids}


def manifest_of(run_dir: str | Path) -> dict:
    """A run's manifest: from scores.json, else rebuilt from predictions.jsonl (older runs)."""
    from shoptune.eval.runs import read_predictions, read_scores
    d = Path(run_dir)
    s = read_scores(d)  # (bounded and checked: RunFolderError names the file)
    if "manifest" in s:
        return s["manifest"]
    preds = d / "predictions.jsonl"
    ids = [r.get("id") for r in read_predictions(d)] if preds.exists() else []
    sources = {x["path"]: x["sha256_16"] for x in s.get("data", [])}
    return {"suite": None, "version": None, "n_questions": len(ids),
            "fingerprint": fingerprint(ids, sources), "sources": sources, "ids": ids}


def load_eval_set(spec: str) -> list[Record]:
    """``suite:NAME`` (or ``suite:PATH.yaml``): a suite's questions; anything else: data files."""
    from shoptune.data.loaders import load_records

    if spec.startswith("suite:"):
        return build_suite(spec.split(":", 1)[1])[0]
    return load_records([spec])


class ManifestMismatch(ValueError):
    pass


def check_same_questions(manifests: dict[str, dict]) -> None:
    """Raise :class:`ManifestMismatch` saying what differs unless every manifest matches the first."""
    (a_name, a), *rest = manifests.items()
    for b_name, b in rest:
        if a["fingerprint"] == b["fingerprint"]:
            continue
        why = []
        if (a.get("suite"), a.get("version")) != (b.get("suite"), b.get("version")):
            why.append(f"suite {a.get('suite')} v{a.get('version')} vs {b.get('suite')} v{b.get('version')}")
        if a["n_questions"] != b["n_questions"]:
            why.append(f"{a['n_questions']} vs {b['n_questions']} questions")
        elif a.get("ids") != b.get("ids"):
            n = sum(x != y for x, y in zip(a.get("ids", []), b.get("ids", [])))
            why.append(f"{n} question ids differ")
        if sorted(a.get("sources", {}).values()) != sorted(b.get("sources", {}).values()):
            why.append(f"source files differ ({a.get('sources')} vs {b.get('sources')})")
        raise ManifestMismatch(
            f"{a_name} and {b_name} were not evaluated on the same questions "
            f"({'; '.join(why) or 'fingerprints differ'}): their scores cannot be compared. "
            f"Evaluate both with the same --suite (or the same --data, no --limit).")
