"""`shoptune export gguf` (llama.cpp's own converters) and, when a built `llama-server` exists,
its outputs served next to transformers and behind the gateway.

Needs the llama.cpp source (`make llama-cpp-source`, ~1 min, or $SHOPTUNE_LLAMA_CPP_DIR); the
llama-server tests need the binary (`make llama-server`, or $SHOPTUNE_LLAMA_SERVER)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from shoptune.serve.gguf import ExportError, export_gguf, llama_cpp_dir, llama_server_path
from shoptune.serve.testing import LlamaServerProcess, make_tiny_lora, make_tiny_model


def _have_source() -> bool:
    try:
        llama_cpp_dir(fetch=False)
        return True
    except ExportError:
        return False


needs_source = pytest.mark.skipif(not _have_source(), reason="no llama.cpp source: run "
                                  "`make llama-cpp-source` or set SHOPTUNE_LLAMA_CPP_DIR")
needs_server = pytest.mark.skipif(llama_server_path() is None, reason="no llama-server binary: run "
                                  "`make llama-server` or set SHOPTUNE_LLAMA_SERVER")


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, GGMLQuantizationType
    out = {}
    for t in GGUFReader(str(path)).tensors:
        data = np.asarray(t.data)
        if t.tensor_type == GGMLQuantizationType.BF16:
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        out[t.name] = data.astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
    return out


def _bf16(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.bfloat16).float().numpy()


@pytest.mark.real_engine
@needs_source
def test_export_writes_llama_cpp_tensors_equal_to_the_hf_weights(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_tiny_model(tmp_path / "tiny")
    ad = make_tiny_lora(base, tmp_path / "runs" / "shop" / "adapter", seed=3)
    m = export_gguf(str(base), [str(ad)], tmp_path / "gguf")
    assert m["base"] == "tiny.gguf" and m["adapters"] == {"shop": "shop.gguf"}
    assert json.loads((tmp_path / "gguf" / "manifest.json").read_text())["adapter_ids"] == {"shop": 0}
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    g = _tensors(tmp_path / "gguf" / "tiny.gguf")
    layer = hf.model.layers[1]
    np.testing.assert_array_equal(g["blk.1.attn_v.weight"], _bf16(layer.self_attn.v_proj.weight))
    np.testing.assert_array_equal(g["blk.1.ffn_down.weight"], _bf16(layer.mlp.down_proj.weight))
    np.testing.assert_array_equal(g["token_embd.weight"], _bf16(hf.model.embed_tokens.weight))
    # q is permuted for llama.cpp's rope layout: same values, other order
    q = _bf16(layer.self_attn.q_proj.weight)
    assert g["blk.1.attn_q.weight"].shape == q.shape
    np.testing.assert_array_equal(np.sort(g["blk.1.attn_q.weight"], axis=None), np.sort(q, axis=None))
    pm = PeftModel.from_pretrained(hf, str(ad))
    lora_v = pm.base_model.model.model.layers[1].self_attn.v_proj
    a = _tensors(tmp_path / "gguf" / "shop.gguf")
    np.testing.assert_array_equal(a["blk.1.attn_v.weight.lora_a"], _bf16(lora_v.lora_A["default"].weight))
    np.testing.assert_array_equal(a["blk.1.attn_v.weight.lora_b"], _bf16(lora_v.lora_B["default"].weight))
    assert not any(k.startswith("blk.1.ffn") for k in a)  # only the adapted modules


def test_export_refuses_bad_input_with_one_line(tmp_path):
    (tmp_path / "notadapter").mkdir()
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", "export", "gguf", "--model", "smollm2-135m",
                        "--adapter", str(tmp_path / "notadapter"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "no adapter_config.json" in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout
    with pytest.raises(ExportError, match="outtype"):
        export_gguf("smollm2-135m", [], tmp_path / "o", outtype="q2")


# ----------------------------------------------------------------------------- real llama-server

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """smollm2-135m and two random adapters exported to bf16 GGUF, served by llama-server."""
    if llama_server_path() is None or not _have_source():
        pytest.skip("needs the llama.cpp source and a built llama-server (make llama-server)")
    from shoptune.serve.testing import make_adapters
    root = tmp_path_factory.mktemp("gguf")
    ads = make_adapters(root / "adapters", names=("alpha", "beta"))
    m = export_gguf("smollm2-135m", [f"{n}={p}" for n, p in ads.items()], root / "out")
    srv = LlamaServerProcess(root / "out" / m["base"], [root / "out" / f for f in m["adapters"].values()],
                             root / "llama-server.log", slots=4)
    yield srv, ads
    srv.stop()


PROMPTS = ["The best running shoe for a marathon is", "Customers who buy a tent also buy",
           "You are a helpful online shopping assistant.\nWhich product is a kind of footwear?\n"
           "0. lamp\n1. sandal\n2. spoon\n3. pillow\nAnswer: "]


@pytest.mark.real_engine
@needs_server
@pytest.mark.slow
def test_llama_server_next_token_logprobs_match_transformers(served):
    from peft import PeftModel

    from shoptune.models import load
    srv, ads = served
    model, tok = load("smollm2-135m", dtype="fp32")  # the cached weights are bf16 values
    pm = PeftModel.from_pretrained(model, str(ads["alpha"]), adapter_name="alpha")
    pm.load_adapter(str(ads["beta"]), adapter_name="beta")
    worst = 0.0
    for adapter, lora_id in ((None, None), ("alpha", 0), ("beta", 1)):
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            lora = [{"id": i, "scale": 1.0 if i == lora_id else 0.0} for i in (0, 1)]
            r = httpx.post(srv.url + "/completion", timeout=300, json={
                "prompt": ids, "n_predict": 1, "n_probs": 5, "temperature": 0, "lora": lora,
                "cache_prompt": False}).json()
            top = r["completion_probabilities"][0]["top_logprobs"]
            with torch.inference_mode():
                if adapter is None:
                    with pm.disable_adapter():
                        logits = pm(torch.tensor([ids])).logits[0, -1]
                else:
                    pm.set_adapter(adapter)
                    logits = pm(torch.tensor([ids])).logits[0, -1]
            ref = torch.log_softmax(logits.float(), -1)
            ref_top = ref.topk(2)
            if ref_top.values[0] - ref_top.values[1] > 0.1:  # not a near tie: the same next token
                assert top[0]["id"] == int(ref_top.indices[0]), (adapter, prompt)
            for t in top:
                diff = abs(t["logprob"] - ref[t["id"]].item())
                worst = max(worst, diff)
                assert diff < 0.15, (adapter, prompt, t, ref[t["id"]].item())
    print(f"largest |logprob difference| over the top-5 tokens: {worst:.4f}")


@pytest.mark.real_engine
@needs_server
@pytest.mark.slow
def test_gateway_in_front_of_real_llama_server(served, tmp_path, monkeypatch):
    """`shoptune serve --upstream` -> llama-server: the official openai client, adapters by name,
    and every task type's constrained answer valid (own tasks too: a label, schema-valid JSON)."""
    import openai

    from shoptune import tasks
    from shoptune.serve.testing import ServerProcess
    from shoptune.models import load_tokenizer
    from tests.conftest import check_own_answers, own_example_tasks
    srv, _ = served
    tok = load_tokenizer("smollm2-135m")
    monkeypatch.setenv("SHOPTUNE_TASKS_PATH", str(own_example_tasks(tmp_path)))
    tasks.reload()
    gw = ServerProcess(["--upstream", srv.url], tmp_path / "gw.log", startup_timeout=120)
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m", "alpha", "beta"]
        outs = {}
        for model in ("smollm2-135m", "alpha", "beta"):
            r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
            outs[model] = r.choices[0].text
            direct = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "prompt": tok.encode(PROMPTS[0]), "max_tokens": 8, "temperature": 0,
                "lora": [{"id": i, "scale": 1.0 if model == n else 0.0}
                         for i, n in enumerate(("alpha", "beta"))]}).json()
            assert r.choices[0].text == direct["choices"][0]["text"], model
        assert len(set(outs.values())) == 3, outs  # the adapters change the answer
        from tests.serve.test_server import TASK_INPUTS
        for task, inp in TASK_INPUTS.items():
            r = httpx.post(f"{gw.url}/v1/tasks/{task}", json={"model": "alpha", "input": inp}, timeout=300)
            assert r.status_code == 200, (task, r.text)
            ans = r.json()["answer"]
            if task == "shopbench_task2":
                assert ans in range(4)
            elif task == "shopbench_task3":
                assert len(ans) == 3 and all(1 <= i <= 5 for i in ans)
            elif task == "shopbench_task12":
                assert sorted(ans) == [1, 2, 3, 4, 5]
            elif task == "ecguide_prp_bool":
                assert ans in ("yes", "no")
        check_own_answers(lambda task, body: httpx.post(f"{gw.url}/v1/tasks/{task}", json=body,
                                                        timeout=300).json(), ("smollm2-135m", "alpha"))
    finally:
        gw.stop()
        tasks.reload()
    assert "Traceback" not in (tmp_path / "gw.log").read_text()
