"""Experiment files, planning helpers and the report, on hand-made result files (no model)."""
import json

import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from shoptune.eval.suite import load_suite_config
from shoptune.experiment.report import build_report, write_report
from shoptune.experiment.runner import check_only, is_done, reuse_finished, selected
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
    with pytest.raises(ValueError, match=r"'nope' \(a baseline or contrast cell\) is not a cell"):
        ExperimentSpec(name="g", base="x", baseline="nope", cells=[{"name": "a"}]).expanded_cells()
    with pytest.raises(ValueError, match=r"'b' \(a baseline or contrast cell\) is not a cell \(cells: a\)"):
        ExperimentSpec(name="g", base="x", baseline="a", cells=[{"name": "a"}],
                       contrasts=[{"name": "c", "a": ["a", "a"], "b": ["a", "b"]}]).expanded_cells()
    with pytest.raises(ValueError, match="cell names used twice: a"):
        ExperimentSpec(name="g", base="x", baseline="a", cells=[{"name": "a"}, {"name": "a"}]).expanded_cells()
    with pytest.raises(ValueError, match="exactly one of tokens, steps"):
        Budget(tokens=5, steps=3)


def test_a_big_grid_is_checked_in_linear_time_and_a_bad_merge_method_is_refused():
    """#31 item 31: the duplicate-name check was quadratic (a 90,000-cell grid did not finish
    planning in 120 s); a merge cell with `method: bogus` passed --dry-run."""
    import time
    spec = ExperimentSpec(name="g", base="x", baseline="r=1,alpha=1",
                          grid={"lora.r": list(range(1, 201)), "lora.alpha": list(range(1, 201))})
    t0 = time.process_time()
    cells = spec.expanded_cells()
    assert len(cells) == 40_000 and cells[-1].name == "r=200,alpha=200"
    assert time.process_time() - t0 < 10  # (~1 s; quadratic: 1.6e9 name comparisons, ~40 s)
    with pytest.raises(ValueError, match="cell names used twice: r=1"):
        ExperimentSpec(name="g", base="x", baseline="r=1", cells=[{"name": "r=1"}],
                       grid={"lora.r": [1, 2]}).expanded_cells()
    merge = {"name": "m", "merge_of": "p"}
    with pytest.raises(ValueError, match="'bogus' is not a combination type of peft's add_weighted_adapter "
                                         r"\(one of ties, dare_ties, "):
        ExperimentSpec(name="g", base="x", baseline="p", cells=[{"name": "p", "per_task": True},
                                                                {**merge, "merge": {"method": "bogus"}}])
    ok = ExperimentSpec(name="g", base="x", baseline="p", cells=[{"name": "p", "per_task": True},
                                                                 {**merge, "merge": {"method": "dare_ties"}}])
    assert [c.name for c in ok.expanded_cells()] == ["p", "m"]


def test_budget_and_keys():
    assert steps_for_budget(Budget(tokens=48000), 99, avg_tokens_per_row=150.0, rows_per_step=4) == 80
    assert steps_for_budget(Budget(tokens=48000), 99, avg_tokens_per_row=300.0, rows_per_step=4) == 40
    assert steps_for_budget(Budget(steps=7), 99, 1.0, 1) == 7 and steps_for_budget(None, 99, 1.0, 1) == 99
    cfg = load_config(REPO / "configs/train/smoke.yaml").model_dump()
    k = run_key(cfg, "fp1", "starter-kit")
    assert k == run_key({**cfg, "output_dir": "elsewhere"}, "fp1", "starter-kit")  # not part of the key
    assert k != run_key({**cfg, "seed": 1}, "fp1", "starter-kit") != run_key(cfg, "fp2", "starter-kit")



