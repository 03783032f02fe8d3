"""`accelerate launch` runs the unchanged recipe on two processes (gloo DDP on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]


def test_two_process_accelerate_launch_trains_and_saves_one_adapter(tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/ddp_cpu.yaml"),
           "-m", "shoptune.train.recipe", str(REPO / "configs/train/smoke.yaml"), f"output_dir={out}",
           "max_steps=2", "mixture.total=16", "logging_steps=1", "report_to=[]", "batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["metrics"]["steps"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in row for row in log)
    # 2 steps x 2 processes x 2 rows = 8 of the 16 rows: each process drew its own shard
    # (one process would have seen 4 rows, epoch 0.25)
    assert [row["epoch"] for row in log if "epoch" in row][-1] == pytest.approx(0.5)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    from peft import PeftModel

    from shoptune.models import load
    base, _ = load("smollm2-135m")
    PeftModel.from_pretrained(base, str(out / "adapter"))  # a plain peft folder
