"""``shoptune experiment report DIR``: one row per cell, paired differences to the baseline.

Reads only the small files (``experiment.json``, ``suite.json``, ``cells/*/result.json``), so it
works from a committed results folder on any machine. Writes ``report.md``, ``results.json``,
``scores.png`` (all-around and tracks per cell, 95% CI) and ``diff.png`` (paired difference to
the baseline with its CI).

Scores of a cell are the mean over its seeds; CIs resample questions (within tasks) jointly for
all seeds. The difference to the baseline is the mean over seeds of the per-seed paired
difference (same seed on both sides), with a paired bootstrap CI and a paired permutation
p-value (:mod:`shoptune.eval.paired`); the per-seed differences are listed as the seed spread.
"""
from __future__ import annotations

from pathlib import Path

from shoptune import machine
from shoptune._io import atomic_open, read_json, write_json
from shoptune.eval.paired import (MAX_DRAWS, MC_LEVEL, bootstrap_scores, fmt_p, interaction,
                                  paired_compare, zero_width)
from shoptune.records import CAPABILITIES

COLUMNS = [*CAPABILITIES, "overall", "overall_tasks"]
LABEL = {"concept_understanding": "concept", "knowledge_reasoning": "knowledge",
         "user_behavior_alignment": "behavior", "multilingual": "multilingual",
         "overall": "all-around", "overall_tasks": "mean over tasks"}


def load_runs(results: str | Path) -> tuple[dict, dict[str, dict[int, list[dict]]], list[str]]:
    """(experiment plan, {cell: {seed: per-question rows}}, run ids not finished)."""
    results = Path(results)
    for f in ("experiment.json", "suite.json"):
        if not (results / f).exists():
            raise FileNotFoundError(f"{results / f}: missing (is {results} an experiment results "
                                    "folder? `shoptune experiment run ... --results` writes it)")
    exp = read_json(results / "experiment.json", "experiment.json")  # (bounded: InputError names it)
    questions = read_json(results / "suite.json", "suite.json")["questions"]
    from shoptune.tasks import card_name
    for q in questions:  # (results written before #34 name tasks as ShopBench does: task2)
        q["task_name"] = card_name(q["task_name"])
    cells: dict[str, dict[int, list[dict]]] = {}
    missing = []
    for run in exp["runs"]:
        f = results / "cells" / run["id"] / "result.json"
        res = read_json(f, "result.json") if f.exists() else None
        if not res or res.get("key") != run["key"]:
            missing.append(run["id"])
            continue
        pq = res["per_question"]
        if len(pq["score"]) != len(questions):
            raise ValueError(f"{f}: {len(pq['score'])} question scores, suite has {len(questions)}")
        rows = []
        for i, (q, sc) in enumerate(zip(questions, pq["score"])):
            row = {**q, "score": sc}
            if str(i) in pq["counts"]:
                row["counts"] = pq["counts"][str(i)]
            rows.append(row)
        cells.setdefault(run["cell"], {})[run["seed"]] = rows
    return exp, cells, missing


def _pick(res: dict, col: str) -> dict:
    return res["capabilities"].get(col) if col in CAPABILITIES else res[col]


