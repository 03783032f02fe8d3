"""A real 2-cell experiment on the embedded model and a 5-question suite: killed with SIGKILL in the
middle of the second cell, re-run: the finished cell is skipped, the killed one resumes from its
checkpoint, and the report's paired CI equals a direct computation from the eval predictions."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from shoptune import machine
from shoptune.eval.paired import paired_compare
from tests.conftest import REPO, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]

SPEC = {
    "name": "tiny2", "base": str(REPO / "configs/train/smoke.yaml"), "seeds": [0],
    "overrides": ["mixture.total=16", "mixture.include_tasks=[ecguide_sa,ecguide_qprp]", "batch_size=4",
                  "max_length=128", "report_to=[]", "logging_steps=1", "save_steps=2",
                  "save_total_limit=5", "warmup_ratio=0.0", "learning_rate=0.002", "lora.r=4"],
    "budget": {"steps": 6}, "baseline": "a",
    "cells": [{"name": "a"}, {"name": "b", "overrides": ["lora.r=8", "lora.alpha=16"]}],
}


def start(spec, out, res):
    cmd = [sys.executable, "-m", "shoptune.cli", "experiment", "run", str(spec), "--out", str(out),
           "--results", str(res)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "COLUMNS": "200"})


def test_experiment_killed_resumes_skips_finished_and_reports(tmp_path, micro_suite):
    spec = tmp_path / "tiny2.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "suite": str(micro_suite)}))
    out, res = tmp_path / "out", tmp_path / "res"
    proc = start(spec, out, res)
    deadline = time.time() + 900
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        done_a = list(res.glob("cells/a.s0.*/result.json"))
        ckpt_b = list(out.glob("cells/b.s0.*/train/checkpoint-2/COMPLETE"))
        if done_a and ckpt_b:
            break
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    assert not list(res.glob("cells/b.s0.*/result.json"))
    a_result = done_a[0].read_bytes()
    a_mtime = done_a[0].stat().st_mtime_ns

    proc = start(spec, out, res)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "2 runs: 1 already done, 1 finished now, 0 failed" in " ".join(log.split())
    assert done_a[0].read_bytes() == a_result and done_a[0].stat().st_mtime_ns == a_mtime  # skipped
    (b_file,) = res.glob("cells/b.s0.*/result.json")
    b = json.loads(b_file.read_text())
    assert b["train"]["resumed_from"] is not None and b["train"]["resumed_from"].startswith("checkpoint-"), b["train"]
    assert int(b["train"]["resumed_from"].split("-")[1]) >= 2 and b["train"]["steps"] == 6
    assert b["config"]["lora"]["r"] == 8 and f"suite:{micro_suite}" in b["config"]["mixture"]["decontaminate_against"]
    assert b_file.stat().st_size < 60_000  # small enough to commit
    assert b["machine"] == machine.describe()  # every result names the machine it ran on

    # the report (written at the end of the run) vs a direct computation from the predictions
    rows = {c: [json.loads(x) for x in next(out.glob(f"cells/{c}.s0.*/eval/predictions.jsonl")).read_text().splitlines()]
            for c in ("a", "b")}
    direct = paired_compare([rows["a"]], [rows["b"]])
    rep = json.loads((res / "results.json").read_text())
    got = rep["cells"]["b"]["vs_baseline"]
    for col in ("overall", "overall_tasks"):
        assert got[col]["diff"] == pytest.approx(direct[col]["diff"], abs=1e-5)
        assert got[col]["ci95"] == pytest.approx(direct[col]["ci95"], abs=1e-5)
    assert (res / "report.md").exists() and (res / "diff.png").exists()
    assert f"Machines: {machine.summary()} (2 runs)" in (res / "report.md").read_text()
    # a third run has nothing to do
    proc = start(spec, out, res)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and "2 already done, 0 finished now" in " ".join(log.split())