def test_options_added_later_leave_keys_of_finished_runs_alone():
    """A run finished before an option existed has no such field in its config; at the option's
    (behaviour-neutral) default the key is the same, so the runner does not train it again.
    Set to anything else, the option is part of the key."""
    from shoptune.train.config import KEY_NEUTRAL_DEFAULTS, TrainConfig

    # the written-out values are today's defaults (a changed default must be keyed, not dropped)
    assert {k: v for k, v in TrainConfig().model_dump().items() if k in KEY_NEUTRAL_DEFAULTS} == KEY_NEUTRAL_DEFAULTS
    # poly.router_lr (#33): keyed only where it changes training from what the option's absence meant
    poly = {**TrainConfig().model_dump()["poly"], "alpha": 16}
    old_poly = {k: v for k, v in poly.items() if k != "router_lr"}
    k_old = run_key({**load_config(REPO / "configs/train/smoke.yaml").model_dump(), "poly": old_poly}, "f", "s")
    assert run_key({**load_config(REPO / "configs/train/smoke.yaml").model_dump(),
                    "poly": {**poly, "router_lr": "scaled"}}, "f", "s") == k_old
    assert run_key({**load_config(REPO / "configs/train/smoke.yaml").model_dump(),
                    "poly": {**poly, "router_lr": "base"}}, "f", "s") != k_old
    cfg = load_config(REPO / "configs/train/smoke.yaml").model_dump()
    before = {k: v for k, v in cfg.items() if k not in KEY_NEUTRAL_DEFAULTS}
    assert run_key(cfg, "fp1", "starter-kit") == run_key(before, "fp1", "starter-kit")
    for change in ({"packing": True}, {"quantization": "nf4"}, {"peft": "poly"},
                   {"loss_balancing": "uncertainty"}, {"balance_lr": 0.1},
                   {"poly": {**cfg["poly"], "n_skills": cfg["poly"]["n_skills"] + 1}}):
        assert run_key({**cfg, **change}, "fp1", "starter-kit") != run_key(cfg, "fp1", "starter-kit"), change
    # a committed result from before packing/quantization/peft existed keeps its key (rank.yaml)
    old = json.loads((REPO / "docs/results/experiments/rank/cells/diverse-r32.s0.40c62ed6/result.json")
                     .read_text(encoding="utf-8"))
    assert not set(KEY_NEUTRAL_DEFAULTS) & set(old["config"])
    assert run_key(old["config"], old["suite"]["fingerprint"], "starter-kit") == old["key"]

def _fake_results(tmp_path, cells, seeds, baselines=None, rows=None):
    """An experiment results folder as the runner writes it, with hand-made question scores
    (``rows``: {(cell, seed): per-question rows}; default: random ones)."""
    rows = rows or {(c, s): make_rows(10 * i + s) for i, c in enumerate(cells) for s in seeds}
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


def _two_tasks(t1, t2):
    """Rows of two 2-question accuracy tasks: t1 (concept understanding), t2 (multilingual)."""
    return [{"id": f"{t}-{i}", "task_name": t, "capability": cap, "metric": "accuracy", "score": float(x)}
            for t, cap, xs in (("t1", "concept_understanding", t1), ("t2", "multilingual", t2))
            for i, x in enumerate(xs)]


def test_report_paired_difference_by_hand(tmp_path):
    """#33 item 7: the report's numbers against values worked out by hand, not against the
    functions it calls. base scores 0 everywhere (both seeds); more: t1 = [1, 0] in both seeds,
    t2 = [0, 0] in seed 0 and [1, 0] in seed 1. Per seed, all-around = mean of the two tracks:
    0.25 and 0.5, so the difference is 0.375 with seed diffs (+0.25, +0.50).
    Bootstrap: c1, c2 = how often t1's and t2's first question is drawn (0, 1, 2 with
    probabilities 1/4, 1/2, 1/4, the same draw for both seeds); the seed-mean all-around
    difference is c1/4 + c2/8, 0 and 0.75 each with probability 1/16 > 2.5%: CI [0, 0.75]
    exactly. Concept: c1/2, CI [0, 1]; multilingual: c2/4 (seed 0 adds 0), CI [0, 0.5].
    Permutation: flipping t1's first question flips both seeds' concept gain, flipping t2's
    flips seed 1's multilingual gain; |d*| = 0.375 exactly when both flips agree: p = 1/2
    (up to Monte Carlo error)."""
    zeros = _two_tasks([0, 0], [0, 0])
    rows = {("base", 0): zeros, ("base", 1): zeros,
            ("more", 0): _two_tasks([1, 0], [0, 0]), ("more", 1): _two_tasks([1, 0], [1, 0])}
    _fake_results(tmp_path, ["base", "more"], [0, 1], rows=rows)
    rep = write_report(tmp_path, seed=3)
    got = rep["cells"]["more"]["vs_baseline"]
    assert got["seeds"] == [0, 1] and "vs_baseline" not in rep["cells"]["base"]
    assert got["overall"]["diff"] == pytest.approx(0.375) and got["overall"]["seed_diffs"] == [0.25, 0.5]
    assert got["overall"]["ci95"] == [0.0, 0.75] and got["overall"]["borderline"] == []
    assert got["concept_understanding"]["ci95"] == [0.0, 1.0] and got["multilingual"]["ci95"] == [0.0, 0.5]
    assert got["overall"]["p"] == pytest.approx(0.5, abs=3 * got["overall"]["mc_error"]["p"])
    assert got["draws"]["bootstrap"] == 2000  # settled at once: the bounds' order statistics are 0 / 0.75
    scores = rep["cells"]["more"]["scores"]["overall"]
    assert scores["score"] == pytest.approx(0.375) and scores["seeds"] == [0.25, 0.5]
    md = (tmp_path / "report.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| more | +"))
    assert "+0.375 [+0.000, +0.750] p=0." in row and "(seeds +0.250, +0.500)" in row
    assert row.endswith("| not resolved (2 seeds) |")  # the CI touches 0
    assert "| more | 2,000 | " in md and "## Draws and Monte Carlo error" in md
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


