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

*Draws*: a verdict must not depend on the random seed. Each CI bound and p-value is a Monte Carlo
estimate; its Monte Carlo interval (the order statistics that bracket the infinite-draw quantile,
or the exact binomial interval of p, at ``MC_LEVEL``) says which side of the decision line (0 for
a bound, ``ALPHA`` for p) it is on. Draws are doubled, from ``n_boot`` / ``n_perm``, until every
bound and p is settled, up to a cap; what is still not settled there is ``borderline`` and gets
no verdict. The draws used and each value's Monte Carlo error are in the result.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shoptune.eval.scoring import _natural, rollup

MC_LEVEL = 0.999  # confidence of the Monte Carlo interval of each CI bound and p-value
ALPHA = 0.05  # the p-value's decision line
MAX_DRAWS = 512_000  # default cap on bootstrap resamples and on permutations
ZERO_WIDTH = 1e-9  # an interval narrower than this has zero width (float noise aside)

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
    if x.size and np.ptp(x) <= ZERO_WIDTH and abs(x.flat[0]) > ZERO_WIDTH and _rests_on_single(key, names, cap, single):
        return None
    return _ci(x)


def _no_ci(ci, key, names, cap, single) -> dict:
    """``single_only`` beside a missing interval: whether every task it rests on has one question."""
    return {} if ci else {"single_only": not _computable(key, names, cap, single)}


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


def _mc_bounds(x: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Monte Carlo intervals of the 2.5% and 97.5% quantiles of ``x`` (the draws so far): the
    order statistics that bracket the infinite-draw quantile with probability ``MC_LEVEL``
    (distribution-free: the number of draws below a quantile is binomial)."""
    from scipy.stats import binom

    n, a = x.size, (1 - MC_LEVEL) / 2
    idx = []
    for q in (0.025, 0.975):
        idx += [max(int(binom.ppf(a, n, q)) - 1, 0), min(int(binom.ppf(1 - a, n, q)), n - 1)]
    part = np.partition(x, idx)
    return (float(part[idx[0]]), float(part[idx[1]])), (float(part[idx[2]]), float(part[idx[3]]))


def _open_bounds(x: np.ndarray) -> list[str]:
    """The interval's bounds whose side of 0 the draws so far do not settle: 0 is inside the
    bound's Monte Carlo interval (``lower`` decides "CI above 0", ``upper`` "CI below 0")."""
    (l0, l1), (u0, u1) = _mc_bounds(x)
    return ([] if l0 > 0 or l1 <= 0 else ["lower"]) + ([] if u1 < 0 or u0 >= 0 else ["upper"])


def _p_interval(hits: int, n: int) -> tuple[float, float]:
    """Monte Carlo interval (exact, Clopper-Pearson) of the infinite-permutation p-value."""
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=MC_LEVEL)
    return float(ci.low), float(ci.high)


def _p_open(hits: int, n: int) -> bool:
    lo, hi = _p_interval(hits, n)
    return not (hi < ALPHA or lo > ALPHA)


def _mc_error(x: np.ndarray) -> list[float]:
    """Half-widths of the Monte Carlo intervals of the two bounds."""
    (l0, l1), (u0, u1) = _mc_bounds(x)
    return [round((l1 - l0) / 2, 6), round((u1 - u0) / 2, 6)]


def _bootstrap(rng, names, order, f1, groups, cap, keys, combine, n: int) -> dict[str, np.ndarray]:
    """``n`` resamples of every statistic: per task one draw of question indices, shared by every
    group (run side) and seed, each group aggregated as :func:`summarize` does, then
    ``combine(aggregates, key)`` -> (n,) values of the statistic (e.g. B - A, mean over seeds)."""
    out: dict[str, list] = {k: [] for k in keys}
    for m in _chunks(n):
        boot: list[dict] = [{} for _ in groups]
        for t in names:
            idx = rng.integers(0, len(order[t]), (m, len(order[t])))
            for g, v in zip(boot, groups):
                g[t] = _task_score(v[t][:, idx], f1[t])  # (seeds, m)
        agg = [_aggregate(g, cap) for g in boot]
        for k in keys:
            out[k].append(combine(agg, k))
    return {k: np.concatenate(v) for k, v in out.items()}


