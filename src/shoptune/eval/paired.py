"""Paired comparison of evaluation runs on the same questions: B - A with a paired bootstrap CI
and a paired permutation p-value, for every task, track (capability), the all-around score and
the mean over tasks.

    shoptune eval compare runs/base runs/tuned

*Paired*: both runs answered the same questions (same suite manifest), so each bootstrap resample
draws one set of question indices per task and scores A and B on it together; the noise shared by
both runs (hard questions) cancels out of the difference. Resampling is within each task and the
resampled task scores go through :func:`shoptune.eval.scoring.rollup` (task -> track -> all-around),
exactly as :func:`~shoptune.eval.scoring.summarize` aggregates.

*Seeds*: ``a`` and ``b`` may each hold several runs (one per training seed, paired by position).
The statistic is then the mean over seeds of (B_s - A_s); resamples use the same question
indices for every run, and the per-seed point differences are reported as the seed spread.

*p-value*: two-sided paired permutation test (sign flip): under H0 "A and B are exchangeable on
each question", each question's pair of scores is swapped with probability 1/2 (jointly across
seeds) and the difference recomputed; p = (1 + #{|d*| >= |d|}) / (1 + n_perm).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shoptune.eval.scoring import _natural, rollup

METHOD = {"ci": "paired bootstrap, 95% percentile interval, questions resampled within each task",
          "p_value": "two-sided paired permutation test (per-question swap of A and B)"}


def _tasks(runs: Sequence[Sequence[dict]]) -> tuple[list[str], dict[str, str], dict[str, list[int]], dict[str, bool]]:
    first = runs[0]
    order: dict[str, list[int]] = {}
    for i, r in enumerate(first):
        order.setdefault(r["task_name"], []).append(i)
    names = sorted(order, key=_natural)
    cap = {t: first[order[t][0]]["capability"] for t in names}
    f1 = {t: "counts" in first[order[t][0]] for t in names}  # (micro-F1-style counts)
    return names, cap, order, f1


def _check_aligned(runs: Sequence[Sequence[dict]]) -> None:
    ref = runs[0]
    for k, run in enumerate(runs[1:], 1):
        if len(run) != len(ref):
            raise ValueError(f"run {k} has {len(run)} questions, run 0 has {len(ref)}: not the same "
                             "questions, cannot pair them")
        for i, (x, y) in enumerate(zip(ref, run)):
            if x.get("id") != y.get("id") or x["task_name"] != y["task_name"]:
                raise ValueError(f"question {i}: id {y.get('id')} ({y['task_name']}) in run {k} but "
                                 f"{x.get('id')} ({x['task_name']}) in run 0: not the same questions")


def _values(runs, idx_rows: list[int], f1: bool) -> np.ndarray:
    """(seeds, n) per-question scores, or (seeds, n, 3) micro-F1 counts."""
    if f1:
        return np.array([[run[i]["counts"] for i in idx_rows] for run in runs], dtype=np.float64)
    return np.array([[run[i]["score"] for i in idx_rows] for run in runs], dtype=np.float64)


def _task_score(v: np.ndarray, f1: bool) -> np.ndarray:
    """Task value from resampled questions on the last axis (counts: the axis before the 3)."""
    if not f1:
        return v.mean(-1)
    c = v.sum(-2)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        r = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1e-300), 0.0)
        return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)


def _aggregate(task_scores: dict[str, np.ndarray], cap: dict[str, str]) -> dict:
    """Per-run task scores (seeds, X) -> seed-mean task/track/all-around/mean-over-tasks, each (X,)
    plus the per-seed values (seeds, X)."""
    tracks, overall, overall_tasks = rollup(task_scores, cap)
    per_seed = {"overall": overall, "overall_tasks": overall_tasks,
                **{f"capability:{c}": v for c, v in tracks.items()},
                **{f"task:{t}": v for t, v in task_scores.items()}}
    return per_seed


def _stat_keys(names, cap) -> list[str]:
    caps = list(dict.fromkeys(cap[t] for t in names))
    from shoptune.records import CAPABILITIES
    caps = [c for c in CAPABILITIES if c in caps]
    return ["overall", "overall_tasks", *(f"capability:{c}" for c in caps), *(f"task:{t}" for t in names)]


def _ci(x: np.ndarray) -> list[float] | None:
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if x.size else None


def _interval(x: np.ndarray, key: str, names, cap, single) -> list[float] | None:
    """The 95% interval of a statistic's resampled differences, or None when it cannot be
    computed: every task it rests on has one question, or some do and the resamples do not vary
    at all (the few tasks with 2+ questions agree), so a zero-width interval would only restate
    that single-question tasks never move under resampling."""
    if not _computable(key, names, cap, single):
        return None
    if x.size and np.ptp(x) == 0 and x.flat[0] != 0 and _rests_on_single(key, names, cap, single):
        return None
    return _ci(x)


def _single(names, order) -> list[str]:
    """Tasks with one question: resampling within them never moves, so they add no uncertainty."""
    return [t for t in names if len(order[t]) < 2]


def _over(key: str, names, cap) -> list[str]:
    """The tasks a statistic rests on."""
    if key.startswith("task:"):
        return [key[5:]]
    if key.startswith("capability:"):
        return [t for t in names if cap[t] == key.split(":", 1)[1]]
    return list(names)


def _computable(key: str, names, cap, single) -> bool:
    """Whether a statistic's interval can be computed: some task it rests on has 2+ questions."""
    return any(t not in single for t in _over(key, names, cap))