def test_only_selects_runs_by_cell_or_cell_and_seed():
    runs = [{"cell": c, "seed": s} for c in ("narrow-r8", "diverse-r8", "diverse-r32") for s in (0, 1)]
    pick = lambda *only: [(r["cell"], r["seed"]) for r in runs if selected(r, list(only))]  # noqa: E731
    assert pick() == [(r["cell"], r["seed"]) for r in runs]
    assert pick("diverse-r32") == [("diverse-r32", 0), ("diverse-r32", 1)]
    assert pick("*.s1", "narrow-r8.s0") == [("narrow-r8", 0), ("narrow-r8", 1), ("diverse-r8", 1), ("diverse-r32", 1)]
    with pytest.raises(ValueError, match="no run matches.*narrow-r8.s0"):
        check_only({"runs": [{**r, "id": f"{r['cell']}.s{r['seed']}.abcd1234"} for r in runs]}, ["r8"])


def test_a_run_finished_by_another_experiment_is_reused_not_retrained(tmp_path):
    def result(exp, rid, key, fingerprint="f"):
        f = tmp_path / exp / "cells" / rid / "result.json"
        f.parent.mkdir(parents=True)
        f.write_text(json.dumps({"experiment": exp, "id": rid, "cell": rid.split(".")[0], "key": key,
                                 "suite": {"fingerprint": fingerprint}, "scores": {"overall": 0.25}}))
    result("capabilities", "cap1.s1.72c55465", "72c55465abcd")
    result("capabilities", "cap4.s1.bbe93ac8", "bbe93ac8ffff")  # same id prefix, another key
    result("other-suite", "x.s0.0000aaaa", "0000aaaa1111", fingerprint="g")
    exp = {"name": "rank", "suite": {"fingerprint": "f"}}
    runs = [{"id": "narrow-r16.s1.72c55465", "cell": "narrow-r16", "key": "72c55465abcd"},
            {"id": "diverse-r16.s1.bbe93ac8", "cell": "diverse-r16", "key": "bbe93ac8eeee"},
            {"id": "y.s0.0000aaaa", "cell": "y", "key": "0000aaaa1111"}]
    assert reuse_finished(tmp_path / "rank", exp, runs) == {
        "narrow-r16.s1.72c55465": "capabilities/cap1.s1.72c55465 @ unknown commit"}
    got = json.loads((tmp_path / "rank/cells/narrow-r16.s1.72c55465/result.json").read_text())
    assert got["experiment"] == "rank" and got["cell"] == "narrow-r16" and got["id"] == runs[0]["id"]
    assert got["reused_from"] == "capabilities/cap1.s1.72c55465" and got["scores"] == {"overall": 0.25}
    assert is_done(tmp_path / "rank", runs[0]) and not is_done(tmp_path / "rank", runs[1])
    assert reuse_finished(tmp_path / "rank", exp, runs[1:]) == {}  # another key; another suite


