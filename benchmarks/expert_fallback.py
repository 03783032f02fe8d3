"""Routed experts on questions no expert was trained for: the base model (the default) vs an
all-tasks expert (`shoptune export experts --fallback mean`), re-scored from an experiment's
finished Poly runs, paired with the runs' own scores and with a reference cell.

    .venv/bin/python benchmarks/expert_fallback.py --exp runs/exp/capacity --cell narrow-poly \
        --reference narrow-r32 [--out docs/results/expert_fallback.json]

For each seed of CELL (a `peft: poly` cell; its adapters in EXP/cells/<run>/train): export its
experts with ``fallback="mean"``, score them with the experiment's own suite, protocol, engine
and precision (EXP/plan.json), and compare, paired (same questions, same seed):
(1) mean fallback - the run's own scores (base-model fallback): only the questions of
    capabilities the run never trained on can change;
(2) mean fallback - REFERENCE (e.g. one LoRA trained on the same rows, which applies everywhere);
(3) the run's own scores - REFERENCE, as the experiment reported it.
Exploratory: the fallback was chosen after the experiment's verdicts, so it does not change
them. Finished evaluations are reused (EXP/fallback/<run>/eval/scores.json). Writes ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shoptune import machine
from shoptune._io import write_json
from shoptune.eval.paired import paired_compare
from shoptune.eval.runs import read_predictions
from shoptune.eval.runner import evaluate
from shoptune.experiment.runner import _routed
from shoptune.experts import ALL_TASKS, ExpertError, export_run_experts


def rows_of(path: Path) -> list[dict]:
    return read_predictions(path)  # (cells evaluated before #34 name tasks task2, new ones shopbench_task2)


def summary(cmp: dict) -> dict:
    keep = lambda s: {k: s[k] for k in ("a", "b", "diff", "ci95", "p", "seed_diffs")}
    return {"overall": keep(cmp["overall"]),
            "capabilities": {c: keep(v) for c, v in cmp["capabilities"].items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", type=Path, required=True, help="An experiment's working folder (--out of `experiment run`).")
    ap.add_argument("--cell", required=True, help="A `peft: poly` cell of it.")
    ap.add_argument("--reference", required=True, help="The cell to compare with (same seeds).")
    ap.add_argument("--out", type=Path, default=Path("docs/results/expert_fallback.json"))
    args = ap.parse_args(argv)
    plan = json.loads((args.exp / "plan.json").read_text(encoding="utf-8"))
    runs = {c: sorted((r for r in plan["runs"] if r["cell"] == c), key=lambda r: r["seed"])
            for c in (args.cell, args.reference)}
    if not runs[args.cell] or [r["seed"] for r in runs[args.cell]] != [r["seed"] for r in runs[args.reference]]:
        ap.error(f"{args.cell} and {args.reference}: both must be cells of {args.exp} with the same seeds")
    ev = plan.get("eval") or {"engine": "builtin", "dtype": "auto"}
    own, mean, ref, routed = [], [], [], {}
    for run, rrun in zip(runs[args.cell], runs[args.reference]):
        cells = args.exp / "cells"
        for r in (run, rrun):
            if not (cells / r["id"] / "eval" / "predictions.jsonl").is_file():
                ap.error(f"{cells / r['id']}: no eval/predictions.jsonl (not finished, or its result was "
                         f"reused from another experiment: pass that experiment's --exp and cell)")
        work = args.exp / "fallback" / run["id"]
        try:
            meta = export_run_experts(cells / run["id"] / "train", work / "experts", fallback="mean",
                                      overwrite=True)
        except ExpertError as e:
            ap.error(f"--cell {args.cell}: {e}")
        routes = _routed(experts=meta)
        scores = work / "eval" / "scores.json"
        done = json.loads(scores.read_text(encoding="utf-8")) if scores.is_file() else None
        if not (done and done["task_adapters"] == routes  # reuse only what these experts produced
                and done["manifest"]["fingerprint"] == plan["suite"]["fingerprint"]):
            model = json.loads((cells / run["id"] / "train" / "run.json").read_text())["config"]["model"]
            done = evaluate(model=model, suite=plan["suite_file"], out=work / "eval", protocol=plan["protocol"],
                            engine=ev["engine"], dtype=ev["dtype"], task_adapters=routes, overwrite=True)
            if done["manifest"]["fingerprint"] != plan["suite"]["fingerprint"]:
                sys.exit(f"suite {plan['suite']['name']} changed since the experiment ran")
        own.append(rows_of(cells / run["id"] / "eval" / "predictions.jsonl"))
        mean.append(rows_of(work / "eval" / "predictions.jsonl"))
        ref.append(rows_of(cells / rrun["id"] / "eval" / "predictions.jsonl"))
        to_all = str(work / "experts" / ALL_TASKS)
        routed[run["id"]] = sum(done["task_adapters"].get(q["task"]) == to_all for q in mean[-1])
    res = {
        "machine": machine.describe(),
        "command": "benchmarks/expert_fallback.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "experiment": plan["name"], "cell": args.cell, "reference": args.reference,
        "seeds": [r["seed"] for r in runs[args.cell]], "suite": plan["suite"], "eval": ev,
        "questions_to_all_tasks_expert": routed,
        "mean_vs_own": summary(paired_compare(own, mean)),
        "mean_vs_reference": summary(paired_compare(ref, mean)),
        "own_vs_reference": summary(paired_compare(ref, own)),
    }
    write_json(args.out, res)
    ci = lambda c: f"[{c[0]:+.3f}, {c[1]:+.3f}]" if c else "[no CI: one question a task]"
    fmt = lambda s: (f"{s['diff']:+.3f} {ci(s['ci95'])} p={s['p']:.3g} "
                     f"(seeds {', '.join(f'{x:+.3f}' for x in s['seed_diffs'])})")
    print(f"{machine.summary()}; {plan['name']}/{args.cell}, seeds {res['seeds']}; "
          f"questions answered by the all-tasks expert: {sorted(set(routed.values()))}")
    for key, label in (("mean_vs_own", "mean fallback - own (base fallback)"),
                       ("mean_vs_reference", f"mean fallback - {args.reference}"),
                       ("own_vs_reference", f"own - {args.reference}")):
        print(f"{label:40s} all-around {fmt(res[key]['overall'])}")
        for c, s in res[key]["capabilities"].items():
            print(f"{'':40s} {c:24s} {fmt(s)}")
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
