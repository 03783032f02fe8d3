"""benchmarks/train_speed.py's honest ceiling: the matmuls it times are exactly one LoRA step's,
and the profile split puts each op in the right part (the optimizer's element-wise ops count as
optimizer, not as norm+act)."""
import importlib.util

import torch

from shoptune.train.plan import load_arch, lora_params
from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_gemms_are_one_lora_steps_matmuls():
    ts = _bench()
    arch = load_arch("smollm2-135m")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tokens, answers, r = 100, 7, 16
    flops = sum(2 * m * k * n * c for (m, k, n), c in ts.step_gemms(arch, tokens, answers, r, targets).items())
    base = 4 * tokens * arch.params()["linear"]          # forward + backward to the input, frozen
    lora = 3 * 2 * tokens * lora_params(arch, r, targets)  # forward, input grad, weight grad
    head = 4 * answers * arch.vocab * arch.hidden         # LM head at the answer positions only
    assert flops == base + lora + head


def test_step_split_parts():
    ts = _bench()
    from torch.profiler import ProfilerActivity, profile
    x, w = torch.randn(32, 32, requires_grad=True), torch.randn(32, 32)
    opt = torch.optim.AdamW([x])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.silu(x @ w).sum().backward()
        opt.step()
    parts = {}
    for ev in prof.events():
        parts.setdefault(ev.name, set()).add(ts.part_of(ev))
    assert parts["aten::mm"] == {"matmul"} and parts["aten::silu"] == {"norm+act"}
    assert "optimizer" in parts["aten::mul_"] and "norm+act" not in parts["aten::mul_"]
