"""Experiment files, planning helpers and the report, on hand-made result files (no model)."""
import json

import pytest

from shoptune.eval.paired import paired_compare
from shoptune.eval.suite import load_suite_config
from shoptune.experiment.report import build_report, write_report
from shoptune.experiment.spec import Budget, ExperimentSpec, load_spec, run_key, steps_for_budget
from shoptune.train.config import load_config
from tests.conftest import REPO
from tests.eval.test_paired import make_rows


def test_every_shipped_suite_and_experiment_loads_and_every_cell_is_a_valid_train_config():
    suites = sorted((REPO / "configs" / "eval").glob("*.yaml"))
    assert {p.stem for p in suites} >= {"core", "tiny"}
    for p in suites:
        load_suite_config(p)
    exps = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
    assert {p.stem for p in exps} >= {"capabilities", "subtasks", "rank", "three_stage"}
    for p in exps:
        spec = load_spec(p)
        load_suite_config(REPO / "configs" / "eval" / f"{spec.suite}.yaml")
        for cell in spec.expanded_cells():
            load_config(REPO / spec.base, [*spec.overrides, *cell.overrides, "seed=1"])
    assert len(load_spec(REPO / "configs/experiments/capabilities.yaml").seeds) >= 2
    assert len(load_spec(REPO / "configs/experiments/rank.yaml").seeds) >= 2


def test_grid_expands_into_named_cells_and_bad_specs_are_clear():
    spec = ExperimentSpec(name="g", base="configs/train/smoke.yaml", baseline="r=8,include_capabilities=all",
                          grid={"lora.r": [8, 32], "mixture.include_capabilities": [[], ["multilingual"]]})
    cells = spec.expanded_cells()
    assert [c.name for c in cells] == ["r=8,include_capabilities=all", "r=8,include_capabilities=multilingual",
                                       "r=32,include_capabilities=all", "r=32,include_capabilities=multilingual"]
    assert cells[1].overrides == ["lora.r=8", 'mixture.include_capabilities=["multilingual"]']
    cfg = load_config(REPO / "configs/train/smoke.yaml", cells[1].overrides)
    assert cfg.lora.r == 8 and cfg.mixture.include_capabilities == ["multilingual"]
    with pytest.raises(ValueError, match="baseline 'nope' is not a cell"):
        ExperimentSpec(name="g", base="x", baseline="nope", cells=[{"name": "a"}]).expanded_cells()
    with pytest.raises(ValueError, match="cell names used twice: a"):
        ExperimentSpec(name="g", base="x", baseline="a", cells=[{"name": "a"}, {"name": "a"}]).expanded_cells()
    with pytest.raises(ValueError, match="exactly one of tokens, steps"):
        Budget(tokens=5, steps=3)


def test_budget_and_keys():
    assert steps_for_budget(Budget(tokens=48000), 99, avg_tokens_per_row=150.0, rows_per_step=4) == 80
    assert steps_for_budget(Budget(tokens=48000), 99, avg_tokens_per_row=300.0, rows_per_step=4) == 40
    assert steps_for_budget(Budget(steps=7), 99, 1.0, 1) == 7 and steps_for_budget(None, 99, 1.0, 1) == 99
    cfg = load_config(REPO / "configs/train/smoke.yaml").model_dump()
    k = run_key(cfg, "fp1", "starter-kit")
    assert k == run_key({**cfg, "output_dir": "elsewhere"}, "fp1", "starter-kit")  # not part of the key
    assert k != run_key({**cfg, "seed": 1}, "fp1", "starter-kit") != run_key(cfg, "fp2", "starter-kit")


def _fake_results(tmp_path, cells, seeds, baselines=None):
    """An experiment results folder as the runner writes it, with hand-made question scores."""
    rows = {(c, s): make_rows(10 * i + s) for i, c in enumerate(cells) for s in seeds}
    questions = [{k: r[k] for k in ("id", "task_name", "capability", "metric")} for r in rows[(cells[0], seeds[0])]]
    runs = [{"id": f"{c}.s{s}.k", "cell": c, "seed": s, "key": f"{c}{s}"} for c in cells for s in seeds]
    exp = {"name": "fake", "baseline": cells[0], "cells": cells, "seeds": seeds, "runs": runs,
           "baselines": baselines or {c: cells[0] for c in cells},
           "suite": {"name": "tiny", "version": 1, "fingerprint": "f", "n_questions": len(questions)}}
    (tmp_path / "experiment.json").write_text(json.dumps(exp))
    (tmp_path / "suite.json").write_text(json.dumps({"questions": questions}))
    for run in runs:
        rs = rows[(run["cell"], run["seed"])]
        d = tmp_path / "cells" / run["id"]
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"key": run["key"], "per_question": {
            "score": [r["score"] for r in rs],
            "counts": {str(i): r["counts"] for i, r in enumerate(rs) if "counts" in r}}}))
    return rows


def test_report_paired_ci_equals_a_direct_computation(tmp_path):
    rows = _fake_results(tmp_path, ["base", "more"], [0, 1])
    rep = write_report(tmp_path, n_boot=300, n_perm=300, seed=3)
    direct = paired_compare([rows[("base", 0)], rows[("base", 1)]], [rows[("more", 0)], rows[("more", 1)]],
                            n_boot=300, n_perm=300, seed=3)
    got = rep["cells"]["more"]["vs_baseline"]
    for col in ("overall", "overall_tasks"):
        assert got[col]["diff"] == direct[col]["diff"] and got[col]["ci95"] == direct[col]["ci95"]
        assert got[col]["p"] == direct[col]["p"]
        assert got[col]["seed_diffs"] == direct[col]["seed_diffs"]  # seed s paired with seed s
    assert got["multilingual"]["ci95"] == direct["capabilities"]["multilingual"]["ci95"]
    assert "vs_baseline" not in rep["cells"]["base"]
    md = (tmp_path / "report.md").read_text()
    assert "| more | " in md and "permutation" in md and f"{direct['overall']['diff']:+.3f}" in md
    assert (tmp_path / "scores.png").stat().st_size > 0 and (tmp_path / "diff.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["cells"]["more"]["seeds"] == [0, 1]


def test_report_lists_unfinished_runs_and_stale_keys(tmp_path):
    _fake_results(tmp_path, ["base", "more"], [0])
    res = tmp_path / "cells" / "more.s0.k" / "result.json"
    res.write_text(json.dumps({**json.loads(res.read_text()), "key": "stale"}))
    rep = build_report(tmp_path, n_boot=50, n_perm=50)
    assert rep["missing_runs"] == ["more.s0.k"] and list(rep["cells"]) == ["base"]
    with pytest.raises(FileNotFoundError, match="experiment.json: missing"):
        build_report(tmp_path / "nothing")


def test_resume_point_is_the_newest_complete_checkpoint(tmp_path):
    from shoptune.experiment.runner import _complete_checkpoints
    for rel, done in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                      ("stage3/checkpoint-4", True)):
        (tmp_path / rel).mkdir(parents=True)
        if done:
            (tmp_path / rel / "COMPLETE").write_text("x")
    assert _complete_checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-10", "stage3/checkpoint-4"]