def test_report_contrast_by_hand(tmp_path):
    """#33 item 7: (d32 - d8) - (n32 - n8) by hand. The n8 and d8 runs score 0; n32 gets t1 =
    [1, 0]; d32 gets t1 = [1, 0] and t2 = [1, 0]. Gains (all-around = mean of the two tracks):
    narrow 0.25, diverse 0.5, contrast +0.25 in both seeds. With one draw of question indices
    shared by the four cells, the concept gains cancel in every resample (concept contrast
    [0, 0]) and the all-around contrast is c2/4 (c2 = how often t2's first question is drawn:
    0, 1, 2 with probabilities 1/4, 1/2, 1/4): CI [0, 0.5]. Independent draws per cell would not
    cancel."""
    zeros = _two_tasks([0, 0], [0, 0])
    runs = {"n8": zeros, "n32": _two_tasks([1, 0], [0, 0]), "d8": zeros, "d32": _two_tasks([1, 0], [1, 0])}
    cells = list(runs)
    _fake_results(tmp_path, cells, [0, 1], rows={(c, s): r for c, r in runs.items() for s in (0, 1)})
    exp = json.loads((tmp_path / "experiment.json").read_text())
    exp["contrasts"] = [{"name": "rank", "a": ["n8", "n32"], "b": ["d8", "d32"]}]
    (tmp_path / "experiment.json").write_text(json.dumps(exp))
    rep = write_report(tmp_path, seed=3)
    got = rep["contrasts"]["rank"]
    assert got["seeds"] == [0, 1] and got["a"] == ["n8", "n32"]
    ov = got["overall"]
    assert (ov["gain_a"], ov["gain_b"], ov["diff"]) == pytest.approx((0.25, 0.5, 0.25))
    assert ov["seed_diffs"] == [0.25, 0.25] and ov["ci95"] == [0.0, 0.5]
    assert got["concept_understanding"]["ci95"] == [0.0, 0.0] and got["multilingual"]["ci95"] == [0.0, 1.0]
    md = (tmp_path / "report.md").read_text()
    row = next(x for x in md.splitlines() if x.startswith("| rank | n8 -> n32 | d8 -> d32 |"))
    assert "+0.250 [+0.000, +0.500] (+0.250 vs +0.500; seeds +0.250, +0.250)" in row
    assert row.endswith("| not resolved (2 seeds) |")