def _rests_on_single(key: str, names, cap, single) -> bool:
    return any(t in single for t in _over(key, names, cap))


def _nest(flat: dict[str, dict]) -> dict:
    out = {"overall": flat["overall"], "overall_tasks": flat["overall_tasks"],
           "capabilities": {}, "tasks": {}}
    for k, v in flat.items():
        if k.startswith("capability:"):
            out["capabilities"][k.split(":", 1)[1]] = v
        elif k.startswith("task:"):
            out["tasks"][k.split(":", 1)[1]] = v
    return out


def bootstrap_scores(runs: Sequence[Sequence[dict]], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Seed-averaged scores of one configuration with 95% bootstrap CIs (same resampling as
    :func:`paired_compare`), plus each seed's point value (the seed spread)."""
    runs = [list(r) for r in runs]
    _check_aligned(runs)
    names, cap, order, f1 = _tasks(runs)
    vals = {t: _values(runs, order[t], f1[t]) for t in names}
    point = _aggregate({t: _task_score(vals[t], f1[t]) for t in names}, cap)
    rng = np.random.default_rng(seed)
    boot = {}
    for t in names:
        idx = rng.integers(0, len(order[t]), (n_boot, len(order[t])))
        boot[t] = _task_score(vals[t][:, idx], f1[t])  # (seeds, n_boot)
    samples = _aggregate(boot, cap)
    single = _single(names, order)
    flat = {}
    for k in _stat_keys(names, cap):
        per_seed = np.atleast_1d(point[k]).astype(float)
        flat[k] = {"score": float(per_seed.mean()),
                   "ci95": _interval(samples[k].mean(0), k, names, cap, single),
                   "seeds": [round(float(x), 6) for x in per_seed]}
    res = _nest(flat)
    res.update({"n_questions": len(runs[0]), "n_seeds": len(runs), "resamples": n_boot,
                "seed": seed, "method": METHOD["ci"], "single_question_tasks": single})
    return res


def paired_compare(a: Sequence[Sequence[dict]], b: Sequence[Sequence[dict]], *,
                   n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> dict:
    """B - A for every task, capability (track), the all-around score and the mean over tasks.

    ``a``, ``b``: lists of runs (per-question rows as in ``predictions.jsonl``: ``id``,
    ``task_name``, ``capability``, ``metric``, ``score``, ``counts`` for micro F1), one run per
    seed, the same questions in the same order everywhere. Returns, per statistic, ``a``, ``b``,
    ``diff``, ``ci95`` (paired bootstrap), ``p`` (paired permutation), ``seed_diffs``.
    """
    a, b = [list(r) for r in a], [list(r) for r in b]
    if not a or len(a) != len(b):
        raise ValueError(f"paired comparison needs the same number of runs (seeds) on each side; "
                         f"got {len(a)} and {len(b)}")
    _check_aligned(a + b)
    names, cap, order, f1 = _tasks(a)
    va = {t: _values(a, order[t], f1[t]) for t in names}
    vb = {t: _values(b, order[t], f1[t]) for t in names}
    pa = _aggregate({t: _task_score(va[t], f1[t]) for t in names}, cap)
    pb = _aggregate({t: _task_score(vb[t], f1[t]) for t in names}, cap)

    rng = np.random.default_rng(seed)
    ba, bb = {}, {}
    for t in names:  # bootstrap: one index draw per task, shared by A, B and every seed
        idx = rng.integers(0, len(order[t]), (n_boot, len(order[t])))
        ba[t], bb[t] = _task_score(va[t][:, idx], f1[t]), _task_score(vb[t][:, idx], f1[t])
    sa, sb = _aggregate(ba, cap), _aggregate(bb, cap)

    pa_, pb_ = {}, {}
    for t in names:  # permutation: swap A and B on a random half of the questions
        swap = rng.random((n_perm, len(order[t]))) < 0.5
        m = swap[None, :, :, None] if f1[t] else swap[None]
        xa, xb = va[t][:, None], vb[t][:, None]
        pa_[t] = _task_score(np.where(m, xb, xa), f1[t])
        pb_[t] = _task_score(np.where(m, xa, xb), f1[t])
    qa, qb = _aggregate(pa_, cap), _aggregate(pb_, cap)

    single = _single(names, order)
    flat = {}
    for k in _stat_keys(names, cap):
        seed_diffs = np.atleast_1d(pb[k] - pa[k]).astype(float)
        d = float(seed_diffs.mean())
        boot = (sb[k] - sa[k]).mean(0)
        perm = (qb[k] - qa[k]).mean(0)
        p = (1 + int(np.sum(np.abs(perm) >= abs(d) - 1e-12))) / (1 + n_perm)
        flat[k] = {"a": float(np.mean(pa[k])), "b": float(np.mean(pb[k])), "diff": d,
                   "ci95": _interval(boot, k, names, cap, single), "p": min(1.0, p),
                   "seed_diffs": [round(float(x), 6) for x in seed_diffs]}
    res = _nest(flat)
    res.update({"n_questions": len(a[0]), "n_seeds": len(a), "resamples": n_boot,
                "permutations": n_perm, "seed": seed, "method": METHOD,
                "single_question_tasks": single})
    return res


def interaction(a_lo: Sequence[Sequence[dict]], a_hi: Sequence[Sequence[dict]],
                b_lo: Sequence[Sequence[dict]], b_hi: Sequence[Sequence[dict]], *,
                n_boot: int = 2000, seed: int = 0) -> dict:
    """Difference of two paired gains on the same questions: (B_hi - B_lo) - (A_hi - A_lo), e.g.
    "does r8 -> r32 gain more on the diverse mixture (B) than on the narrow one (A)?".

    Four groups of runs (one per seed each, paired by position). Every bootstrap resample draws
    one set of question indices per task, shared by all four groups and all seeds, so the
    statistic's CI carries the question noise of all four runs jointly. Returns, per statistic,
    ``gain_a``, ``gain_b``, ``diff``, ``ci95``, ``seed_diffs`` (no p-value: the permutation test
    of :func:`paired_compare` has no single exchangeable pair here). With ``a_lo`` = ``a_hi`` it
    is :func:`paired_compare` (``b_lo``, ``b_hi``): same point value and, for the same seed, CI.
    """
    groups = [[list(r) for r in g] for g in (a_lo, a_hi, b_lo, b_hi)]
    k = len(groups[0])
    if not k or any(len(g) != k for g in groups):
        raise ValueError(f"an interaction needs the same number of runs (seeds) in all four groups; "
                         f"got {', '.join(str(len(g)) for g in groups)}")
    _check_aligned([r for g in groups for r in g])
    names, cap, order, f1 = _tasks(groups[0])
    vals = [{t: _values(g, order[t], f1[t]) for t in names} for g in groups]
    point = [_aggregate({t: _task_score(v[t], f1[t]) for t in names}, cap) for v in vals]
    rng = np.random.default_rng(seed)
    boots: list[dict] = [{} for _ in groups]
    for t in names:  # one index draw per task, shared by every group and seed
        idx = rng.integers(0, len(order[t]), (n_boot, len(order[t])))
        for v, b in zip(vals, boots):
            b[t] = _task_score(v[t][:, idx], f1[t])
    samples = [_aggregate(b, cap) for b in boots]
    single = _single(names, order)
    flat = {}
    for key in _stat_keys(names, cap):
        gain_a = np.atleast_1d(point[1][key] - point[0][key]).astype(float)
        gain_b = np.atleast_1d(point[3][key] - point[2][key]).astype(float)
        boot = ((samples[3][key] - samples[2][key]) - (samples[1][key] - samples[0][key])).mean(0)
        flat[key] = {"gain_a": float(gain_a.mean()), "gain_b": float(gain_b.mean()),
                     "diff": float((gain_b - gain_a).mean()),
                     "ci95": _interval(boot, key, names, cap, single),
                     "seed_diffs": [round(float(x), 6) for x in gain_b - gain_a]}
    res = _nest(flat)
    res.update({"n_questions": len(groups[0][0]), "n_seeds": k, "resamples": n_boot, "seed": seed,
                "method": {"ci": METHOD["ci"] + ", shared by all four groups"},
                "single_question_tasks": single})
    return res


NO_CI = "no CI (1 question per task)"


def verdict(v: dict) -> str:
    """What one paired difference says: a change, within noise, or (no interval) nothing."""
    ci = v.get("ci95")
    if ci is None:
        return "cannot tell (no CI)"
    if ci[0] > 0:
        return "higher"
    if ci[1] < 0:
        return "lower"
    return "within noise"


def format_paired(res: dict, a_name: str = "A", b_name: str = "B") -> str:
    """Markdown table of :func:`paired_compare`'s result (a row's interval says ``no CI`` when
    every task it rests on has one question; a note says when some do)."""
    def row(label, v):
        ci = v["ci95"]
        shown = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else NO_CI
        return (f"| {label} | {v['a']:.3f} | {v['b']:.3f} | {v['diff']:+.3f} | "
                f"{shown} | {v['p']:.3g} | {verdict(v)} |")
    lines = [f"Paired comparison, {b_name} - {a_name}, {res['n_questions']} questions"
             + (f", {res['n_seeds']} seeds (mean of per-seed differences)" if res["n_seeds"] > 1 else "")
             + f". CI: {res['method']['ci']} ({res['resamples']} resamples); "
             f"p: {res['method']['p_value']} ({res['permutations']} permutations).", "",
             f"| | {a_name} | {b_name} | diff | 95% CI | p | |", "|---|---|---|---|---|---|---|"]
    for c, v in res["capabilities"].items():
        lines.append(row(c, v))
    lines.append(row("**all-around**", res["overall"]))
    lines.append(row("mean over tasks", res["overall_tasks"]))
    for t, v in res["tasks"].items():
        lines.append(row(t, v))
    single = res.get("single_question_tasks") or []
    if single:
        lines += ["", f"{len(single)} of {len(res['tasks'])} tasks have one question: resampling "
                      "within them never moves, so they add no uncertainty and every interval they "
                      "count in is too narrow" + ("" if len(single) < len(res["tasks"]) else
                                                  " (here: no interval can be computed)") + "."]
    return "\n".join(lines) + "\n"
