"""A per-task cell (arXiv 2411.03644's single-task arm): one adapter per task of the cell's
mixture, the budget split by each task's share, and each suite question answered by its task's
adapter — the rest by the base model. Training runs under a launcher (the GPU path's
`accelerate launch`), here a recording wrapper around this interpreter."""
import json
import sys

import pytest
import yaml

from shoptune.experiment.runner import plan, run_one
from tests.conftest import REPO, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]

TASKS = ["ecguide_qprp", "ecguide_sa"]
SPEC = {
    "name": "pertask", "base": str(REPO / "configs/train/smoke.yaml"), "seeds": [0],
    "overrides": ["mixture.total=12", f"mixture.include_tasks={json.dumps(TASKS)}", "batch_size=2",
                  "max_length=128", "report_to=[]", "logging_steps=1", "save_steps=100",
                  "warmup_ratio=0.0", "learning_rate=0.002", "lora.r=4"],
    "budget": {"steps": 6}, "baseline": "one",
    "cells": [{"name": "one"}, {"name": "per-task", "per_task": True}],
}


def test_per_task_cell_trains_one_adapter_per_task_and_routes_questions(tmp_path, micro_suite):
    spec = tmp_path / "pertask.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "suite": str(micro_suite)}))
    out, res = tmp_path / "out", tmp_path / "res"
    # training under a launcher (as `accelerate launch ...` on a GPU machine): a wrapper that
    # records its arguments, then runs them with this interpreter
    calls = tmp_path / "launched.txt"
    launcher = tmp_path / "launch.sh"
    launcher.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {sys.executable} "$@"\n')
    launcher.chmod(0o755)
    exp = plan(spec, out, res, launcher=str(launcher))
    one, per = exp["runs"]
    assert "per_task" not in one and one["max_steps"] == 6
    assert per["key"] != one["key"]  # same config, but a different kind of run
    assert sorted(per["per_task"]) == TASKS
    rows = {t: i["rows"] for t, i in per["per_task"].items()}
    assert sum(rows.values()) == 12
    # the 6 steps are split by each task's share of the mixture's rows
    assert {t: i["max_steps"] for t, i in per["per_task"].items()} == {t: max(1, round(6 * n / 12)) for t, n in rows.items()}

    result = run_one(out / "plan.json", per["id"])
    train = out / "cells" / per["id"] / "train"
    for t in TASKS:  # each adapter saw its own task only, for its own steps
        run = json.loads((train / t / "run.json").read_text())
        assert run["mixture"]["tasks"] == {t: rows[t]}
        assert run["metrics"]["steps"] == per["per_task"][t]["max_steps"]
        assert (train / t / "adapter" / "adapter_model.safetensors").exists()
    launched = calls.read_text().splitlines()
    assert len(launched) == len(TASKS) and all(c.startswith("-m shoptune.train.recipe ") for c in launched)
    assert result["train"]["steps"] == sum(i["max_steps"] for i in per["per_task"].values())
    assert set(result["train"]["per_task"]) == set(TASKS)
    scores = json.loads((out / "cells" / per["id"] / "eval" / "scores.json").read_text())
    assert scores["task_adapters"] == {t: str(train / t / "adapter") for t in TASKS}
    assert len(result["per_question"]["score"]) == result["suite"]["n_questions"]
    # a re-run trains nothing: every adapter is finished
    mtimes = {t: (train / t / "run.json").stat().st_mtime_ns for t in TASKS}
    run_one(out / "plan.json", per["id"])
    assert {t: (train / t / "run.json").stat().st_mtime_ns for t in TASKS} == mtimes


def test_per_task_cell_refuses_a_curriculum(tmp_path):
    bad = {**SPEC, "cells": [{"name": "one"}, {"name": "x", "per_task": True, "overrides": ["curriculum=three-stage"]}]}
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="per_task/per_capability train one plain LoRA per group"):
        plan(spec, tmp_path / "out", tmp_path / "res")
