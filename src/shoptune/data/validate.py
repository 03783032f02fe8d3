"""Validate data files: every problem, with file, line and field, collected in one pass."""
from __future__ import annotations

from shoptune.data.loaders import DataIssue, issue_at, iter_records


def validate_records(paths, *, task: str | None = None,
                     mapping: dict[str, str] | None = None) -> tuple[int, list[DataIssue]]:
    """Return (number of valid rows, issues).

    Besides the per-row rules, ids given in the data (an ``id`` column) must be unique; ids
    shoptune derives from content are not checked here (exact duplicates are `data dedup`'s job).
    """
    issues: list[DataIssue] = []
    seen: dict[str, str] = {}
    n_ok = 0
    for rec in iter_records(paths, task=task, mapping=mapping, issues=issues):
        if rec.extra.get("id_given"):
            if rec.id in seen:
                issues.append(issue_at(rec.source, "id",
                                       f"duplicate id {rec.id!r} (first at {seen[rec.id]})"))
                continue
            seen[rec.id] = rec.source
        n_ok += 1
    return n_ok, issues
