"""benchmarks/xlora_cost.py end to end on a tiny model: every arm trains, reads and decodes, and
the numbers that decide whether X-LoRA fits the budget are the ones its docstring promises."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO, needs_shared


@needs_shared
def test_xlora_cost_smoke_on_a_tiny_model(tmp_path):
    from shoptune.serve.testing import make_tiny_model
    tiny = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "xlora.json"
    r = subprocess.run([sys.executable, "benchmarks/xlora_cost.py", "--model", str(tiny), "--steps", "4",
                        "--batch-size", "2", "--max-length", "64", "--prompts", "1", "--new-tokens", "3",
                        "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    arms = res["arms"]
    assert set(arms) == {"lora-r32", "poly", "xlora", "xlora-frozen"}
    assert arms["lora-r32"]["train_ratio"] == arms["lora-r32"]["generate_ratio"] == 1.0
    for arm in arms.values():
        assert arm["train"]["steps_timed"] == 2 and arm["train"]["tokens_per_s"] > 0
        assert arm["forward"]["tokens_per_s"] > 0 and arm["generate"]["tokens_per_s"] > 0
        assert len(arm["train"]["losses"]) == 4
    # X-LoRA's own recipe trains the gate only: one linear layer (peft's default depth 1, with
    # bias), hidden -> one expert per capability
    from shoptune.records import CAPABILITIES
    n, hidden = len(CAPABILITIES), json.loads((tiny / "config.json").read_text())["hidden_size"]
    gate = hidden * n + n
    assert arms["xlora-frozen"]["trainable_params"] == gate
    # trainable experts: n LoRAs of r=8 (r=32's parameters for n=4), plus the gate
    assert arms["xlora"]["trainable_params"] == arms["lora-r32"]["trainable_params"] * 8 * n // 32 + gate
    # read back from generate's output: X-LoRA decodes without a KV cache, the others with one
    assert arms["xlora"]["generate"]["use_cache"] is False
    assert arms["lora-r32"]["generate"]["use_cache"] is True and arms["poly"]["generate"]["use_cache"] is True
    assert res["rows"] == 8 and res["precision"] in ("bf16", "fp32")