def build_report(results: str | Path, *, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                 max_boot: int = MAX_DRAWS, max_perm: int = MAX_DRAWS) -> dict:
    """The report's data. Paired differences and contrasts adapt their draws (from ``n_boot`` /
    ``n_perm`` up to ``max_boot`` / ``max_perm``) until the CI bounds and p-values of the tracks,
    the all-around score and the mean over tasks are clear of their decision lines by their Monte
    Carlo error (:mod:`shoptune.eval.paired`), so the verdicts do not depend on ``seed``."""
    exp, cells, missing = load_runs(results)
    base = exp["baseline"]
    out = {"experiment": exp["name"], "baseline": base, "suite": exp["suite"], "missing_runs": missing,
           # how these numbers were made (each run's machine is in "machines")
           "command": {"run": f"shoptune experiment run {exp.get('spec_file', '<spec>')} --out "
                              f"runs/exp/{exp['name']} --results {Path(results)}",
                       "report": f"shoptune experiment report {Path(results)}"},
           "cells": {}, "scores_resamples": n_boot}
    for cell in exp["cells"]:
        if cell not in cells:
            continue
        seeds = sorted(cells[cell])
        scores = bootstrap_scores([cells[cell][s] for s in seeds], n_boot=n_boot, seed=seed)
        entry = {"seeds": seeds, "scores": {c: _pick(scores, c) for c in COLUMNS if _pick(scores, c)},
                 "tasks": {t: v["score"] for t, v in scores["tasks"].items()}}
        ref = exp.get("baselines", {}).get(cell, base)
        if cell != ref and ref in cells:
            common = sorted(set(seeds) & set(cells[ref]))
            if common:
                d = paired_compare([cells[ref][s] for s in common], [cells[cell][s] for s in common],
                                   n_boot=n_boot, n_perm=n_perm, seed=seed, max_boot=max_boot,
                                   max_perm=max_perm, settle_tasks=False)
                entry["vs_baseline"] = {"baseline": ref, "seeds": common,
                                        **{c: _pick(d, c) for c in COLUMNS if _pick(d, c)},
                                        "tasks": d["tasks"], "method": d["method"], "draws": d["draws"]}
        out["cells"][cell] = entry
    out["contrasts"] = {}
    for c in exp.get("contrasts", []):
        four = [*c["a"], *c["b"]]
        if not all(x in cells for x in four):
            continue
        common = sorted(set.intersection(*(set(cells[x]) for x in four)))
        if common:
            d = interaction(*([cells[x][s] for s in common] for x in four), n_boot=n_boot, seed=seed,
                            max_boot=max_boot, settle_tasks=False)
            out["contrasts"][c["name"]] = {"a": list(c["a"]), "b": list(c["b"]), "seeds": common,
                                           **{col: _pick(d, col) for col in COLUMNS if _pick(d, col)},
                                           "method": d["method"], "draws": d["draws"]}
    finished = finished_results(Path(results), exp)
    out["machines"] = _machines(finished)
    out["precision"] = precisions(finished)
    out["cost"] = training_cost(finished)
    for cell, v in out["cost"].items():  # throughput relative to the cell's reference
        ref = out["cost"].get(exp.get("baselines", {}).get(cell, base)) or {}
        v["tokens_per_s_vs_ref"] = (round(v["tokens_per_s"] / ref["tokens_per_s"], 3)
                                    if v.get("tokens_per_s") and ref.get("tokens_per_s") else None)
    out["balancing"] = balancing_summary(finished)
    return out


