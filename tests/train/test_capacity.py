"""Capacity methods on the embedded model (#22): Poly (task-routed LoRA experts) and loss
balancing train, change only what they should, export exact experts, and resume exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from shoptune.train.recipe import main
from tests.conftest import REPO, needs_shared
from tests.train.test_recipe import TINY, tiny

pytestmark = [pytest.mark.slow, needs_shared]
POLY = ["peft=poly", "poly.n_skills=2", "poly.n_splits=2", "lora.r=4"]


def test_poly_learns_only_its_adapter_and_exports_experts_per_task(tmp_path):
    res = main(tiny(tmp_path, "max_steps=6", *POLY))
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in log if "loss" in x]
    assert losses[-1] < losses[0]
    w = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert w and all(".poly_" in k for k in w)  # nothing of the base model is saved or trained
    logits = [v for k, v in w.items() if k.endswith("module_logits")]
    assert any(v.abs().max() > 1e-3 for v in logits)  # the routing learned (init: uniform +-1e-3)
    assert all(v.abs().sum() > 0 for k, v in w.items() if k.endswith("poly_lora_B"))
    routing = json.loads((tmp_path / "adapter" / "routing.json").read_text())
    assert routing["route_by"] == "task" and routing["routes"] == sorted(res["mixture"]["tasks"])
    # LoRA r=8 on the same modules has the same trainable size as 2 skills of r=4 (+ the routers)
    lora8 = 2442240
    assert lora8 < res["trainable_params"] < lora8 * 1.01
    from typer.testing import CliRunner

    from shoptune.cli import app
    r = CliRunner().invoke(app, ["export", "experts", str(tmp_path), "--out", str(tmp_path / "experts")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "experts" / "experts.json").read_text())
    assert set(routing["routes"]) <= set(meta["experts"])
    assert meta["task_experts"]["ecguide_sa"] == "ecguide_sa"
    assert meta["task_experts"]["shopbench_task2"] == "concept_understanding"  # unseen: its capability


def _run(out, *extra):
    cmd = [sys.executable, "-m", "shoptune.train.recipe", str(REPO / "configs/train/smoke.yaml"),
           *TINY, f"output_dir={out}", "max_steps=8", "save_steps=2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_poly_with_uncertainty_balancing_resumes_exactly_after_sigkill(tmp_path):
    extra = [*POLY, "loss_balancing=uncertainty", "balance_lr=0.05"]
    ref = _run(tmp_path / "ref", *extra)
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-3000:]
    victim = _run(tmp_path / "cut", *extra)
    deadline = time.time() + 600
    while not (tmp_path / "cut" / "checkpoint-4" / "COMPLETE").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before checkpoint-4"
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    resumed = _run(tmp_path / "cut", *extra, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    a = load_file(tmp_path / "ref" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "run.json").read_text()) for d in ("ref", "cut"))
    timing = lambda b: {k: v for k, v in b.items() if k != "balance/probe_s"}  # wall-clock, not state
    assert timing(ra["balancing"]) == timing(rb["balancing"])
    assert ra["balancing"]["log_vars"] != [0.0] * len(ra["balancing"]["log_vars"])  # it learned
    la, lb = ((tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("ref", "cut"))

    def kept(rows):  # each logged step's loss and group weights (timings differ, of course)
        return [{k: v for k, v in json.loads(x).items() if k == "loss" or k.startswith("balance/weight")}
                for x in rows if '"loss"' in x]
    assert kept(la) == kept(lb) and len(kept(la)) == 8


def test_poly_alpha_is_loras_scale_through_the_equivalent_reparametrisation():
    """peft's Poly scales by 1/r; poly.alpha = 16 at r = 8 (LoRA's alpha/r = 2) initialises A x4
    and trains the skills at 4x the learning rate, the router at 1x (tests/train/test_poly_alpha.py
    checks the trajectory)."""
    from shoptune.train.config import load_config
    from shoptune.train.trainer import build_model, effective_learning_rate, skill_lr_scale
    plain = load_config(REPO / "configs/train/smoke.yaml", ["peft=poly", "lora.r=8", "poly.n_skills=2"])
    scaled = load_config(REPO / "configs/train/smoke.yaml", ["peft=poly", "lora.r=8", "poly.n_skills=2",
                                                              "poly.alpha=16"])
    assert effective_learning_rate(scaled) == effective_learning_rate(plain)  # router: 1x (#33)
    assert skill_lr_scale(scaled) == 4 and skill_lr_scale(plain) is None  # skills: 4x
    old = scaled.model_copy(update={"poly": scaled.poly.model_copy(update={"router_lr": "scaled"})})
    assert effective_learning_rate(old) == pytest.approx(4 * effective_learning_rate(plain))
    weights = []
    for cfg in (plain, scaled):
        torch.manual_seed(0)
        model, _ = build_model(cfg.model, cfg.lora, peft="poly", poly=cfg.poly, n_routes=3)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "poly_lora_A" in n})
    assert weights[0] and all(torch.allclose(weights[1][n], 4 * weights[0][n]) for n in weights[0])
