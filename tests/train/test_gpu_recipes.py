"""The GPU recipes (configs/train/gpu/) dry-run on CPU: the whole recipe -- mixture, the model with
its quantization/packing/checkpointing settings, the trainer -- up to and through the first step,
on a randomly initialised tiny Qwen2 (the 7B's architecture: GQA, qkv bias, untied head) instead
of the 7B weights. Only the data size and the model are overridden."""
import json

import pytest
import torch

from shoptune.train.config import load_config
from tests.conftest import REPO, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from shoptune.models import load_tokenizer
    d = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=False,
                      max_position_embeddings=1024)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    load_tokenizer("smollm2-135m").save_pretrained(d)  # a ChatML tokenizer (the recipes use protocol: chat)
    return d


@pytest.mark.parametrize("recipe", ["qwen2.5-7b-qlora.yaml", "qwen2.5-7b-lora.yaml"])
def test_gpu_recipe_dry_run_on_a_random_tiny_qwen2(tmp_path, tiny_qwen2, recipe):
    if "qlora" in recipe:
        pytest.importorskip("bitsandbytes")
    from shoptune.train.recipe import main
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs/train/gpu" / recipe,
                      [f"model={tiny_qwen2}", f"output_dir={out}", "mixture.total=8", "mixture.max_per_task=8",
                       "mixture.decontaminate_against=[]", "max_steps=1", "batch_size=4", "report_to=[]",
                       "logging_steps=1"])
    full = load_config(REPO / "configs/train/gpu" / recipe)
    for field in ("quantization", "packing", "gradient_checkpointing", "bf16", "lora", "max_length", "protocol"):
        assert getattr(cfg, field) == getattr(full, field)  # everything but data size and model as shipped
    res = main(cfg)
    assert res["metrics"]["steps"] == 1 and torch.isfinite(torch.tensor(res["metrics"]["final_loss"]))
    from safetensors.torch import load_file
    w = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(w) == 2 * 7 * 2  # LoRA A and B on 7 Linear layers x 2 layers
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["quantization"] == full.quantization and run["config"]["packing"] is True