def _permutation_hits(rng, names, order, f1, va, vb, cap, d: dict[str, float], n: int) -> dict[str, int]:
    """Over ``n`` sign flips (A and B swapped on each question with probability 1/2, jointly for
    every seed), how often each statistic's |B - A| is at least its observed |d|."""
    hits = dict.fromkeys(d, 0)
    for m in _chunks(n):
        pa, pb = {}, {}
        for t in names:
            swap = rng.random((m, len(order[t]))) < 0.5
            mask = swap[None, :, :, None] if f1[t] else swap[None]
            xa, xb = va[t][:, None], vb[t][:, None]
            pa[t] = _task_score(np.where(mask, xb, xa), f1[t])
            pb[t] = _task_score(np.where(mask, xa, xb), f1[t])
        qa, qb = _aggregate(pa, cap), _aggregate(pb, cap)
        for k in d:
            hits[k] += int(np.sum(np.abs((qb[k] - qa[k]).mean(0)) >= abs(d[k]) - 1e-12))
    return hits


def _chunks(n: int, size: int = 8192):
    while n > 0:
        yield min(size, n)
        n -= size


def _grow(draw, merge, have, n: int, cap: int, still_open) -> tuple[object, int]:
    """Add draws (doubling the total) while ``still_open(have, n)`` and fewer than ``cap``."""
    while n < cap and still_open(have, n):
        more = min(n, cap - n)
        have, n = merge(have, draw(more)), n + more
    return have, n


def _concat(a: dict, b: dict) -> dict:
    return {k: np.concatenate([a[k], b[k]]) for k in a}


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _draws(res: dict, n_boot: int, max_boot: int, n_perm: int | None = None,
           max_perm: int | None = None) -> dict:
    """What the result says about its Monte Carlo: draws used, where it started, the cap."""
    out = {"bootstrap": res["resamples"], "bootstrap_start": n_boot, "bootstrap_cap": max_boot,
           "mc_level": MC_LEVEL}
    if n_perm is not None:
        out.update({"permutations": res["permutations"], "permutations_start": n_perm,
                    "permutations_cap": max_perm, "p_decision_line": ALPHA})
    return out


