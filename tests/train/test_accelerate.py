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


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama (2 layers, 64 wide) with the embedded model's tokenizer: the sharded
    launches test the sharding, not the 135M model's speed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shoptune.models import load_tokenizer
    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True)).save_pretrained(d)
    load_tokenizer("smollm2-135m").save_pretrained(d)
    return d


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


def test_fsdp_config_shards_on_two_cpu_processes_and_saves_the_gathered_adapter(tmp_path, tiny_model):
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
    overrides = [f"model={tiny_model}", f"output_dir={out}", "max_steps=2", "mixture.total=16", "logging_steps=1", "report_to=[]",
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
    assert ours.keys() == theirs.keys() and len(ours) == 2 * 7 * 2
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(v.abs().sum() > 0 for k, v in ours.items() if "lora_B" in k)  # trained (B starts at 0)
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (out / "adapter", single))
    assert set(a.pop("target_modules")) == set(b.pop("target_modules"))  # a set, saved in hash order
    assert a == b


def test_deepspeed_zero2_config_runs_on_two_cpu_processes(tmp_path, tiny_model):
    """configs/accelerate/deepspeed_zero2.yaml on 2 CPU processes (DeepSpeed's CPU accelerator,
    gloo): the optimizer state is partitioned across the two processes (ZeRO-2), and the adapter
    saved equals the LoRA weights in DeepSpeed's own checkpoint of the model."""
    pytest.importorskip("deepspeed")
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "zero2"
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "configs/accelerate/deepspeed_zero2.yaml"),
           "--num_processes", "2", "--mixed_precision", "no",
           "-m", "shoptune.train.recipe", str(REPO / "configs/train/smoke.yaml"), f"output_dir={out}",
           f"model={tiny_model}", "max_steps=2", "mixture.total=16", "logging_steps=1", "report_to=[]",
           "batch_size=2", "bf16=false", "save_steps=2", "warmup_ratio=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["metrics"]["steps"] == 2
    step = out / "checkpoint-2" / "global_step2"
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    n_lora = sum(v.numel() for v in adapter.values())
    parts = [torch.load(step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             ["optimizer_state_dict"] for r in (0, 1)]
    assert all(o["zero_stage"] == 2 and o["partition_count"] == [2] for o in parts)
    sizes = [sum(t.numel() for t in o["single_partition_of_fp32_groups"]) for o in parts]
    assert sizes[0] < n_lora and sum(sizes) - n_lora < 64  # half each (plus alignment padding)
    module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert adapter.keys() and all(torch.equal(v, module[k.replace(".weight", ".default.weight")])
                                  for k, v in adapter.items())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
