"""`accelerate launch` runs the unchanged recipe on two processes: gloo DDP on CPU, and the FSDP
config (FSDP2 over gloo; accelerate alone would fall back to DDP on CPU, see train/sharded.py)."""
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


def test_fsdp_config_shards_on_two_cpu_processes_and_saves_the_gathered_adapter(tmp_path):
    """configs/accelerate/fsdp.yaml (FSDP2, sharded state dict) on 2 CPU processes: the model is
    really sharded (the checkpoint holds one DCP shard per process, not a DDP adapter file), and
    the adapter saved at the end equals what one process saves from the same weights gathered
    from those shards."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import torch

    from shoptune.train.config import load_config
    from shoptune.train.trainer import build_model, save_adapter

    out = tmp_path / "fsdp"
    accelerate = Path(sys.executable).with_name("accelerate")
    overrides = [f"output_dir={out}", "max_steps=2", "mixture.total=16", "logging_steps=1", "report_to=[]",
                 "batch_size=2", "bf16=false", "save_steps=2"]
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no",  # the file says 8 GPUs in bf16
           "-m", "shoptune.train.recipe", str(REPO / "configs/train/smoke.yaml"), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["metrics"]["steps"] == 2
    ckpt = out / "checkpoint-2"
    assert sorted(x.name for x in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "adapter_model.safetensors").exists()  # what DDP would have written
    # one process: gather the sharded checkpoint, load it into the same LoRA model, save it
    dcp_to_torch_save(ckpt / "pytorch_model_fsdp_0", tmp_path / "gathered.pt")
    gathered = torch.load(tmp_path / "gathered.pt")["model"]
    cfg = load_config(REPO / "configs/train/smoke.yaml", overrides)
    model, _ = build_model(cfg.model, cfg.lora)
    result = set_peft_model_state_dict(model, gathered)
    assert not result.unexpected_keys
    single = save_adapter(model, tmp_path / "single")
    ours, theirs = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and len(ours) == 30 * 7 * 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(v.abs().sum() > 0 for k, v in ours.items() if "lora_B" in k)  # trained (B starts at 0)
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (out / "adapter", single))
    assert set(a.pop("target_modules")) == set(b.pop("target_modules"))  # a set, saved in hash order
    assert a == b
