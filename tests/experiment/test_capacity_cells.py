"""The capacity experiment's cell kinds (#22) through the runner: Poly experts routed per task,
one LoRA per capability routed by capability, and their TIES merge (no training of its own)."""
import json

import pytest
import yaml

from shoptune.experiment.runner import plan, run_one
from tests.conftest import REPO, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]

TASKS = ["ecguide_qprp", "ecguide_sa", "ecguide_ner"]  # behaviour, concept understanding (x2)
SPEC = {
    "name": "capacity-tiny", "base": str(REPO / "configs/train/smoke.yaml"), "seeds": [0],
    "overrides": ["mixture.total=12", f"mixture.include_tasks={json.dumps(TASKS)}", "batch_size=2",
                  "max_length=128", "report_to=[]", "logging_steps=1", "save_steps=100",
                  "warmup_ratio=0.0", "learning_rate=0.002", "lora.r=4"],
    "budget": {"steps": 4}, "baseline": "lora",
    "cells": [{"name": "lora"},
              {"name": "poly", "overrides": ["peft=poly", "poly.n_skills=2", "lora.r=2"]},
              {"name": "per-cap", "per_capability": True},
              {"name": "per-cap-ties", "merge_of": "per-cap", "merge": {"method": "ties", "density": 0.5}},
              {"name": "uncertainty", "overrides": ["loss_balancing=uncertainty", "balance_lr=0.1"]}],
}


def test_poly_per_capability_and_merge_cells_train_route_and_score(tmp_path, micro_suite):
    spec = tmp_path / "capacity.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "suite": str(micro_suite)}))
    out, res = tmp_path / "out", tmp_path / "res"
    exp = plan(spec, out, res, eval_dtype="fp32")
    lora, poly, percap, ties, unc = exp["runs"]
    assert exp["eval"] == {"engine": "builtin", "dtype": "fp32"}
    assert len({r["key"] for r in exp["runs"]}) == 5
    assert sorted(percap["per_task"]) == ["concept_understanding", "user_behavior_alignment"]
    assert ties["merge_of"] == percap["id"] and ties["max_steps"] == 0
    # the eval settings are part of the key (not when they are the defaults: old keys stay)
    cfg = json.loads((res / "experiment.json").read_text())["runs"][0]
    from shoptune.experiment.spec import EvalSettings, run_key
    keys = {run_key({"x": 1}, "f", "p", eval_settings=EvalSettings(**e).in_key())
            for e in ({}, {"dtype": "fp32"}, {"engine": "vllm", "dtype": "fp32"})}
    assert len(keys) == 3 and run_key({"x": 1}, "f", "p") in keys and cfg["id"] == lora["id"]

    r_poly = run_one(out / "plan.json", poly["id"])
    sc = json.loads((out / "cells" / poly["id"] / "eval" / "scores.json").read_text())
    experts = out / "cells" / poly["id"] / "train" / "experts"
    assert sc["engine"]["dtype"] == "float32" and sc["task_adapters"]
    assert sc["task_adapters"]["ecguide_sa"] == str(experts / "ecguide_sa")
    assert sc["task_adapters"]["shopbench_task2"] == str(experts / "concept_understanding")
    assert r_poly["train"]["trainable_params"] > 0

    r_cap = run_one(out / "plan.json", percap["id"])
    sc = json.loads((out / "cells" / percap["id"] / "eval" / "scores.json").read_text())
    train = out / "cells" / percap["id"] / "train"
    assert sc["task_adapters"]["shopbench_task2"] == str(train / "concept_understanding" / "adapter")
    assert sc["task_adapters"]["ecguide_qprp"] == str(train / "user_behavior_alignment" / "adapter")
    assert set(r_cap["train"]["per_task"]) == {"concept_understanding", "user_behavior_alignment"}

    r_ties = run_one(out / "plan.json", ties["id"])
    merged = out / "cells" / ties["id"] / "train" / "adapter"
    assert json.loads((merged / "merge.json").read_text())["method"] == "ties"
    assert r_ties["train"]["merged_from"] == percap["id"] and r_ties["train"]["steps"] == r_cap["train"]["steps"]
    sc = json.loads((out / "cells" / ties["id"] / "eval" / "scores.json").read_text())
    assert sc["adapter"] == str(merged) and not sc["task_adapters"]
    assert len(r_ties["per_question"]["score"]) == r_ties["suite"]["n_questions"]

    # a loss-balanced run keeps its groups' weights and gradient norms over training in result.json
    r_unc = run_one(out / "plan.json", unc["id"])
    tr = r_unc["train"]["balance_trace"]
    groups = {"concept_understanding", "user_behavior_alignment"}
    assert tr["step"] == [1, 2, 3, 4] and set(tr["weight"]) == groups and set(tr["grad_norm"]) == groups
    assert tr["weight"]["concept_understanding"][0] != tr["weight"]["concept_understanding"][-1]  # learned
    assert r_poly["train"]["balance_trace"] is None and r_ties["train"]["balance_trace"] is None

    # benchmarks/expert_fallback.py: the Poly run re-scored with an all-tasks expert for the
    # multilingual question (no multilingual task was trained), paired with its own scores
    import importlib.util
    spec_ = importlib.util.spec_from_file_location("expert_fallback", REPO / "benchmarks/expert_fallback.py")
    fb = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(fb)
    res = fb.main(["--exp", str(out), "--cell", "poly", "--reference", "uncertainty", "--out", str(tmp_path / "fb.json")])
    assert res["questions_to_all_tasks_expert"] == {poly["id"]: 1}
    sc = json.loads((out / "fallback" / poly["id"] / "eval" / "scores.json").read_text())
    assert sc["task_adapters"]["shopbench_task16"] == str(out / "fallback" / poly["id"] / "experts" / "all-tasks")
    assert sc["task_adapters"]["ecguide_sa"] == str(out / "fallback" / poly["id"] / "experts" / "ecguide_sa")
    same = res["mean_vs_own"]["capabilities"]
    assert same["concept_understanding"]["diff"] == 0 and same["user_behavior_alignment"]["diff"] == 0  # MC only: exact
    assert res["own_vs_reference"]["overall"]["b"] == pytest.approx(r_poly["scores"]["overall"], abs=1e-9)
    assert json.loads((tmp_path / "fb.json").read_text())["cell"] == "poly"
    # a re-run reuses the evaluation these experts produced; one made with other routes is redone
    args = ["--exp", str(out), "--cell", "poly", "--reference", "uncertainty", "--out", str(tmp_path / "fb2.json")]
    scores = out / "fallback" / poly["id"] / "eval" / "scores.json"
    mtime = scores.stat().st_mtime_ns
    assert fb.main(args)["mean_vs_own"] == res["mean_vs_own"] and scores.stat().st_mtime_ns == mtime
    stale = json.loads(scores.read_text())
    stale["task_adapters"].pop("shopbench_task16")
    scores.write_text(json.dumps(stale))
    assert fb.main(args)["questions_to_all_tasks_expert"] == {poly["id"]: 1}
    assert "shopbench_task16" in json.loads(scores.read_text())["task_adapters"]
    with pytest.raises(SystemExit):  # not a Poly cell: a one-line error, no traceback
        fb.main(["--exp", str(out), "--cell", "uncertainty", "--reference", "poly", "--out", str(tmp_path / "x.json")])