def balancing_summary(finished: list[tuple[dict, dict]]) -> dict[str, dict]:
    """Per loss-balanced cell, from its runs' ``train.balance_trace``: each group's last logged
    weight (mean over runs, and each run's), its median gradient norm over the logging steps and
    runs (where the method logs one), and the weight trace averaged over the runs that logged it
    at the steps every run logged (for the plot). ``runs``: the runs with a trace. Weights are the
    method's at the logging step's batch (upgrad's cover the groups in that batch only).

    Because upgrad's weights cover a different set of groups at each step (and need not sum to 1),
    the last weight alone says little; so each group also gets its ``share``: its weight over the
    mean weight of the groups logged at that step (1 = an equal share), averaged over the logging
    steps and runs. ``off_equal`` is the fraction of logging steps (with 2+ groups) at which some
    group's share is more than 2% away from 1 (upgrad: steps where the gradients conflicted and
    it moved away from the plain mean)."""
    import statistics

    by_cell: dict[str, list[dict]] = {}
    for run, res in finished:
        tr = (res.get("train") or {}).get("balance_trace")
        if tr and tr.get("weight"):
            by_cell.setdefault(run["cell"], []).append(tr)
    out = {}
    for cell, traces in by_cell.items():
        groups = sorted({g for t in traces for g in t["weight"]})
        common = sorted(set.intersection(*(set(t["step"]) for t in traces)))
        entry: dict = {"runs": len(traces), "groups": {}, "trace": {"step": common, "weight": {}}}
        shares: dict[str, list[float]] = {g: [] for g in groups}
        multi = off = 0
        for t in traces:
            for i in range(len(t["step"])):
                at = {g: w[i] for g, w in t["weight"].items() if i < len(w) and w[i] is not None}
                mean = statistics.mean(at.values()) if at else 0
                if mean <= 0:
                    continue
                for g, w in at.items():
                    shares[g].append(w / mean)
                if len(at) > 1:
                    multi += 1
                    off += any(abs(w / mean - 1) > 0.02 for w in at.values())
        entry["off_equal"] = round(off / multi, 4) if multi else None
        for g in groups:
            # each run's last logged weight: a method that weighs only the groups in the batch
            # (upgrad) has no value at a step whose batch lacked the group
            finals = [last for t in traces
                      if (last := next((v for v in reversed(t["weight"].get(g, [])) if v is not None), None))
                      is not None]
            norms = [v for t in traces for v in (t.get("grad_norm") or {}).get(g, []) if v is not None]
            entry["groups"][g] = {"final_weight": round(statistics.mean(finals), 4) if finals else None,
                                  "final_weight_runs": [round(x, 4) for x in finals],
                                  "median_grad_norm": round(statistics.median(norms), 4) if norms else None,
                                  "share": round(statistics.mean(shares[g]), 4) if shares[g] else None}
            mean_w = []
            for st in common:
                vals = [t["weight"][g][t["step"].index(st)] for t in traces if g in t["weight"]]
                vals = [v for v in vals if v is not None]
                mean_w.append(round(statistics.mean(vals), 4) if vals else None)
            entry["trace"]["weight"][g] = mean_w
        out[cell] = entry
    return out


def finished_results(results: Path, exp: dict) -> list[tuple[dict, dict]]:
    """(planned run, its result.json) of every run finished under its planned key, read once."""
    out = []
    for run in exp["runs"]:
        f = results / "cells" / run["id"] / "result.json"
        if f.exists():
            res = read_json(f, "result.json")
            if res.get("key") == run["key"]:
                out.append((run, res))
    return out


def training_cost(finished: list[tuple[dict, dict]]) -> dict[str, dict]:
    """Per cell, from its finished runs: trainable parameters, tokens seen (mean over runs) and
    training tokens/s (median over runs of each run's median logging-interval rate; runs from
    before that was recorded are left out of it). A merged cell's numbers are its source's."""
    import statistics

    by_cell: dict[str, list[dict]] = {}
    for run, res in finished:
        if res.get("train"):
            by_cell.setdefault(run["cell"], []).append(res["train"])
    out = {}
    for cell, trains in by_cell.items():
        params = sorted({t["trainable_params"] for t in trains if t.get("trainable_params")})
        rates = [t["tokens_per_s"] for t in trains if t.get("tokens_per_s")]
        seen = [t["tokens_seen"] for t in trains if t.get("tokens_seen")]
        out[cell] = {"runs": len(trains), "trainable_params": params[-1] if params else None,
                     "tokens_seen": round(statistics.mean(seen)) if seen else None,
                     "tokens_per_s": round(statistics.median(rates), 1) if rates else None,
                     "tokens_per_s_runs": len(rates)}
    return out


def run_precision(result: dict) -> str | None:
    """The precision a finished run trained in: ``bf16`` (autocast) or ``fp32``, as the run
    recorded it (``train.precision``); for older results, ``bf16: auto`` resolved by the machine's
    bf16 flags. None when neither was recorded."""
    recorded = (result.get("train") or {}).get("precision")
    if recorded:
        return recorded
    setting = (result.get("config") or {}).get("bf16", "auto")
    if setting == "auto":
        m = result.get("machine")
        if not m:
            return None
        setting = bool(m.get("avx512_bf16") or m.get("amx_bf16"))
    return "bf16" if setting is True else "fp32"