def bootstrap_scores(runs: Sequence[Sequence[dict]], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Seed-averaged scores of one configuration with 95% bootstrap CIs (same resampling as
    :func:`paired_compare`), plus each seed's point value (the seed spread). A score has no
    decision line, so the draws are not adapted; each bound's Monte Carlo error is reported."""
    runs = [list(r) for r in runs]
    _check_aligned(runs)
    names, cap, order, f1 = _tasks(runs)
    vals = {t: _values(runs, order[t], f1[t]) for t in names}
    point = _aggregate({t: _task_score(vals[t], f1[t]) for t in names}, cap)
    keys = _stat_keys(names, cap)
    samples = _bootstrap(np.random.default_rng(seed), names, order, f1, [vals], cap, keys,
                         lambda agg, k: agg[0][k].mean(0), n_boot)
    single = _single(names, order)
    flat = {}
    for k in keys:
        per_seed = np.atleast_1d(point[k]).astype(float)
        ci = _interval(samples[k], k, names, cap, single)
        flat[k] = {"score": float(per_seed.mean()), "ci95": ci,
                   "seeds": [round(float(x), 6) for x in per_seed]}
        if ci:
            flat[k]["mc_error"] = {"ci95": _mc_error(samples[k])}
    res = _nest(flat)
    res.update({"n_questions": len(runs[0]), "n_seeds": len(runs), "resamples": n_boot,
                "seed": seed, "method": METHOD["ci"], "single_question_tasks": single})
    res["draws"] = _draws(res, n_boot, n_boot)
    return res


def _settled_keys(keys: list[str], settle_tasks: bool) -> list[str]:
    return [k for k in keys if settle_tasks or not k.startswith("task:")]


def paired_compare(a: Sequence[Sequence[dict]], b: Sequence[Sequence[dict]], *,
                   n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                   max_boot: int = MAX_DRAWS, max_perm: int = MAX_DRAWS,
                   settle_tasks: bool = True) -> dict:
    """B - A for every task, capability (track), the all-around score and the mean over tasks.

    ``a``, ``b``: lists of runs (per-question rows as in ``predictions.jsonl``: ``id``,
    ``task_name``, ``capability``, ``metric``, ``score``, ``counts`` for micro F1), one run per
    seed, the same questions in the same order everywhere. Returns, per statistic, ``a``, ``b``,
    ``diff``, ``ci95`` (paired bootstrap), ``p`` (paired permutation), ``seed_diffs``,
    ``mc_error`` (half-widths of the Monte Carlo intervals of the bounds and of p) and
    ``borderline`` (what is still within Monte Carlo error of its decision line at the cap).

    Draws: ``n_boot`` resamples and ``n_perm`` permutations, then doubled while some statistic's
    CI bound has 0 inside its Monte Carlo interval or its p has 0.05 inside its own, up to
    ``max_boot`` / ``max_perm`` (``settle_tasks=False``: only the tracks, all-around and mean over
    tasks are settled; the tasks' values still use every draw).
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
    keys = _stat_keys(names, cap)
    single = _single(names, order)
    seed_diffs = {k: np.atleast_1d(pb[k] - pa[k]).astype(float) for k in keys}
    d = {k: float(seed_diffs[k].mean()) for k in keys}
    settled = _settled_keys(keys, settle_tasks)
    has_ci = [k for k in settled if _computable(k, names, cap, single)]

    rng = np.random.default_rng(seed)
    boot = lambda n: _bootstrap(rng, names, order, f1, [va, vb], cap, keys,  # noqa: E731
                                lambda agg, k: (agg[1][k] - agg[0][k]).mean(0), n)
    perm = lambda n: _permutation_hits(rng, names, order, f1, va, vb, cap, d, n)  # noqa: E731
    samples, hits = boot(n_boot), perm(n_perm)
    samples, nb = _grow(boot, _concat, samples, n_boot, max_boot,
                        lambda s, n: any(_open_bounds(s[k]) for k in has_ci))
    hits, nperm = _grow(perm, _add, hits, n_perm, max_perm,
                        lambda h, n: any(_p_open(h[k], n) for k in settled))

    flat = {}
    for k in keys:
        ci = _interval(samples[k], k, names, cap, single)
        p = min(1.0, (1 + hits[k]) / (1 + nperm))
        lo, hi = _p_interval(hits[k], nperm)
        flat[k] = {"a": float(np.mean(pa[k])), "b": float(np.mean(pb[k])), "diff": d[k],
                   "ci95": ci, **_no_ci(ci, k, names, cap, single), "p": p, "seed_diffs": [round(float(x), 6) for x in seed_diffs[k]],
                   "mc_error": {"ci95": _mc_error(samples[k]) if ci else None,
                                "p": round((hi - lo) / 2, 6)}}
        if k in settled:
            flat[k]["borderline"] = ((_open_bounds(samples[k]) if ci else [])
                                     + (["p"] if _p_open(hits[k], nperm) else []))
    res = _nest(flat)
    res.update({"n_questions": len(a[0]), "n_seeds": len(a), "resamples": nb,
                "permutations": nperm, "seed": seed, "method": METHOD,
                "single_question_tasks": single})
    res["draws"] = _draws(res, n_boot, max_boot, n_perm, max_perm)
    return res


def interaction(a_lo: Sequence[Sequence[dict]], a_hi: Sequence[Sequence[dict]],
                b_lo: Sequence[Sequence[dict]], b_hi: Sequence[Sequence[dict]], *,
                n_boot: int = 2000, seed: int = 0, max_boot: int = MAX_DRAWS,
                settle_tasks: bool = True) -> dict:
    """Difference of two paired gains on the same questions: (B_hi - B_lo) - (A_hi - A_lo), e.g.
    "does r8 -> r32 gain more on the diverse mixture (B) than on the narrow one (A)?".

    Four groups of runs (one per seed each, paired by position). Every bootstrap resample draws
    one set of question indices per task, shared by all four groups and all seeds, so the
    statistic's CI carries the question noise of all four runs jointly. Returns, per statistic,
    ``gain_a``, ``gain_b``, ``diff``, ``ci95``, ``seed_diffs``, ``mc_error``, ``borderline`` (no
    p-value: the permutation test of :func:`paired_compare` has no single exchangeable pair
    here). Draws adapt as in :func:`paired_compare`. With ``a_lo`` = ``a_hi`` it is
    :func:`paired_compare` (``b_lo``, ``b_hi``): same point value and, for the same seed and
    draws, CI.
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
    keys = _stat_keys(names, cap)
    single = _single(names, order)
    settled = _settled_keys(keys, settle_tasks)
    has_ci = [k for k in settled if _computable(k, names, cap, single)]
    rng = np.random.default_rng(seed)
    boot = lambda n: _bootstrap(rng, names, order, f1, vals, cap, keys,  # noqa: E731
                                lambda g, k: ((g[3][k] - g[2][k]) - (g[1][k] - g[0][k])).mean(0), n)
    samples, nb = _grow(boot, _concat, boot(n_boot), n_boot, max_boot,
                        lambda s, n: any(_open_bounds(s[k]) for k in has_ci))
    flat = {}
    for key in keys:
        gain_a = np.atleast_1d(point[1][key] - point[0][key]).astype(float)
        gain_b = np.atleast_1d(point[3][key] - point[2][key]).astype(float)
        ci = _interval(samples[key], key, names, cap, single)
        flat[key] = {"gain_a": float(gain_a.mean()), "gain_b": float(gain_b.mean()),
                     "diff": float((gain_b - gain_a).mean()), "ci95": ci,
                     **_no_ci(ci, key, names, cap, single),
                     "seed_diffs": [round(float(x), 6) for x in gain_b - gain_a],
                     "mc_error": {"ci95": _mc_error(samples[key]) if ci else None}}
        if key in settled:
            flat[key]["borderline"] = _open_bounds(samples[key]) if ci else []
    res = _nest(flat)
    res.update({"n_questions": len(groups[0][0]), "n_seeds": k, "resamples": nb, "seed": seed,
                "method": {"ci": METHOD["ci"] + ", shared by all four groups"},
                "single_question_tasks": single})
    res["draws"] = _draws(res, n_boot, max_boot)
    return res


NO_CI = "no CI (1 question per task)"


def no_ci_reason(v: dict) -> str:
    """Why a statistic has no interval: every task it rests on has one question, or only its
    single-question tasks changed (the others agree, so every resample gives the same value)."""
    return NO_CI if v.get("single_only", True) else "no CI (only single-question tasks changed)"


def zero_width(ci: list[float] | None) -> bool:
    """An interval whose resamples never moved (float noise aside): it measures no uncertainty."""
    return bool(ci) and ci[1] - ci[0] <= ZERO_WIDTH


def fmt_p(p: float) -> str:
    """A p-value with three decimals (``<0.001`` below that)."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def verdict(v: dict) -> str:
    """What one paired difference says: a change, within noise, borderline (a CI bound still
    within Monte Carlo error of 0 at the draw cap), or (no interval, or one of zero width, which
    only says that resampling never moved it) nothing."""
    ci = v.get("ci95")
    if ci is None:
        return "cannot tell (no CI)"
    if zero_width(ci):
        return "no difference" if abs(v.get("diff", ci[0])) <= ZERO_WIDTH else "cannot tell (zero-width CI)"
    if {"lower", "upper"} & set(v.get("borderline") or ()):
        return "borderline (CI bound within Monte Carlo error of 0)"
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
        shown = f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else no_ci_reason(v)
        p = fmt_p(v["p"]) + (f" (MC ±{v['mc_error']['p']:.3f})" if "p" in (v.get("borderline") or ()) else "")
        return (f"| {label} | {v['a']:.3f} | {v['b']:.3f} | {v['diff']:+.3f} | "
                f"{shown} | {p} | {verdict(v)} |")
    lines = [f"Paired comparison, {b_name} - {a_name}, {res['n_questions']} questions"
             + (f", {res['n_seeds']} seeds (mean of per-seed differences)" if res["n_seeds"] > 1 else "")
             + f". CI: {res['method']['ci']} ({res['resamples']:,} resamples); "
             f"p: {res['method']['p_value']} ({res['permutations']:,} permutations). "
             + draws_note(res), "",
             f"| | {a_name} | {b_name} | diff | 95% CI | p | |", "|---|---|---|---|---|---|---|"]
    for c, v in res["capabilities"].items():
        lines.append(row(c, v))
    from shoptune.eval.report import overall_label
    lines.append(row(f"**{overall_label(res['capabilities'])}**", res["overall"]))
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


def draws_note(res: dict) -> str:
    """One sentence on the draws: adapted until every bound / p was settled, or up to the cap."""
    dr = res.get("draws") or {}
    if not dr:
        return ""
    used = f"{dr['bootstrap']:,} resamples" + (f" and {dr['permutations']:,} permutations"
                                              if "permutations" in dr else "")
    return (f"Draws: {used}, doubled from {dr['bootstrap_start']:,} until every CI bound "
            + ("and p-value " if "permutations" in dr else "")
            + f"was clear of its decision line (0; p: {ALPHA}) by its Monte Carlo error "
            f"({MC_LEVEL:.1%} interval), at most {dr['bootstrap_cap']:,}; what is not is borderline.")
