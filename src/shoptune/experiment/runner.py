"""Run an experiment: every cell x seed trains with the normal recipe, then is scored on the suite.

    shoptune experiment run configs/experiments/rank.yaml --out runs/exp/rank \\
        --results docs/results/experiments/rank [--workers 1] [--dry-run]

Layout (heavy and light files apart, so the light ones can be committed):

    RESULTS/experiment.json               the plan: runs (cell, seed, key, overrides, max_steps)
    RESULTS/suite.json                    the suite manifest + per-question task/capability/metric
    RESULTS/cells/<cell>.s<seed>.<key>/result.json
                                          a finished run: config, training metrics, suite scores,
                                          per-question scores (what paired statistics need); ~15 KB
    OUT/cells/<run>/train/                checkpoints, adapter, log.jsonl, run.json (never commit)
    OUT/cells/<run>/eval/                 predictions.jsonl, scores.json, report.md
    OUT/cells/<run>/cell.log              the run's output

``RESULTS`` defaults to ``OUT``. A run is finished when its ``result.json`` exists with its key,
so committing ``RESULTS`` is all a later session needs: it re-plans, skips those runs and
resumes the rest (a killed run continues from its newest complete checkpoint in ``OUT``).
Each run is its own process (killed with the runner: PR_SET_PDEATHSIG on Linux).

Budget: with ``budget: {tokens: N}`` each run gets ``max_steps = N / (mean tokens per row of its
own mixture x batch_size x grad_accum)``, so a one-capability cell and a four-capability cell
see the same number of training tokens ("more diverse" is not "more data"). The mean is taken
over the cell's mixture as configured but without de-duplication/decontamination (fast; those
remove a few rows only); ``result.json`` records the tokens actually seen.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from shoptune import machine
from shoptune._io import check_output_dir, make_dirs, read_json, read_marker, write_json, write_marker
from shoptune.experiment.spec import (EvalSettings, ExperimentSpec, MergeSettings, load_spec, resolve_path,
                                      run_key, steps_for_budget)


# ----------------------------------------------------------------------------- plan

def _avg_tokens_per_row(cfg, cache: dict) -> float:
    from shoptune.models import load_tokenizer
    from shoptune.train.format import encode_records
    from shoptune.train.mixture import build_mixture

    mix = cfg.mixture.model_copy(update={"dedup": False, "decontaminate_against": []})
    key = json.dumps([mix.model_dump(), cfg.model, cfg.protocol, cfg.max_length], sort_keys=True)
    if key not in cache:
        recs, _ = build_mixture(mix)
        if not recs:
            raise ValueError("a cell's mixture selects no rows; check its overrides")
        tok = cache.setdefault(("tok", cfg.model), load_tokenizer(cfg.model))
        ex = encode_records(recs, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                            task_index={t: i for i, t in enumerate(sorted({r.task for r in recs}))})
        cache[key] = sum(e["length"] for e in ex) / len(ex)
    return cache[key]


def _per_task_plan(cfg, budget, cache: dict, by: str = "task") -> dict:
    """Rows, mean tokens per row and steps of each task's (``by="capability"``: each
    capability's) adapter in a per-task cell: the cell's mixture as it will be built (cleaned and
    decontaminated), each group's share of the budget spent on that group's rows alone."""
    from shoptune.models import load_tokenizer
    from shoptune.train.format import encode_records
    from shoptune.train.mixture import build_mixture

    key = json.dumps(["per-" + by, cfg.mixture.model_dump(), cfg.model, cfg.protocol, cfg.max_length],
                     sort_keys=True)
    if key not in cache:
        recs, _ = build_mixture(cfg.mixture)
        if not recs:
            raise ValueError("a cell's mixture selects no rows; check its overrides")
        tok = cache.setdefault(("tok", cfg.model), load_tokenizer(cfg.model))
        by_task: dict[str, list] = {}
        for r in recs:
            by_task.setdefault(r.task if by == "task" else r.capability, []).append(r)
        info = {}
        for t, rows in sorted(by_task.items()):
            ex = encode_records(rows, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                                task_index={x: i for i, x in enumerate(sorted({r.task for r in rows}))})
            info[t] = {"rows": len(rows), "avg_tokens_per_row": sum(e["length"] for e in ex) / len(ex)}
        cache[key] = (len(recs), info)
    n, info = cache[key]
    rows_per_step = cfg.batch_size * cfg.grad_accum
    plan_ = {}
    for t, i in info.items():
        if budget is None or budget.steps is not None:  # steps: split by the task's share of rows
            total = budget.steps if budget is not None else cfg.max_steps
            steps = max(1, round(total * i["rows"] / n))
        else:
            steps = steps_for_budget(budget.model_copy(update={"tokens": max(1, round(budget.tokens * i["rows"] / n))}),
                                     cfg.max_steps, i["avg_tokens_per_row"], rows_per_step)
        plan_[t] = {"rows": i["rows"], "avg_tokens_per_row": round(i["avg_tokens_per_row"], 2),
                    "max_steps": steps,
                    "planned_tokens": round(i["avg_tokens_per_row"] * steps * rows_per_step)}
    return plan_


def _task_overrides(run: dict, task: str, info: dict, output_dir) -> list[str]:
    """One group's adapter in a per-task (per-capability) run: the run's config on that task's
    (capability's) rows alone."""
    which = "include_capabilities" if run.get("split_by") == "capability" else "include_tasks"
    return [*run["overrides"], f"mixture.{which}={json.dumps([task])}",
            f"mixture.total={info['rows']}", f"max_steps={info['max_steps']}", f"output_dir={output_dir}"]


def _check_split(cfg, suite_cfg) -> None:
    """A suite part drawn from a split of the training sources must use the same split settings,
    else its questions could be in the training split."""
    m = cfg.mixture
    for part in suite_cfg.parts:
        if part.split and set(part.sources) & set(m.sources):
            mine = (m.split_seed, m.split_validation, m.split_test)
            theirs = (part.split_seed, part.split_validation, part.split_test)
            if mine != theirs or m.split == part.split:
                raise ValueError(
                    f"suite {suite_cfg.name} part {part.name}: split {part.split} with "
                    f"(seed, validation, test) = {theirs}, but the training mixture draws split "
                    f"{m.split} with {mine}: the suite's questions could be trained on")


EXPERIMENT_FILES = ("plan.json", "cells", "experiment.json", "suite.json", "report.md", "results.json",
                    "scores.png", "diff.png", "balance.png")


def experiment_entries(folder: Path) -> list[str]:
    """The names an experiment writes in its --out / --results folder (it resumes in place)."""
    return [n for n in EXPERIMENT_FILES if (Path(folder) / n).exists()]


def check_experiment_dirs(out, results, spec_path: Path, base: Path) -> None:
    """--out and --results may hold this (or an earlier) experiment, to resume; never anything
    else, an input, or the current folder (see :func:`shoptune._io.check_output_dir`)."""
    for flag, folder in (("--out", out), ("--results", results)):
        if folder is not None:
            check_output_dir(folder, command="experiment run", resume=True, legacy=experiment_entries,
                             flag=flag, inputs=[spec_path, base])
def _config_loader(base: Path):
    """``overrides -> TrainConfig`` for the base config ``base``, read (and its YAML parsed) once:
    what ``load_config(base, overrides)`` gives, at the cost of a validation per run."""
    import copy

    from shoptune.configfile import apply_overrides, parse_override, read_yaml, validate
    from shoptune.train.config import TrainConfig
    data, lines = read_yaml(base, "training config")

    def load(overrides: list[str]) -> TrainConfig:
        given = apply_overrides(copy.deepcopy(data), overrides)
        return validate(TrainConfig, given, str(base), lines, [parse_override(o)[0] for o in overrides])
    return load


def plan(spec_path: str | Path, out: str | Path, results: str | Path | None = None, *,
         launcher: str | None = None, eval_engine: str | None = None, eval_dtype: str | None = None,
         write: bool = True, progress=None) -> dict:
    """Expand the experiment into runs with their keys and step budgets; write the plan (unless
    ``write`` is false: a dry run). ``eval_engine``/``eval_dtype`` override the file's ``eval:``.
    ``progress(message)`` is told each step."""
    say = progress or (lambda _m: None)
    from shoptune.eval.suite import build_suite, load_suite_config, suite_path

    spec_path = Path(spec_path)
    spec: ExperimentSpec = load_spec(spec_path)
    check_experiment_dirs(out, results, spec_path, resolve_path(spec.base, spec_path.parent))
    eval_cfg = spec.eval.model_copy(update={k: v for k, v in (("engine", eval_engine), ("dtype", eval_dtype)) if v})
    from shoptune.configfile import validate
    validate(EvalSettings, eval_cfg.model_dump(), "--eval-engine/--eval-dtype")  # (one line each)
    out = Path(out)
    results = Path(results) if results else out
    base = resolve_path(spec.base, spec_path.parent)
    suite_file = suite_path(spec.suite)
    suite_cfg = load_suite_config(suite_file)
    say(f"building suite {spec.suite}")
    records, manifest = build_suite(suite_file)
    runs, cache = [], {}
    cells = spec.expanded_cells()  # (once: a grid may hold many thousands)
    load_config = _config_loader(base)
    by_cell_seed: dict[tuple[str, int], dict] = {}
    # seed-major: every cell's first seed runs before any second seed, so a partly finished
    # experiment already holds one complete comparison
    for seed in spec.seeds:
        for cell in cells:
            say(f"planning {cell.name} seed {seed} ({len(runs) + 1} of "
                f"{len(spec.seeds) * len(cells)}): its mixture's tokens per row")
            overrides = [*spec.overrides, *cell.overrides, f"seed={seed}"]
            try:
                cfg = load_config(overrides)
            except Exception as e:  # pydantic / override errors: name the cell
                raise ValueError(f"cell {cell.name}: {e}") from None
            _check_split(cfg, suite_cfg)
            against = list(cfg.mixture.decontaminate_against)
            if f"suite:{spec.suite}" not in against:  # never train on the suite's questions
                overrides.append(f"mixture.decontaminate_against={json.dumps(against + [f'suite:{spec.suite}'])}")
            avg = _avg_tokens_per_row(cfg, cache) if spec.budget and spec.budget.tokens else None
            steps = steps_for_budget(spec.budget, cfg.max_steps, avg or 0.0,
                                     cfg.batch_size * cfg.grad_accum)
            overrides.append(f"max_steps={steps}")
            cfg = load_config(overrides)
            source = by_cell_seed.get((cell.merge_of, seed))
            merge = ({**(cell.merge or MergeSettings()).model_dump(), "of": source["key"]}
                     if cell.merge_of else None)
            key = run_key(cfg.model_dump(), manifest["fingerprint"], spec.protocol, per_task=cell.per_task,
                          per_capability=cell.per_capability, merge=merge, eval_settings=eval_cfg.in_key())
            run = {"id": f"{cell.name}.s{seed}.{key[:8]}", "cell": cell.name, "seed": seed,
                   "key": key, "overrides": overrides, "max_steps": steps,
                   "avg_tokens_per_row": round(avg, 2) if avg else None,
                   "planned_tokens": round(avg * steps * cfg.batch_size * cfg.grad_accum) if avg else None}
            if cell.per_task or cell.per_capability:
                if cfg.curriculum != "none" or cfg.peft != "lora":
                    raise ValueError(f"cell {cell.name}: per_task/per_capability train one plain LoRA "
                                     f"per group (curriculum={cfg.curriculum}, peft={cfg.peft} do not apply)")
                by = "task" if cell.per_task else "capability"
                run["split_by"] = by
                run["per_task"] = _per_task_plan(cfg, spec.budget, cache, by=by)
                run["max_steps"] = sum(i["max_steps"] for i in run["per_task"].values())
                run["planned_tokens"] = sum(i["planned_tokens"] for i in run["per_task"].values())
            if merge:
                run.update(merge=merge, merge_of=source["id"], max_steps=0,
                           planned_tokens=source["planned_tokens"], overrides=source["overrides"])
            runs.append(run)
            by_cell_seed[(cell.name, seed)] = run
    exp = {"name": spec.name, "description": spec.description, "spec_file": str(spec_path),
           "spec": spec.model_dump(), "base": str(base), "baseline": spec.baseline,
           "cells": [c.name for c in cells], "seeds": spec.seeds,
           "baselines": {c.name: c.baseline or spec.baseline for c in cells},
           "contrasts": [c.model_dump() for c in spec.contrasts],
           "suite": {"name": spec.suite, "version": manifest["version"],
                     "fingerprint": manifest["fingerprint"], "n_questions": manifest["n_questions"]},
           "protocol": spec.protocol, "eval": eval_cfg.model_dump(), "runs": runs}
    suite_doc = {**{k: v for k, v in manifest.items() if k != "ids"},
                 "questions": [{"id": r.id, "task_name": r.task, "capability": r.capability,
                                "metric": r.metric} for r in records]}
    if not write:
        return exp
    for folder in {Path(out), Path(results)}:
        if read_marker(folder) is None:
            write_marker(make_dirs(folder), "experiment run", files=[])  # (its files: experiment_entries)
    write_json(results / "experiment.json", exp)
    write_json(results / "suite.json", suite_doc)
    write_json(out / "plan.json", {**exp, "results_dir": str(results.resolve()), "out": str(out.resolve()),
                                   "launcher": launcher,
                                   "base": str(base.resolve()), "suite_file": str(suite_file.resolve())})
    return exp


def result_path(results: Path, run: dict) -> Path:
    return Path(results) / "cells" / run["id"] / "result.json"


def is_done(results: Path, run: dict) -> bool:
    p = result_path(results, run)
    if not p.exists():
        return False
    try:
        return read_json(p, "result.json").get("key") == run["key"]
    except (OSError, ValueError, AttributeError):  # (unreadable or not an object: not done)
        return False


def reusable(results: Path, exp: dict, runs: list[dict]) -> dict[str, tuple[Path, dict]]:
    """{run id: (result file, result)} for ``runs`` already finished by another experiment whose
    results folder sits beside this one: the same key (resolved training config, seed, suite
    fingerprint, protocol) is the same run. The code version is not in the key: the caller
    shows the source's commit (``git_commit``) and ``--no-reuse`` retrains instead."""
    results = Path(results).resolve()
    by_key: dict[str, list[Path]] = {}
    for f in results.parent.glob("*/cells/*/result.json"):
        if f.parents[2].resolve() != results:
            by_key.setdefault(f.parent.name.rsplit(".", 1)[-1], []).append(f)
    found = {}
    for run in runs:
        for f in sorted(by_key.get(run["id"].rsplit(".", 1)[-1], [])):
            try:
                res = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if res.get("key") == run["key"] and \
                    (res.get("suite") or {}).get("fingerprint") == exp["suite"]["fingerprint"]:
                found[run["id"]] = (f, res)
                break
    return found


def reuse_finished(results: Path, exp: dict, runs: list[dict]) -> dict[str, str]:
    """Copy in the results :func:`reusable` finds; the copy names its source in ``reused_from``.
    Returns {run id: "experiment/run id @ commit"}."""
    done = {}
    found = reusable(results, exp, runs)  # one scan of the sibling folders for all runs
    for run in runs:
        if run["id"] not in found:
            continue
        f, res = found[run["id"]]
        source = res.get("reused_from") or f"{f.parents[2].name}/{f.parent.name}"
        write_json(result_path(results, run), {**res, "experiment": exp["name"], "id": run["id"],
                                               "cell": run["cell"], "reused_from": source})
        commit = res.get("git_commit")
        done[run["id"]] = f"{source} @ {commit[:10] if commit else 'unknown commit'}"
    return done


# ----------------------------------------------------------------------------- one run (child)

def _complete_checkpoints(train_dir: Path) -> list[str]:
    """Complete checkpoints (``checkpoint-N`` or ``stage3/checkpoint-N``), oldest first."""
    found = [p.parent.relative_to(train_dir) for p in train_dir.rglob("checkpoint-*/COMPLETE")]
    return [str(p) for p in sorted(found, key=lambda p: (str(p.parent), int(p.name.split("-")[-1])))]


def _train(p: dict, overrides: list[str], train_dir: Path) -> tuple[dict, str | None]:
    """Train (or resume, or skip when finished) one adapter; its run.json and checkpoint.
    With a launcher (e.g. ``accelerate launch ...``) the recipe runs under it as a child."""
    from shoptune.train.config import load_config
    from shoptune.train.recipe import main as train_main
    resumed_from = None
    if not ((train_dir / "run.json").exists() and (train_dir / "adapter").is_dir()):
        ckpts = _complete_checkpoints(train_dir) if train_dir.exists() else []
        resumed_from = ckpts[-1] if ckpts else None
        resume = bool(ckpts) or (train_dir / "stage2").exists()
        if p.get("launcher"):
            cmd = [*shlex.split(p["launcher"]), "-m", "shoptune.train.recipe", p["base"],
                   *overrides, *(["--resume"] if resume else [])]
            print("launching:", shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        else:
            train_main(load_config(p["base"], overrides), resume=resume)
    return json.loads((train_dir / "run.json").read_text(encoding="utf-8")), resumed_from


def _routed(adapter_of_capability: dict[str, str] | None = None, task_dirs: dict[str, str] | None = None,
            experts: dict | None = None) -> dict[str, str]:
    """``task_adapters`` for evaluation: every task card -> the adapter folder that answers it."""
    from shoptune.tasks import all_cards
    out = {}
    for card in all_cards().values():
        if experts is not None:
            name = experts["task_experts"].get(card.name)
            if name is not None:
                out[card.name] = experts["experts"][name]
        elif adapter_of_capability is not None and card.capability in adapter_of_capability:
            out[card.name] = adapter_of_capability[card.capability]
    out.update(task_dirs or {})
    return out


def _train_run(p: dict, run: dict) -> tuple[dict, str | None, dict]:
    """Train one run's adapter(s); returns (run.json summary, resumed from, evaluate() kwargs)."""
    from shoptune.train.config import load_config
    train_dir = Path(p["out"]) / "cells" / run["id"] / "train"
    if run.get("per_task"):
        per_task = {}
        for t, info in run["per_task"].items():
            tdir = train_dir / t
            per_task[t] = (*_train(p, _task_overrides(run, t, info, tdir), tdir), tdir)
        trained = _combine_per_task({t: v[0] for t, v in per_task.items()})
        resumed_from = next((f"{t}/{v[1]}" for t, v in per_task.items() if v[1]), None)
        dirs = {t: str(v[2] / "adapter") for t, v in per_task.items()}
        if run.get("split_by") == "capability":
            return trained, resumed_from, {"task_adapters": _routed(adapter_of_capability=dirs)}
        return trained, resumed_from, {"task_adapters": dirs}
    trained, resumed_from = _train(p, [*run["overrides"], f"output_dir={train_dir}"], train_dir)
    cfg = load_config(p["base"], [*run["overrides"], f"output_dir={train_dir}"])
    if cfg.peft == "poly":  # task-routed experts, exported as plain LoRA adapters
        from shoptune.experts import export_run_experts
        meta = export_run_experts(train_dir, train_dir / "experts", overwrite=True)  # (a re-run: its own)
        return trained, resumed_from, {"task_adapters": _routed(experts=meta)}
    return trained, resumed_from, {"adapter": str(train_dir / "adapter")}


def step_tokens_per_s(train_dir: Path) -> float | None:
    """Training throughput of a run: the median of the tokens/s its logging intervals measured
    (``log.jsonl``; every adapter's, for a per-task or per-capability run). Unlike tokens over
    wall time it does not count time the run spent paused, waiting or resuming. Time spent on a
    diagnostic that is not training (``loss_balancing: uncertainty``'s per-group gradient-norm
    probe, ``balance/probe_s``, cumulative) is taken out of its interval, so the rate is the
    method's cost per token, not its logging's."""
    import statistics

    rates = []
    for f in sorted(Path(train_dir).rglob("log.jsonl")):
        prev_seen, prev_probe = None, 0.0
        for line in f.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                v = rec.get("tokens_per_s")
            except (json.JSONDecodeError, AttributeError):
                continue
            if not isinstance(v, (int, float)) or v <= 0:
                continue
            seen, probe = rec.get("num_input_tokens_seen"), rec.get("balance/probe_s")
            if isinstance(probe, (int, float)):
                # cumulative within one process: after a resume it starts again from 0
                d_probe = probe - prev_probe if probe >= prev_probe else probe
                prev_probe = probe
                if isinstance(seen, (int, float)) and prev_seen is not None and seen > prev_seen:
                    seconds = (seen - prev_seen) / v
                    if seconds > d_probe:
                        v = (seen - prev_seen) / (seconds - d_probe)
            prev_seen = seen if isinstance(seen, (int, float)) else None
            rates.append(float(v))
    return round(statistics.median(rates), 1) if rates else None


def balance_trace(train_dir: Path) -> dict | None:
    """Each group's loss-balancing weight and gradient norm at every logging step of a run
    (``balance/weight/<group>``, ``balance/grad_norm/<group>`` in ``log.jsonl``), kept in its
    result.json so the report can plot them after ``runs/`` is gone. A step logged twice (a
    resumed run re-logs from its checkpoint) keeps its last entry. None without balancing."""
    by_step: dict[int, dict] = {}
    f = Path(train_dir) / "log.jsonl"
    if not f.is_file():
        return None
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and any(
                k.startswith("balance/weight/") for k in rec):
            by_step[rec["step"]] = rec
    if not by_step:
        return None
    steps = sorted(by_step)
    out: dict = {"step": steps}
    for kind in ("weight", "grad_norm"):
        groups = sorted({k.split("/", 2)[2] for r in by_step.values() for k in r
                         if k.startswith(f"balance/{kind}/")})
        if groups:
            out[kind] = {g: [by_step[st].get(f"balance/{kind}/{g}") for st in steps] for g in groups}
    return out


def run_one(plan_file: str | Path, run_id: str) -> dict:
    """Train (or resume) one run, evaluate its adapter on the suite, write its result.json."""
    from shoptune.eval.runner import evaluate
    from shoptune.train.config import load_config
    from shoptune.train.trainer import use_bf16

    p = read_json(plan_file, "plan.json")
    run = next(r for r in p["runs"] if r["id"] == run_id)
    work = Path(p["out"]) / "cells" / run_id
    train_dir = work / "train"
    cfg = load_config(p["base"], [*run["overrides"], f"output_dir={train_dir}"])
    t0 = time.time()
    if run.get("merge"):  # the source run's adapters (trained now if they are not on disk), merged
        from shoptune.experts import merge_adapters
        source = next(r for r in p["runs"] if r["id"] == run["merge_of"])
        trained, resumed_from, src_kw = _train_run(p, source)
        folders = {Path(d).parent.name: Path(d) for d in sorted(set(src_kw["task_adapters"].values()))}
        merged = merge_adapters(folders, train_dir / "adapter", model=cfg.model,
                                method=run["merge"]["method"], density=run["merge"]["density"],
                                overwrite=True)  # (a re-run replaces its own earlier merge)
        eval_kw = {"adapter": str(merged)}
    else:
        trained, resumed_from, eval_kw = _train_run(p, run)
    train_s = time.time() - t0
    t1 = time.time()
    ev = p.get("eval") or {"engine": "builtin", "dtype": "auto"}
    s = evaluate(model=cfg.model, suite=p["suite_file"], out=work / "eval", protocol=p["protocol"],
                 quiet=True, engine=ev["engine"], dtype=ev["dtype"], overwrite=True, **eval_kw)
    if s["manifest"]["fingerprint"] != p["suite"]["fingerprint"]:
        raise RuntimeError(f"suite {p['suite']['name']} changed since the plan (fingerprint "
                           f"{s['manifest']['fingerprint']} vs {p['suite']['fingerprint']}); re-plan")
    rows = [json.loads(x) for x in (work / "eval" / "predictions.jsonl").read_text().splitlines() if x]
    mix = trained["mixture"]
    result = {
        "experiment": p["name"], "id": run_id, "cell": run["cell"], "seed": run["seed"],
        "key": run["key"], "overrides": run["overrides"], "config": cfg.model_dump(),
        "train": {"steps": trained["metrics"]["steps"], "tokens_seen": trained["metrics"]["tokens_seen"],
                  "planned_tokens": run["planned_tokens"], "first_loss": trained["metrics"]["first_loss"],
                  "final_loss": trained["metrics"]["final_loss"], "wall_time_s": trained["wall_time_s"],
                  "resumed_from": resumed_from, "merged_from": run.get("merge_of"),
                  "trainable_params": trained.get("trainable_params"),
                  "precision": None if run.get("merge") else ("bf16" if use_bf16(cfg.bf16) else "fp32"),
                  "tokens_per_s": step_tokens_per_s(
                      Path(p["out"]) / "cells" / run["merge_of"] / "train" if run.get("merge") else train_dir),
                  "balancing": trained.get("balancing"),
                  "balance_trace": None if run.get("merge") else balance_trace(train_dir),
                  "per_task": ({t: {**run["per_task"][t], **v} for t, v in trained["metrics"]["per_task"].items()}
                               if run.get("per_task") else None),
                  "mixture": {k: mix.get(k) for k in ("rows", "tasks", "capabilities", "diversity",
                                                      "tokens", "removed", "contamination")},
                  "curriculum": {k: v for k, v in (trained.get("curriculum") or {}).items()
                                 if k in ("low_resource", "excluded", "stopped", "final_task_weights")} or None},
        "suite": {**p["suite"]},
        "scores": {k: s[k] for k in ("overall", "overall_tasks", "tracks", "capabilities", "ci95")},
        "tasks": {t: round(v["score"], 6) for t, v in s["tasks"].items()},
        "per_question": {"ids_sha": s["manifest"]["fingerprint"],
                         "score": [round(r["score"], 6) for r in rows],
                         "counts": {str(i): r["counts"] for i, r in enumerate(rows) if "counts" in r}},
        "eval_timing": s["timing"], "eval_engine": s.get("engine"),
        "versions": trained.get("versions"), "git_commit": trained.get("git_commit"),
        "machine": machine.describe(),
        "wall_time_s": {"train": round(train_s, 1), "eval": round(time.time() - t1, 1)},
    }
    write_json(result_path(Path(p["results_dir"]), run), result)
    return result


def _combine_per_task(runs: dict[str, dict]) -> dict:
    """One ``run.json``-like summary of a per-task run's adapters: steps, tokens and time add up,
    losses are step-weighted means, the mixture is the union; each task's own numbers kept."""
    m = {t: r["metrics"] for t, r in runs.items()}

    def mean(k):
        vals = [(x[k], x["steps"]) for x in m.values() if x.get(k) is not None]
        return round(sum(v * w for v, w in vals) / max(1, sum(w for _, w in vals)), 6) if vals else None

    mixes = [r["mixture"] for r in runs.values()]
    tasks = {t: n for mx in mixes for t, n in mx.get("tasks", {}).items()}
    caps: dict[str, int] = {}
    for mx in mixes:
        for c, n in mx.get("capabilities", {}).items():
            caps[c] = caps.get(c, 0) + n
    removed: dict[str, int] = {}
    for mx in mixes:
        for k, n in (mx.get("removed") or {}).items():
            removed[k] = removed.get(k, 0) + n
    first = next(iter(runs.values()))
    return {
        "metrics": {"steps": sum(x["steps"] for x in m.values()),
                    "tokens_seen": sum(x.get("tokens_seen") or 0 for x in m.values()),
                    "first_loss": mean("first_loss"), "final_loss": mean("final_loss"),
                    "per_task": {t: {k: x.get(k) for k in ("steps", "tokens_seen", "first_loss", "final_loss")}
                                 for t, x in m.items()}},
        "wall_time_s": round(sum(r.get("wall_time_s") or 0 for r in runs.values()), 1),
        "trainable_params": sum(r.get("trainable_params") or 0 for r in runs.values()) or None,
        "mixture": {"rows": sum(tasks.values()), "tasks": tasks, "capabilities": caps,
                    "diversity": {"n_tasks": len(tasks), "adapters": len(runs)},
                    "tokens": {"total": sum((mx.get("tokens") or {}).get("total", 0) for mx in mixes),
                               "answer": sum((mx.get("tokens") or {}).get("answer", 0) for mx in mixes)},
                    "removed": removed, "contamination": None},
        "versions": first.get("versions"), "git_commit": first.get("git_commit"),
    }


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ----------------------------------------------------------------------------- orchestration

def _progress_of(out: Path, run: dict) -> str:
    work = out / "cells" / run["id"]
    if (work / "train" / "run.json").exists():
        return "evaluating"
    step = 0
    for log in (work / "train").rglob("log.jsonl") if (work / "train").exists() else []:
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines()[-3:]:
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except ValueError:
                pass
    return f"training {step}/{run['max_steps']}"


def selected(run: dict, only: list[str] | None) -> bool:
    """Whether ``run`` matches one of the ``only`` patterns (shell-style, against the cell name
    and ``CELL.sSEED``: ``diverse-r32``, ``*.s1``, ``narrow-r8.s0``); no patterns: every run."""
    from fnmatch import fnmatchcase
    names = (run["cell"], f"{run['cell']}.s{run['seed']}")
    return not only or any(fnmatchcase(n, pat) for pat in only for n in names)


def check_only(exp: dict, only: list[str] | None) -> None:
    if only and not any(selected(r, only) for r in exp["runs"]):
        raise ValueError(f"--only {' '.join(only)}: no run matches; runs are named CELL.sSEED: "
                         + ", ".join(r["id"].rsplit(".", 1)[0] for r in exp["runs"]))


def _warn_precision(exp: dict, results: Path, todo: list[dict], console) -> None:
    """Say so when this machine would train the waiting runs in another precision than the
    finished ones (``bf16: auto`` follows the machine; a run's key does not)."""
    if not todo:
        return
    from shoptune.experiment.report import finished_results, precisions
    from shoptune.train.config import load_config
    from shoptune.train.trainer import use_bf16

    finished = {p for p in precisions(finished_results(results, exp)) if p != "not recorded"}
    here = {"bf16" if use_bf16(load_config(exp["base"], r["overrides"]).bf16) else "fp32" for r in todo}
    if finished and here - finished:
        from rich.console import Console

        (console or Console(stderr=True)).print(f"[bold yellow]warning:[/] finished runs trained in {', '.join(sorted(finished))}; "
                      f"this machine trains the rest in {', '.join(sorted(here))} (bf16: auto follows the "
                      "machine). Their comparisons would mix precisions: run on a machine like the "
                      "first runs' one, or pin bf16 in the experiment's overrides and start over.")


def run_experiment(spec_path: str | Path, out: str | Path, *, results: str | Path | None = None,
                   workers: int = 1, console=None, poll_s: float = 1.0, launcher: str | None = None,
                   only: list[str] | None = None, reuse: bool = True, eval_engine: str | None = None,
                   eval_dtype: str | None = None) -> dict:
    """Plan, skip finished runs, run the rest ``workers`` at a time; returns a status summary.
    ``launcher``: a command prefix each run's training is started with (``accelerate launch
    --config_file ...`` on a multi-GPU machine); evaluation stays in the run's own process.
    ``only``: run just the runs these patterns select (see :func:`selected`); the rest wait.
    ``reuse``: copy in runs another experiment already finished (:func:`reuse_finished`)."""
    from rich.live import Live
    from rich.table import Table

    out = Path(out)
    exp = plan(spec_path, out, results, launcher=launcher, eval_engine=eval_engine, eval_dtype=eval_dtype)
    results = Path(results) if results else out
    plan_file = out / "plan.json"
    check_only(exp, only)
    reused = reuse_finished(results, exp, [r for r in exp["runs"] if selected(r, only) and not is_done(results, r)]) \
        if reuse else {}
    unfinished = [r for r in exp["runs"] if not is_done(results, r)]
    todo = [r for r in unfinished if selected(r, only)]
    skipped = [r["id"] for r in exp["runs"] if r not in unfinished]
    left_out = [r["id"] for r in unfinished if r not in todo]
    _warn_precision(exp, results, todo, console)
    env = dict(os.environ)
    if workers > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    running: dict[str, tuple[subprocess.Popen, float, dict]] = {}
    done, failed, durations = [], [], []
    t_start = time.time()

    def view() -> Table:
        left = len(todo) + len(running)
        eta = "?"
        if durations:
            eta = f"{sum(durations) / len(durations) * left / max(1, workers) / 60:.1f} min"
        t = Table(title=f"experiment {exp['name']}: {len(skipped) + len(done)} done "
                        f"({len(skipped)} skipped), {len(running)} running, {len(todo)} waiting, "
                        f"{len(failed)} failed; ETA {eta}")
        t.add_column("run")
        t.add_column("state")
        t.add_column("elapsed", justify="right")
        for rid, (_, t0, run) in running.items():
            t.add_row(rid, _progress_of(out, run), f"{(time.time() - t0) / 60:.1f} min")
        return t

    with Live(view(), console=console, refresh_per_second=1, transient=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while todo or running:
            while todo and len(running) < workers:
                run = todo.pop(0)
                work = out / "cells" / run["id"]
                work.mkdir(parents=True, exist_ok=True)
                log = open(work / "cell.log", "a", encoding="utf-8")
                proc = subprocess.Popen(
                    [sys.executable, "-m", "shoptune.experiment._cell", str(plan_file), run["id"]],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
                log.close()
                running[run["id"]] = (proc, time.time(), run)
            for rid, (proc, t0, run) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[rid]
                if proc.returncode == 0 and is_done(results, run):
                    done.append(rid)
                    durations.append(time.time() - t0)
                else:
                    failed.append(rid)
            live.update(view())
            if todo or running:
                time.sleep(poll_s)
    return {"runs": len(exp["runs"]), "skipped": skipped, "done": done, "failed": failed,
            "not_selected": left_out, "reused": reused, "results_dir": str(results), "wall_time_s": round(time.time() - t_start, 1)}