def precisions(finished: list[tuple[dict, dict]]) -> dict[str, list[str]]:
    """{precision: [run ids]} of the finished runs. More than one key means the experiment's
    comparisons mix training precisions (``bf16: auto`` on machines with and without native bf16);
    a run's key does not capture that. A merge trains nothing: its source counts."""
    seen: dict[str, list[str]] = {}
    for run, res in finished:
        if not run.get("merge"):
            seen.setdefault(run_precision(res) or "not recorded", []).append(run["id"])
    return seen


def _machines(finished: list[tuple[dict, dict]]) -> dict[str, list[str]]:
    """{machine summary: [run ids]} of the finished runs. Older results did not record it; where
    the machine was written down at the time, ``machine_documented`` says so, and so does the key."""
    seen: dict[str, list[str]] = {}
    for run, res in finished:
        m, doc = res.get("machine"), res.get("machine_documented")
        key = (machine.summary(m) if m else f"{machine.summary(doc)} (documented at the time, not recorded by "
               "the run)" if doc else "not recorded")
        seen.setdefault(key, []).append(run["id"])
    return seen


def _fmt(v: dict | None) -> str:
    if not v:
        return "-"
    ci = v.get("ci95")
    s = f"{v['score']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    if len(v.get("seeds", [])) > 1:
        s += f" (seeds {min(v['seeds']):.3f}..{max(v['seeds']):.3f})"
    return s


def _fmt_diff(v: dict | None) -> str:
    if not v:
        return "-"
    ci = v["ci95"]  # (None: every task has one question)
    s = f"{v['diff']:+.3f} " + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[no CI]") + f" p{'' if fmt_p(v['p']).startswith('<') else '='}{fmt_p(v['p'])}"
    if len(v["seed_diffs"]) > 1:
        s += f" (seeds {', '.join(f'{x:+.3f}' for x in v['seed_diffs'])})"
    return s


def _fmt_contrast(v: dict | None) -> str:
    if not v:
        return "-"
    ci = v["ci95"]
    return (f"{v['diff']:+.3f} " + (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "[no CI]")
            + f" ({v['gain_a']:+.3f} vs {v['gain_b']:+.3f}; "
            f"seeds {', '.join(f'{x:+.3f}' for x in v['seed_diffs'])})")


def verdict(d: dict | None) -> str:
    """findings.md's rule, stated before any result was read, applied to one paired difference
    (or contrast) without knowing which direction a paper claimed: ``higher`` / ``lower`` only if
    the 95% CI excludes 0 **and** every seed's difference has that sign (a claim in that direction
    is *reproduced*); ``CI above/below 0, not every seed agrees`` if a seed went the other way or
    was 0 (a claim in the CI's direction stays *inconclusive*, one against it is *not reproduced*);
    ``not resolved`` if the CI includes 0, has zero width or there is none. ``borderline`` when a
    CI bound is still within Monte Carlo error of 0 at the draw cap: the random draws, not the
    data, would decide, so no verdict. The seed count is part of it."""
    if not d:
        return "-"
    ci, seeds = d.get("ci95"), d.get("seed_diffs") or []
    n = f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"
    if ci and {"lower", "upper"} & set(d.get("borderline") or ()):
        return f"borderline: a CI bound is within Monte Carlo error of 0 ({n})"
    if not ci or zero_width(ci) or not seeds or ci[0] <= 0 <= ci[1]:
        return f"not resolved ({n})"
    sign, word = (1, "above") if ci[0] > 0 else (-1, "below")
    if all(x * sign > 0 for x in seeds):
        return f"**{'higher' if sign > 0 else 'lower'}** ({n})"
    return f"CI {word} 0, not every seed agrees ({n})"


