"""Deterministic per-task train/validation/test splits.

A record's split is decided by a seeded hash of its task and normalised question text alone, so
it never changes when files are reordered or grow (appends only add rows to each split), and
exact duplicates of a question always land in the same split.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

from shoptune.data.dedup import normalize
from shoptune.records import Record

SPLITS = ("train", "validation", "test")


def split_of(rec: Record, *, seed: int = 0, validation: float = 0.02, test: float = 0.05) -> str:
    if not (0 <= validation and 0 <= test and validation + test < 1):
        raise ValueError("validation and test fractions must be >= 0 and sum to < 1")
    key = f"{seed}\x00{rec.task}\x00{normalize(rec.input_field)}".encode("utf-8", "surrogatepass")
    u = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64
    if u < test:
        return "test"
    if u < test + validation:
        return "validation"
    return "train"


def split_records(records: Iterable[Record], *, seed: int = 0, validation: float = 0.02,
                  test: float = 0.05) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in records:
        out[split_of(r, seed=seed, validation=validation, test=test)].append(r)
    return out
