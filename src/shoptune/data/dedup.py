"""Exact and near-duplicate removal, and decontamination against evaluation sets.

Near duplicates use MinHash + LSH (``datasketch``) over character 5-grams of a record's *content*:
the question with its task's template lines (lines shared by many rows of the task, such as the
instruction or "Answer:") removed, so two different questions with one long shared template are
not mistaken for copies. Every removal is reported with its reason and what it duplicates.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import xxhash
from datasketch import MinHash, MinHashLSH

from shoptune.records import Record

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _WS.sub(" ", _PUNCT.sub(" ", text)).strip()


def _template_lines(records: Sequence[Record], min_count: int = 3, min_frac: float = 0.01) -> set[str]:
    """Lines shared by many rows of a collection: instructions, "Answer:", fixed options."""
    counts: Counter[str] = Counter()
    for r in records:
        counts.update({normalize(x) for x in r.input_field.splitlines()})
    cutoff = max(min_count, min_frac * len(records))
    return {line for line, c in counts.items() if c >= cutoff}


def content(rec: Record, template: set[str]) -> str:
    lines = [normalize(x) for x in rec.input_field.splitlines()]
    kept = [x for x in lines if x and x not in template]
    return " ".join(kept) if kept else " ".join(x for x in lines if x)


def _minhash(text: str, num_perm: int, k: int = 5) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1, hashfunc=xxhash.xxh32_intdigest)
    grams = {text[i:i + k] for i in range(max(1, len(text) - k + 1))}
    m.update_batch([g.encode("utf-8", "surrogatepass") for g in grams])
    return m


def _templates_by_task(records: Sequence[Record]) -> dict[str, set[str]]:
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    return {t: _template_lines(rs) for t, rs in by_task.items()}


def dedup(records: Iterable[Record], *, threshold: float = 0.9, num_perm: int = 64,
          near: bool = True) -> tuple[list[Record], list[dict]]:
    """Drop exact duplicates (same normalised question and answer) and near duplicates (content
    Jaccard >= ``threshold`` within a task). Returns (kept, removal report rows)."""
    records = list(records)
    templates = _templates_by_task(records) if near else {}
    seen_exact: dict[tuple, Record] = {}
    lsh: dict[str, MinHashLSH] = {}
    hashes: dict[str, tuple[MinHash, Record]] = {}
    kept, removed = [], []
    for r in records:
        key = (r.task, normalize(r.input_field),
               json.dumps(r.output_field, ensure_ascii=False, sort_keys=True))
        if key in seen_exact:
            first = seen_exact[key]
            removed.append({"id": r.id, "task": r.task, "source": r.source,
                            "reason": "exact-duplicate", "of": first.id, "of_source": first.source})
            continue
        seen_exact[key] = r
        if near:
            # Question content plus answer: one question with several distinct answers is kept.
            m = _minhash(content(r, templates[r.task]) + " || " + normalize(key[2]), num_perm)
            if r.task not in lsh:
                lsh[r.task] = MinHashLSH(threshold=threshold, num_perm=num_perm)
            index = lsh[r.task]
            sims = ((hashes[h][0].jaccard(m), h) for h in index.query(m))
            best = max(sims, default=None)
            if best and best[0] >= threshold:
                first = hashes[best[1]][1]
                removed.append({"id": r.id, "task": r.task, "source": r.source,
                                "reason": "near-duplicate", "of": first.id,
                                "of_source": first.source, "similarity": round(best[0], 4)})
                continue
            key_id = str(len(kept))
            index.insert(key_id, m)
            hashes[key_id] = (m, r)
        kept.append(r)
    return kept, removed


def decontaminate(train: Iterable[Record], evals: dict[str, Sequence[Record]], *,
                  threshold: float = 0.8, num_perm: int = 64) -> tuple[list[Record], list[dict]]:
    """Drop training records whose question appears in any evaluation set: exactly (normalised
    question) or nearly (content Jaccard >= ``threshold``, any task). Returns (kept, report)."""
    train = list(train)
    exact: dict[str, tuple[str, Record]] = {}
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[str, tuple[MinHash, str, Record]] = {}
    for name, recs in evals.items():
        template = _template_lines(recs)
        for i, e in enumerate(recs):
            exact.setdefault(normalize(e.input_field), (name, e))
            m = _minhash(content(e, template), num_perm)
            key = f"{name}\x00{i}"
            index.insert(key, m)
            hashes[key] = (m, name, e)
    templates = _templates_by_task(train)
    kept, removed = [], []
    for r in train:
        hit = exact.get(normalize(r.input_field))
        if hit:
            removed.append({"id": r.id, "task": r.task, "source": r.source,
                            "reason": "contaminated-exact", "eval_set": hit[0],
                            "of": hit[1].id, "of_source": hit[1].source})
            continue
        m = _minhash(content(r, templates[r.task]), num_perm)
        best = max(((hashes[k][0].jaccard(m), k) for k in index.query(m)), default=None)
        if best and best[0] >= threshold:
            _, name, e = hashes[best[1]]
            removed.append({"id": r.id, "task": r.task, "source": r.source,
                            "reason": "contaminated-near", "eval_set": name, "of": e.id,
                            "of_source": e.source, "similarity": round(best[0], 4)})
            continue
        kept.append(r)
    return kept, removed