def _draws_rows(rep: dict) -> list[str]:
    """One row per paired difference / contrast: draws used, the all-around bounds' and p's
    Monte Carlo error, and any column still borderline at the cap."""
    rows = []
    items = [(f"{c}{'' if e['vs_baseline']['baseline'] == rep['baseline'] else ' - ' + e['vs_baseline']['baseline']}",
              e["vs_baseline"]) for c, e in rep["cells"].items() if "vs_baseline" in e]
    items += [(f"contrast {name}", e) for name, e in (rep.get("contrasts") or {}).items()]
    for label, e in items:
        dr, ov = e.get("draws") or {}, e.get("overall") or {}
        mc = ov.get("mc_error") or {}
        ci_err = mc.get("ci95")
        border = [f"{LABEL[c]} ({', '.join(e[c]['borderline'])})" for c in COLUMNS
                  if c in e and e[c].get("borderline")]
        rows.append(f"| {label} | {dr.get('bootstrap', 0):,} | "
                    + (f"{dr['permutations']:,}" if "permutations" in dr else "-") + " | "
                    + (f"±{ci_err[0]:.4f} / ±{ci_err[1]:.4f}" if ci_err else "-") + " | "
                    + (f"±{mc['p']:.4f}" if mc.get("p") is not None else "-") + " | "
                    + (", ".join(border) or "none") + " |")
    return rows