def test_experiment_seeds_must_be_distinct_and_errors_name_the_line(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("name: e\nbase: configs/train/smoke.yaml\nbaseline: a\nseeds: [0, 0]\n"
                 "cells:\n  - {name: a, overrides: [lora.r=8]}\n  - {name: b, bogus: 1}\n")
    with pytest.raises(ValueError) as e:
        load_spec(p)
    assert str(e.value).splitlines() == [
        f"{p}:4: seeds: seed 0 is listed twice (each seed is one repetition of every cell) (got [0, 0])",
        f"{p}:7: cells.1.bogus: Extra inputs are not permitted (got 1)"]
    res = CliRunner().invoke(app, ["experiment", "run", str(p), "--out", str(tmp_path / "x"), "--dry-run"])
    assert res.exit_code == 1 and "seed 0 is listed twice" in res.output and "Traceback" not in res.output


def test_report_and_runner_flag_runs_trained_in_different_precisions(tmp_path):
    """bf16: auto follows the machine and is not in a run's key: a results folder whose runs
    trained on machines with and without native bf16 says so, and so does the runner before it
    trains the rest on a machine unlike the finished runs' one."""
    import io

    from rich.console import Console

    from shoptune.experiment.report import finished_results, precisions, run_precision
    from shoptune.experiment.runner import _warn_precision

    _fake_results(tmp_path, ["base", "more"], [0])
    amx = {"cpu": "x", "cores": 2, "avx512_bf16": True, "amx_bf16": True}
    avx2 = {"cpu": "y", "cores": 2, "avx512_bf16": False, "amx_bf16": False}
    assert run_precision({"config": {"bf16": "auto"}, "machine": amx}) == "bf16"
    assert run_precision({"config": {"bf16": "auto"}, "machine": avx2}) == "fp32"
    assert run_precision({"config": {"bf16": False}, "machine": amx}) == "fp32"
    assert run_precision({"config": {"bf16": "auto"}}) is None
    # what the run recorded wins over the machine's flags (torch decides bf16 on more than them)
    assert run_precision({"train": {"precision": "bf16"}, "config": {"bf16": "auto"}, "machine": avx2}) == "bf16"
    exp = json.loads((tmp_path / "experiment.json").read_text())
    for rid, m in (("base.s0.k", amx), ("more.s0.k", amx)):
        f = tmp_path / "cells" / rid / "result.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "config": {"bf16": "auto"}, "machine": m}))
    assert precisions(finished_results(tmp_path, exp)) == {"bf16": ["base.s0.k", "more.s0.k"]}
    # a merge trains nothing (its source counts); a stale result (another key) does not count
    assert precisions(finished_results(tmp_path, {**exp, "runs": [{**exp["runs"][0], "merge": {"method": "ties"}},
                                                                   {**exp["runs"][1], "key": "other"}]})) == {}
    write_report(tmp_path, n_boot=50, n_perm=50, seed=0)
    assert "different precisions" not in (tmp_path / "report.md").read_text()
    f = tmp_path / "cells" / "more.s0.k" / "result.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "machine": avx2}))
    write_report(tmp_path, n_boot=50, n_perm=50, seed=0)
    md = (tmp_path / "report.md").read_text()
    assert "runs trained in different precisions" in md and "fp32: more.s0.k" in md

    # the runner: a waiting run with bf16 pinned off, after runs that trained in bf16
    exp["base"] = str(REPO / "configs/train/smoke.yaml")
    out = io.StringIO()
    f.write_text(json.dumps({**json.loads(f.read_text()), "machine": amx}))
    _warn_precision(exp, tmp_path, [{"id": "x", "overrides": ["bf16=false"]}], Console(file=out, width=300))
    assert "this machine trains the rest in fp32" in out.getvalue()
    out = io.StringIO()
    _warn_precision(exp, tmp_path, [{"id": "x", "overrides": ["bf16=true"]}], Console(file=out, width=300))
    assert out.getvalue() == ""


def test_report_training_cost_per_cell(tmp_path, tmp_path_factory):
    """Trainable parameters and training tokens/s per cell in report.md; tokens/s is the median of
    a run's logging intervals (a paused interval does not pull it down)."""
    from shoptune.experiment.runner import step_tokens_per_s

    logs = tmp_path_factory.mktemp("train")
    (logs / "a").mkdir()
    (logs / "a" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "tokens_per_s": 400.0}, {"step": 20, "tokens_per_s": 12.0},  # paused here
        {"step": 30, "tokens_per_s": 410.0}, {"step": 30, "train_runtime": 9.0})) + "\n")
    (logs / "b").mkdir()
    (logs / "b" / "log.jsonl").write_text(json.dumps({"step": 5, "tokens_per_s": 420.0}) + "\nnot json\n")
    assert step_tokens_per_s(logs) == 405.0  # median of 400, 12, 410, 420 over both adapters
    assert step_tokens_per_s(logs / "none") is None

    _fake_results(tmp_path, ["base", "more"], [0, 1])
    for rid, params, rate in (("base.s0.k", 100, 400.0), ("base.s1.k", 100, 420.0),
                              ("more.s0.k", 250, None), ("more.s1.k", 250, 300.0)):
        f = tmp_path / "cells" / rid / "result.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "train": {
            "trainable_params": params, "tokens_seen": 1000, "tokens_per_s": rate}}))
    rep = write_report(tmp_path, n_boot=50, n_perm=50, seed=0)
    assert rep["cost"]["base"] == {"runs": 2, "trainable_params": 100, "tokens_seen": 1000,
                                   "tokens_per_s": 410.0, "tokens_per_s_runs": 2, "tokens_per_s_vs_ref": 1.0}
    assert rep["cost"]["more"]["tokens_per_s"] == 300.0 and rep["cost"]["more"]["tokens_per_s_runs"] == 1
    md = (tmp_path / "report.md").read_text()
    assert "| base | 100 | 1,000 | 410 (2) | 1.00 |" in md and "| more | 250 | 1,000 | 300 (1) | 0.73 |" in md
    assert rep["cost"]["more"]["tokens_per_s_vs_ref"] == round(300 / 410, 3)


