"""Score raw model outputs: parse, per-sample metrics, then task / track / overall aggregation
with 95% bootstrap confidence intervals (questions resampled within each task)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from shoptune import tasks
from shoptune.eval.metrics import COUNT_METRICS, micro_f1, score_batch, task_metric
from shoptune.records import CAPABILITIES, CAPABILITY_TO_TRACK, Record


def score_outputs(records: Sequence[Record], outputs: Sequence[str]) -> list[dict]:
    """One row per question: input, task, raw output, parsed answer and score. ``task_name`` is
    the task card's name, as everywhere (``shopbench_task2``; runs before #34 wrote ShopBench's
    own ``task2`` there: :func:`shoptune.eval.runs.read_predictions` reads both)."""
    if len(records) != len(outputs):
        raise ValueError(f"{len(records)} records but {len(outputs)} outputs")
    parsed = [tasks.parse_answer(r.task_type, r.metric, o, r.task) for r, o in zip(records, outputs)]
    by_metric: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_metric[r.metric].append(i)
    scores: list = [None] * len(records)
    for metric, idx in by_metric.items():
        vals = score_batch(metric, [parsed[i] for i in idx], [records[i].output_field for i in idx])
        for i, v in zip(idx, vals):
            scores[i] = v
    rows = []
    for r, out, p, s in zip(records, outputs, parsed, scores):
        row = {"id": r.id, "input_field": r.input_field, "task_name": r.task, "task": r.task,
               "capability": r.capability, "task_type": r.task_type, "metric": r.metric,
               "output_field": r.output_field, "model_output": out, "parsed": p}
        if r.metric in COUNT_METRICS:
            row["counts"] = list(s)
            row["score"] = micro_f1([s])
        else:
            row["score"] = float(s)
        rows.append(row)
    return rows


def _task_value(rows: Sequence[dict]) -> float:
    if "counts" in rows[0]:
        return micro_f1([r["counts"] for r in rows])
    return float(np.mean([r["score"] for r in rows]))


def rollup(task_scores: dict, task_cap: dict[str, str]) -> tuple[dict, object, object]:
    """Task scores -> (capability (track) scores, all-around = mean of tracks, mean over tasks).

    Values may be floats or numpy arrays of equal shape (bootstrap resamples): means are taken
    element-wise, so the paired comparison aggregates exactly as :func:`summarize` does."""
    caps = [c for c in CAPABILITIES if c in {task_cap[t] for t in task_scores}]
    tracks = {c: np.mean([s for t, s in task_scores.items() if task_cap[t] == c], axis=0) for c in caps}
    return tracks, np.mean(list(tracks.values()), axis=0), np.mean(list(task_scores.values()), axis=0)


def summarize(rows: Sequence[dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Task, track (capability) and overall scores, with bootstrap CIs."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task_name"]].append(r)
    task_cap = {t: rs[0]["capability"] for t, rs in by_task.items()}
    tasks = {t: _task_value(rs) for t, rs in by_task.items()}
    caps = [c for c in CAPABILITIES if c in task_cap.values()]

    def rollup_(task_scores: dict[str, float]) -> tuple[dict[str, float], float, float]:
        tracks, ov, ovt = rollup(task_scores, task_cap)
        return {c: float(v) for c, v in tracks.items()}, float(ov), float(ovt)

    tracks, overall, overall_tasks = rollup_(tasks)
    rng = np.random.default_rng(seed)
    boot_tasks = {t: [] for t in tasks}
    boot = {"tracks": {c: [] for c in caps}, "overall": [], "overall_tasks": []}
    for _ in range(n_boot):
        sample = {}
        for t, rs in by_task.items():
            pick = rng.integers(0, len(rs), len(rs))
            sample[t] = _task_value([rs[i] for i in pick])
            boot_tasks[t].append(sample[t])
        tr, ov, ovt = rollup_(sample)
        for c in caps:
            boot["tracks"][c].append(tr[c])
        boot["overall"].append(ov)
        boot["overall_tasks"].append(ovt)

    single = sorted((t for t, rs in by_task.items() if len(rs) < 2), key=_natural)

    def ci(xs, over=None):
        """The 95% interval, or None when it cannot be computed: no resamples, or every task it
        rests on (``over``) has one question, which resampling within the task never moves."""
        if not xs or all(t in single for t in (over if over is not None else tasks)):
            return None
        return [float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))]

    return {
        "overall": overall,
        "overall_tasks": overall_tasks,
        "tracks": {CAPABILITY_TO_TRACK[c]: tracks[c] for c in caps},
        "capabilities": tracks,
        "tasks": {t: {"score": s, "metric": "|".join(sorted({r["metric"] for r in by_task[t]})),
                      "capability": task_cap[t], "n": len(by_task[t]), "ci95": ci(boot_tasks[t], [t]),
                      **_more_metrics(by_task[t])}
                  for t, s in sorted(tasks.items(), key=lambda kv: _natural(kv[0]))},
        "ci95": {"overall": ci(boot["overall"]), "overall_tasks": ci(boot["overall_tasks"]),
                 "tracks": {CAPABILITY_TO_TRACK[c]: ci(boot["tracks"][c], [t for t in tasks if task_cap[t] == c])
                            for c in caps}},
        "n_questions": len(rows),
        # tasks with one question add no uncertainty to any interval (too narrow where they count)
        "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "questions within each task",
                      "single_question_tasks": single},
    }


def _more_metrics(rows: Sequence[dict]) -> dict:
    """``{"metrics": {name: value}}`` for a task whose card names more than its score's metric
    (a label task: accuracy and macro-F1; JSON: field F1 and the valid-JSON rate); {} else."""
    card = tasks.find_card(rows[0].get("task") or "")
    if card is None or len(card.metrics) < 2 or any(r["metric"] != card.metric for r in rows):
        return {}
    preds, golds = [r["parsed"] for r in rows], [r["output_field"] for r in rows]
    return {"metrics": {m: task_metric(m, preds, golds) for m in card.metrics}}


def _natural(name: str):
    import re
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", name)]