def report_markdown(rep: dict) -> str:
    s = rep["suite"]
    lines = [f"# Experiment {rep['experiment']}", "",
             f"Suite `{s['name']}` v{s['version']} ({s['n_questions']} questions, fingerprint "
             f"`{s['fingerprint']}`). Scores are means over seeds with 95% bootstrap CIs (questions "
             f"resampled within tasks, jointly for all seeds; {rep.get('scores_resamples', 2000):,} "
             "resamples: a score has no decision line, so its draws do not adapt); the range of the "
             "per-seed values is in parentheses.", "",
             "| cell | seeds | " + " | ".join(LABEL[c] for c in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for cell, e in rep["cells"].items():
        lines.append(f"| {cell}{' (baseline)' if cell == rep['baseline'] else ''} | {len(e['seeds'])} | "
                     + " | ".join(_fmt(e["scores"].get(c)) for c in COLUMNS) + " |")
    method = next((e["vs_baseline"]["method"] for e in rep["cells"].values() if "vs_baseline" in e), None)
    if method:
        lines += ["", f"## Paired difference to the baseline `{rep['baseline']}` (cell - baseline; "
                      "`cell - other` where a cell names its own reference)", "",
                  f"Mean over seeds of the per-seed difference (same seed on both sides). CI: "
                  f"{method['ci']}; p: {method['p_value']}. Per-seed differences in parentheses. "
                  "Verdict (all-around, findings.md's rule): higher/lower only if the CI excludes 0 "
                  "and every seed's difference has that sign.", "",
                  "| cell | " + " | ".join(LABEL[c] for c in COLUMNS) + " | verdict |",
                  "|---|" + "---|" * (len(COLUMNS) + 1)]
        for cell, e in rep["cells"].items():
            if "vs_baseline" in e:
                ref = e["vs_baseline"]["baseline"]
                lines.append(f"| {cell}{'' if ref == rep['baseline'] else f' - {ref}'} | "
                             + " | ".join(_fmt_diff(e["vs_baseline"].get(c)) for c in COLUMNS)
                             + f" | {verdict(e['vs_baseline'].get('overall'))} |")
    if rep.get("contrasts"):
        lines += ["", "## Contrasts: does one gain differ from another? (b_to - b_from) - (a_to - a_from)", "",
                  "Each gain is a paired difference on the same questions and seeds; CI: "
                  + next(iter(rep["contrasts"].values()))["method"]["ci"]
                  + ". In parentheses: the two gains, then the per-seed differences. Verdict: as "
                  "above, on the all-around contrast.", "",
                  "| contrast | a | b | " + " | ".join(LABEL[c] for c in COLUMNS) + " | verdict |",
                  "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
        for name, e in rep["contrasts"].items():
            lines.append(f"| {name} | {' -> '.join(e['a'])} | {' -> '.join(e['b'])} | "
                         + " | ".join(_fmt_contrast(e.get(c)) for c in COLUMNS)
                         + f" | {verdict(e.get('overall'))} |")
    draws = _draws_rows(rep)
    if draws:
        first = next(iter(e["vs_baseline"] for e in rep["cells"].values() if "vs_baseline" in e), None) \
            or next(iter(rep["contrasts"].values()))
        dr = first.get("draws") or {}
        lines += ["", "## Draws and Monte Carlo error", "",
                  f"Bootstrap resamples and permutations start at {dr.get('bootstrap_start', 0):,} and "
                  "are doubled until every CI bound and p-value of the tracks, the all-around score and "
                  "the mean over tasks is clear of its decision line (0 for a bound, 0.05 for p) by its "
                  f"Monte Carlo error ({MC_LEVEL:.1%} interval of the infinite-draw value), at most "
                  f"{dr.get('bootstrap_cap', 0):,}; a column still within it at the cap is borderline "
                  "and gets no verdict. So the verdicts do not depend on `--seed`. Monte Carlo error: "
                  "half-width of that interval, for the all-around CI's bounds and p.", "",
                  "| difference | resamples | permutations | all-around CI bounds, MC error | p, MC error | borderline |",
                  "|---|---|---|---|---|---|", *draws]
    cost = {c: v for c, v in (rep.get("cost") or {}).items() if v.get("trainable_params")}
    if cost:
        lines += ["", "## Training cost", "",
                  "Trainable parameters; tokens seen (mean over runs); training tokens/s (median over "
                  "runs of each run's median logging-interval rate, so pauses and resumes do not count). A "
                  "merged cell trains nothing: it shows its source's.", "",
                  "| cell | trainable params | tokens seen | tokens/s (runs) | x reference |", "|---|---|---|---|---|"]
        for cell, v in cost.items():
            rate = f"{v['tokens_per_s']:.0f} ({v['tokens_per_s_runs']})" if v["tokens_per_s"] else "-"
            seen = f"{v['tokens_seen']:,}" if v["tokens_seen"] else "-"
            ratio = f"{v['tokens_per_s_vs_ref']:.2f}" if v.get("tokens_per_s_vs_ref") else "-"
            lines.append(f"| {cell} | {v['trainable_params']:,} | {seen} | {rate} | {ratio} |")
    if rep.get("balancing"):
        lines += ["", "## Loss balancing", "",
                  "Each group's weight at the last logging step (mean over runs; each run's in "
                  "parentheses); its share (weight over the mean weight of the groups logged at "
                  "the same step, 1 = equal; mean over logging steps and runs: upgrad weighs only "
                  "the groups in the step's batch, so its last weight alone says little); its "
                  "median gradient norm over the logging steps (methods that log one); and the "
                  "fraction of logging steps with 2+ groups at which some share is more than 2% "
                  "from 1 (off equal). The plot shows the weights over training, averaged over runs.", "",
                  "| cell | group | final weight | share | median grad norm | off equal |",
                  "|---|---|---|---|---|---|"]
        for cell, e in rep["balancing"].items():
            for g, v in e["groups"].items():
                fw = (f"{v['final_weight']:.3f} ({', '.join(f'{x:.3f}' for x in v['final_weight_runs'])})"
                      if v["final_weight"] is not None else "-")
                sh = f"{v['share']:.3f}" if v.get("share") is not None else "-"
                gn = f"{v['median_grad_norm']:.3g}" if v["median_grad_norm"] is not None else "-"
                oe = f"{e['off_equal']:.0%}" if e.get("off_equal") is not None else "-"
                lines.append(f"| {cell} | {g} | {fw} | {sh} | {gn} | {oe} |")
    if rep.get("machines"):
        lines += ["", "Machines: " + "; ".join(f"{m} ({len(ids)} run{'s' if len(ids) != 1 else ''})" for m, ids in rep["machines"].items())]
    mixed = {p: ids for p, ids in (rep.get("precision") or {}).items() if p != "not recorded"}
    if len(mixed) > 1:
        lines += ["", "**Warning: runs trained in different precisions** ("
                  + "; ".join(f"{p}: {', '.join(ids)}" for p, ids in mixed.items())
                  + "). `bf16: auto` follows the machine, so comparisons here mix precision with "
                  "the cells' differences; pin `bf16` in the experiment's overrides and re-run."]
    if rep["missing_runs"]:
        lines += ["", f"Not finished yet ({len(rep['missing_runs'])}): " + ", ".join(rep["missing_runs"])]
    lines += ["", "![scores](scores.png)", "", "![difference to the baseline](diff.png)"]
    if rep.get("balancing"):
        lines += ["", "![loss-balancing weights](balance.png)"]
    return "\n".join(lines) + "\n"


def _plots(rep: dict, results: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = list(rep["cells"])
    if not cells:
        return
    x = np.arange(len(COLUMNS))
    width = 0.8 / len(cells)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(COLUMNS), 4.2))
    for k, cell in enumerate(cells):
        sc = rep["cells"][cell]["scores"]
        vals = [sc[c]["score"] if c in sc else np.nan for c in COLUMNS]
        shown = [c in sc and sc[c]["ci95"] and not zero_width(sc[c]["ci95"]) for c in COLUMNS]
        err = np.array([[v - sc[c]["ci95"][0] if ok else np.nan for v, c, ok in zip(vals, COLUMNS, shown)],
                        [sc[c]["ci95"][1] - v if ok else np.nan for v, c, ok in zip(vals, COLUMNS, shown)]])
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, yerr=err, capsize=2, label=cell)
    ax.set_xticks(x, [LABEL[c] for c in COLUMNS], fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(f"{rep['experiment']}: score per cell (mean over seeds, 95% CI)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, results / "scores.png")
    plt.close(fig)

    others = [c for c in cells if "vs_baseline" in rep["cells"][c]]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.45 * max(1, len(others)) * 2))
    cols = ["overall", "overall_tasks"]
    for j, col in enumerate(cols):
        for i, cell in enumerate(others):
            d = rep["cells"][cell]["vs_baseline"][col]
            y = i * (len(cols) + 1) + j
            ci = d["ci95"] if d["ci95"] and not zero_width(d["ci95"]) else [np.nan, np.nan]  # no whisker
            ax.errorbar(d["diff"], y, xerr=[[d["diff"] - ci[0]], [ci[1] - d["diff"]]],
                        fmt="o", color=f"C{j}", capsize=3, label=LABEL[col] if i == 0 else None)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks([i * (len(cols) + 1) + 0.5 for i in range(len(others))],
                  [f"{c} - {rep['cells'][c]['vs_baseline']['baseline']}" for c in others], fontsize=8)
    ax.set_xlabel("paired difference to the reference cell (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, results / "diff.png")
    plt.close(fig)

    bal = rep.get("balancing") or {}
    if bal:
        fig, axes = plt.subplots(1, len(bal), figsize=(0.5 + 3.6 * len(bal), 3.4), squeeze=False,
                                 sharey=True)
        for ax, (cell, e) in zip(axes[0], bal.items()):
            for g, w in e["trace"]["weight"].items():
                ax.plot(e["trace"]["step"], [np.nan if v is None else v for v in w], label=g)
            ax.set_title(f"{cell} ({e['runs']} run{'s' if e['runs'] != 1 else ''})", fontsize=9)
            ax.set_xlabel("step")
        axes[0][0].set_ylabel("group weight")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        _save(fig, results / "balance.png")
        plt.close(fig)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


def write_report(results: str | Path, **kw) -> dict:
    results = Path(results)
    rep = build_report(results, **kw)
    write_json(results / "results.json", rep)
    with atomic_open(results / "report.md") as fh:
        fh.write(report_markdown(rep))
    _plots(rep, results)
    return rep