def test_balance_trace_is_kept_in_the_result_and_summarised_per_cell(tmp_path, tmp_path_factory):
    """The groups' weights and gradient norms over training survive in result.json (runs/ may be
    gone) and the report tabulates and plots them; a step re-logged after a resume counts once."""
    from shoptune.experiment.runner import balance_trace

    train = tmp_path_factory.mktemp("train")
    assert balance_trace(train) is None  # no log
    (train / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "loss": 3.0, "balance/weight/a": 0.5, "balance/weight/b": 0.5,
         "balance/grad_norm/a": 1.0, "balance/grad_norm/b": 4.0},
        {"step": 20, "balance/weight/a": 0.9, "balance/weight/b": 0.1},  # killed after this ...
        {"step": 20, "balance/weight/a": 0.6, "balance/weight/b": 0.4,   # ... and re-logged on resume
         "balance/grad_norm/a": 3.0, "balance/grad_norm/b": 2.0},
        {"step": 20, "train_runtime": 5.0})) + "\nnot json\n")
    tr = balance_trace(train)
    assert tr == {"step": [10, 20], "weight": {"a": [0.5, 0.6], "b": [0.5, 0.4]},
                  "grad_norm": {"a": [1.0, 3.0], "b": [4.0, 2.0]}}
    (train / "log.jsonl").write_text(json.dumps({"step": 10, "loss": 3.0}) + "\n")
    assert balance_trace(train) is None  # static: nothing balanced, nothing kept

    _fake_results(tmp_path, ["base", "more"], [0, 1])
    # no grad norms; b absent from the last logged batch (upgrad weighs the groups present only)
    other = {"step": [10, 20, 30], "weight": {"a": [0.5, 0.8, 0.7], "b": [0.5, 0.2, None]}}
    for rid, trace in (("more.s0.k", tr), ("more.s1.k", other), ("base.s0.k", None)):
        f = tmp_path / "cells" / rid / "result.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "train": {"balance_trace": trace}}))
    rep = write_report(tmp_path, n_boot=50, n_perm=50, seed=0)
    assert list(rep["balancing"]) == ["more"]
    more = rep["balancing"]["more"]
    assert more["runs"] == 2
    # shares (weight / the step's mean weight), a: 1, 1.2 | 1, 1.6, 1 (alone at step 30);
    # b: 1, 0.8 | 1, 0.4. Off equal: 2 of the 4 steps with both groups.
    assert more["groups"]["a"] == {"final_weight": 0.65, "final_weight_runs": [0.6, 0.7],
                                   "median_grad_norm": 2.0, "share": 1.16}
    assert more["groups"]["b"] == {"final_weight": 0.3, "final_weight_runs": [0.4, 0.2],
                                   "median_grad_norm": 3.0, "share": 0.8}
    assert more["off_equal"] == 0.5
    assert more["trace"] == {"step": [10, 20], "weight": {"a": [0.5, 0.7], "b": [0.5, 0.3]}}
    md = (tmp_path / "report.md").read_text()
    assert "## Loss balancing" in md and "| more | a | 0.650 (0.600, 0.700) | 1.160 | 2 | 50% |" in md
    assert (tmp_path / "balance.png").stat().st_size > 0 and "balance.png" in md


