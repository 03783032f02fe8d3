"""Counts, token lengths and duplicates of task data (``shoptune data stats``)."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from shoptune.data.dedup import normalize
from shoptune.data.loaders import check_fields
from shoptune.records import Record

PERCENTILES = (50, 90, 99, 100)


def _dataset_of(rec: Record) -> str:
    src = rec.source.replace("\\", "/")
    if "/ec-guide/" in f"/{src}":
        return "ec-guide"
    if rec.task.startswith("shopbench_") or rec.track:
        return "shopbench"
    return "custom"


def _percentiles(lengths: list[int]) -> dict[str, int]:
    if not lengths:
        return {f"p{p}": 0 for p in PERCENTILES}
    arr = np.asarray(lengths)
    return {("max" if p == 100 else f"p{p}"): int(np.percentile(arr, p)) for p in PERCENTILES}


def token_lengths(tokenizer, texts: Sequence[str], batch_size: int = 2048,
                  max_chars: int = 4 * 1024 * 1024) -> list[int]:
    """Token count of each text, tokenized in batches of at most ``batch_size`` texts and
    ``max_chars`` characters (a fast tokenizer holds ~200 bytes per input character while it
    works: batches bounded by size, not only by count, keep long rows from taking GBs)."""
    out: list[int] = []
    i = 0
    while i < len(texts):
        j, chars = i, 0
        while j < len(texts) and j - i < batch_size and (j == i or chars + len(texts[j]) <= max_chars):
            chars += len(texts[j])
            j += 1
        out += [len(x) for x in tokenizer(list(texts[i:j]), add_special_tokens=False)["input_ids"]]
        i = j
    return out


def compute_stats(records: Sequence[Record], tokenizer=None, batch_size: int = 2048,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """Statistics of a record list; token lengths need ``tokenizer`` (else omitted).
    ``progress(done, total)`` after each batch of rows tokenized."""
    by_task: dict[str, dict] = {}
    for r in records:
        t = by_task.setdefault(r.task, {"task": r.task, "capability": r.capability,
                                        "task_type": r.task_type, "metric": r.metric, "rows": 0})
        t["rows"] += 1
        if t["metric"] != r.metric and r.metric not in t["metric"].split("|"):
            t["metric"] += f"|{r.metric}"
    qa = Counter((r.task, normalize(r.input_field), json.dumps(r.output_field, sort_keys=True))
                 for r in records)
    q = Counter((r.task, normalize(r.input_field)) for r in records)
    out = {
        "total_rows": len(records),
        "invalid_rows": sum(1 for r in records if check_fields(r.to_dict())),
        "by_capability": dict(Counter(r.capability for r in records).most_common()),
        "by_task_type": dict(Counter(r.task_type for r in records).most_common()),
        "by_source": dict(Counter(_dataset_of(r) for r in records).most_common()),
        "by_task": sorted(by_task.values(), key=lambda t: (t["capability"], t["task"])),
        "duplicates": {"exact_question_and_answer": sum(c - 1 for c in qa.values()),
                       "same_question": sum(c - 1 for c in q.values())},
    }
    if tokenizer is not None:
        inp, outp = [], []
        for i in range(0, len(records), batch_size):
            chunk = records[i:i + batch_size]
            inp += token_lengths(tokenizer, [r.input_field for r in chunk], batch_size)
            golds = [r.output_field if isinstance(r.output_field, str)
                     else json.dumps(r.output_field, ensure_ascii=False) for r in chunk]
            outp += token_lengths(tokenizer, golds, batch_size)
            if progress:
                progress(i + len(chunk), len(records))
        out["tokens"] = {"input": _percentiles(inp), "output": _percentiles(outp),
                         "total_input": int(sum(inp)), "total_output": int(sum(outp))}
    return out
