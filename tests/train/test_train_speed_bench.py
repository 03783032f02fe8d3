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


def test_compile_time_is_what_compiling_steps_took_beyond_a_steady_step(monkeypatch):
    """A compiled arm's steps that built graphs are not timed; what they took beyond the steady
    time per computed token is its compile time (hand-worked: steps 0 and 3 compile)."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters
    ts = _bench()
    durations, compiles = [10.0, 1.0, 1.0, 5.5, 1.0, 2.0], [True, False, False, True, False, False]
    widths = [25, 25, 25, 25, 25, 50]  # batches of 4 rows: step 5 computes twice the tokens
    now = [0.0]
    monkeypatch.setattr(ts, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    class FakeTrainer:
        def __init__(self):
            self.callbacks, self.data_collator = [], lambda f: f

        def add_callback(self, cb):
            self.callbacks.append(cb)

        def train(self):
            for cb in self.callbacks:
                cb.on_train_begin(None, None, None)
            for d, c, w in zip(durations, compiles, widths):
                mask = torch.ones(4, w, dtype=torch.long)
                mask[0, -5:] = 0  # 5 pad tokens per batch
                self.data_collator({"input_ids": mask, "attention_mask": mask, "labels": torch.zeros_like(mask)})
                now[0] += d
                counters["stats"]["unique_graphs"] += int(c)
                for cb in self.callbacks:
                    cb.on_step_end(None, None, None)

    r = ts.measure(FakeTrainer())
    assert r["timed_steps"] == [2, 4, 5] and r["compile_steps"] == [0, 3]
    assert r["seconds"] == 4.0 and r["non_pad_tokens"] == 95 + 95 + 195
    # steady: 4 s for 100 + 100 + 200 computed tokens = 0.01 s/token; compiling steps computed 100 each
    assert r["compile_s"] == (10.0 - 1.0) + (5.5 - 1.0)
    assert r["step_s"] == round(4.0 / 3, 3)