def test_verdict_applies_the_findings_rule():
    """higher/lower only if the CI excludes 0 and every seed agrees; a seed against the CI's
    direction is called out; a CI across 0 or a missing one resolves nothing."""
    from shoptune.experiment.report import verdict
    assert verdict({"ci95": [0.01, 0.05], "seed_diffs": [0.02, 0.03, 0.04]}) == "**higher** (3 seeds)"
    assert verdict({"ci95": [-0.06, -0.01], "seed_diffs": [-0.02]}) == "**lower** (1 seed)"
    assert verdict({"ci95": [0.01, 0.05], "seed_diffs": [0.05, 0.04, -0.01]}) == \
        "CI above 0, not every seed agrees (3 seeds)"
    # findings.md: "not reproduced" for a claimed gain, whatever the seeds; inconclusive for a claimed loss
    assert verdict({"ci95": [-0.05, -0.01], "seed_diffs": [-0.05, 0.01]}) == \
        "CI below 0, not every seed agrees (2 seeds)"
    assert verdict({"ci95": [0.01, 0.05], "seed_diffs": [0.03, 0.0]}) == \
        "CI above 0, not every seed agrees (2 seeds)"  # a seed at exactly 0 has no sign
    assert verdict({"ci95": [-0.01, 0.05], "seed_diffs": [0.02, 0.03]}) == "not resolved (2 seeds)"
    assert verdict({"ci95": [0.0, 0.05], "seed_diffs": [0.02, 0.03]}) == "not resolved (2 seeds)"  # touches 0
    assert verdict({"ci95": None, "seed_diffs": [0.02]}) == "not resolved (1 seed)"
    assert verdict(None) == "-"
    # a bound still within Monte Carlo error of 0 at the draw cap: the draws would decide, so no verdict
    assert verdict({"ci95": [-0.057, -0.0004], "seed_diffs": [-0.04, -0.02], "borderline": ["upper"]}) == \
        "borderline: a CI bound is within Monte Carlo error of 0 (2 seeds)"
    assert verdict({"ci95": [-0.057, -0.0004], "seed_diffs": [-0.04, -0.02], "borderline": ["p"]}) == \
        "**lower** (2 seeds)"  # p's own line (0.05) is not the verdict's
    assert verdict({"ci95": [0.02, 0.02], "seed_diffs": [0.02, 0.02]}) == "not resolved (2 seeds)"  # zero width


def test_report_tables_carry_the_verdict(tmp_path):
    _fake_results(tmp_path, ["base", "more"], [0, 1])
    rep = write_report(tmp_path, n_boot=200, n_perm=50, seed=0)
    from shoptune.experiment.report import verdict
    v = verdict(rep["cells"]["more"]["vs_baseline"]["overall"])
    rows = [x for x in (tmp_path / "report.md").read_text().splitlines() if x.startswith("| more | ")]
    row = rows[1]  # the scores table's row, then the paired difference's
    assert row.endswith(f" | {v} |") and "(2 seeds)" in v
    # the verdict is the all-around column's: a different column's CI would give another one
    rep["cells"]["more"]["vs_baseline"]["overall"] = {**rep["cells"]["more"]["vs_baseline"]["overall"],
                                                      "ci95": [0.01, 0.02], "seed_diffs": [0.01, 0.02]}
    from shoptune.experiment.report import report_markdown
    rows = [x for x in report_markdown(rep).splitlines() if x.startswith("| more | ")]
    assert rows[1].endswith(" | **higher** (2 seeds) |")


def test_tokens_per_s_leaves_out_the_balancing_probe_and_is_relative_to_each_cells_reference(
        tmp_path, tmp_path_factory):
    """uncertainty's gradient-norm probe (cumulative ``balance/probe_s``) is diagnostics, not
    training: its seconds come out of the interval they fell in. A cell with its own reference
    is compared with that cell's throughput."""
    from shoptune.experiment.runner import step_tokens_per_s

    logs = tmp_path_factory.mktemp("train")
    (logs / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"step": 10, "tokens_per_s": 100.0, "num_input_tokens_seen": 1000, "balance/probe_s": 1.0},
        # 1000 tokens in 10 s, 2 of them probing: 125 tokens/s of training
        {"step": 20, "tokens_per_s": 100.0, "num_input_tokens_seen": 2000, "balance/probe_s": 3.0},
        # resumed: the probe clock restarts (0.5 s of probe in this interval of 2000 / 200 = 10 s)
        {"step": 30, "tokens_per_s": 200.0, "num_input_tokens_seen": 4000, "balance/probe_s": 0.5})) + "\n")
    assert step_tokens_per_s(logs) == 125.0  # median of 100 (first: no interval start), 125, 210.5

    _fake_results(tmp_path, ["base", "more", "other"], [0], baselines={"base": "base", "more": "base",
                                                                        "other": "more"})
    for rid, rate in (("base.s0.k", 400.0), ("more.s0.k", 200.0), ("other.s0.k", 300.0)):
        f = tmp_path / "cells" / rid / "result.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "train": {
            "trainable_params": 1, "tokens_seen": 1, "tokens_per_s": rate}}))
    cost = build_report(tmp_path, n_boot=20, n_perm=20)["cost"]
    assert cost["more"]["tokens_per_s_vs_ref"] == 0.5 and cost["other"]["tokens_per_s_vs_ref"] == 1.5
