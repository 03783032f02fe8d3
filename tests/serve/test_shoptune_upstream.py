"""A gateway in front of another `shoptune serve` (issue #21 item 4): the upstream is a real
built-in server subprocess on the tiny float32 model, and the gateway is the real command
``shoptune serve --upstream URL`` (a second subprocess, kind left to auto-detection), as the issue
ran it: every multiple-choice task was a 400 "logit_bias is not supported by this server".

The gateway detects the kind "shoptune" (its /v1/models says owned_by shoptune and its /v1/tasks
lists the prompt protocol), sends multiple choice as one token with ``logit_bias`` (as to vLLM)
and number lists / one-line answers with ``shoptune_plan``, so its task endpoint answers exactly
as the upstream's own; plain completions, a client's ``logit_bias`` and adapter loads pass through.
"""
import json

import httpx
import pytest

from shoptune.tasks import Plan
from shoptune.serve.engine import Job
from shoptune.serve.testing import ServerProcess
from shoptune.serve.upstream import UpstreamEngine, choice_tokens

from tests.serve.fake_upstream import FakeUpstream
from tests.serve.test_gateway import KEY

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tok(tiny):
    from shoptune.models import load_tokenizer
    return load_tokenizer(str(tiny["base"]))


@pytest.fixture(scope="module")
def upstream(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("shoptune-upstream") / "server.log"
    s = ServerProcess(["--model", str(tiny["base"]), "--adapter", f"good={tiny['good']}",
                       "--adapters-dir", str(tiny["good"].parent), "--api-key", KEY,
                       "--dtype", "float32", "--max-wait-ms", "20", "--max-new-tokens", "64"], log)
    s.http = httpx.Client(base_url=s.url, headers=AUTH, timeout=120)
    yield s
    s.stop()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def gw(upstream, tiny, tmp_path_factory):
    """``shoptune serve --upstream`` exactly as a user starts it (no --upstream-kind)."""
    log = tmp_path_factory.mktemp("shoptune-gateway") / "gateway.log"
    with pytest.MonkeyPatch.context() as env:  # (the child inherits the environment at start)
        env.setenv("TEST_UPSTREAM_KEY", KEY)
        g = ServerProcess(["--upstream", upstream.url + "/v1", "--upstream-api-key-env", "TEST_UPSTREAM_KEY",
                           "--model", str(tiny["base"]), "--served-model-name", "smollm2-135m",
                           "--adapters-dir", str(tiny["good"].parent), "--api-key", KEY,
                           "--max-new-tokens", "64"], log)
    g.http = httpx.Client(base_url=g.url, headers=AUTH, timeout=120)
    yield g
    g.stop()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def engine(upstream, tok):
    """The gateway's engine on its own (what it sends), detecting the same upstream."""
    return UpstreamEngine(upstream.url + "/v1", tok, base_name="smollm2-135m", api_key=KEY)


def test_a_shoptune_upstream_is_detected_with_its_adapters(gw, engine, tiny):
    e = engine
    assert (e.kind, e.upstream_protocol, e.upstream_model) == ("shoptune", "starter-kit", str(tiny["base"]))
    assert e.models() == ["smollm2-135m", "good"]
    assert "gateway to shoptune at" in gw.log.read_text(), gw.log.read_text()  # (the CLI's own detection)
    assert [m["id"] for m in gw.http.get("/v1/models").json()["data"]] == ["smollm2-135m", "good"]
    assert gw.http.get("/health").status_code == 200


QUESTIONS = [
    ("shopbench_task2", {"question": "Which is a shoe?", "options": ["apple", "sneaker", "lamp", "sock"]}),
    ("shopbench_task2", {"input_field": "Which fits a laptop?\n0. bag\n1. sleeve\n2. cup\nAnswer: "}),
    ("shopbench_task3", {"question": "Which are shoes?", "candidates": ["hat", "boot", "sneaker", "lamp", "sandal", "cap"]}),
    ("shopbench_task3", {"input_field": "Which are shoes?\n1. hat\n5. boot\n12. sneaker\n40. lamp\nOutput: "}),
    ("shopbench_task12", {"question": "Rank for 'red shoes'.", "candidates": ["a", "b", "c", "d", "e"]}),
    ("shopbench_task12", {"input_field": "Rank for 'tent'.\n1. a\n2. b\n3. c\n4. d\n5. e\nOutput: "}),
    ("shopbench_task4", {"text": "asus laptop 15 inch", "entity_type": "brand"}),
]


@pytest.mark.parametrize("model", [None, "good"])
@pytest.mark.parametrize("task,inp", QUESTIONS)
def test_task_answers_equal_the_upstreams_own_task_endpoint(gw, upstream, task, inp, model):
    body = {"input": inp, **({"model": model} if model else {})}
    direct = upstream.http.post(f"/v1/tasks/{task}", json=body)
    via = gw.http.post(f"/v1/tasks/{task}", json=body)
    assert direct.status_code == 200, direct.text
    assert via.status_code == 200, via.text
    keys = ("task", "answer", "raw", "answer_text", "answer_items")
    assert {k: via.json().get(k) for k in keys} == {k: direct.json().get(k) for k in keys}


def test_plain_completions_pass_through(gw, upstream, engine, tok):
    for body in ({"model": "good", "prompt": "Shoes are", "max_tokens": 6, "temperature": 0},
                 {"prompt": "Shoes are", "max_tokens": 4, "temperature": 0,
                  "logit_bias": {str(tok.encode(" red", add_special_tokens=False)[0]): 100}},
                 {"prompt": "Shoes are", "max_tokens": 5, "temperature": 0.9, "seed": 4, "stop": ["e"]},
                 {"prompt": "Shoes are", "max_tokens": 5, "temperature": 0,
                  "shoptune_plan": {"numeric": True, "values": [3, 17], "count": 2, "stop_newline": True}}):
        direct = upstream.http.post("/v1/completions", json={"model": engine.upstream_model, **body})
        via = gw.http.post("/v1/completions", json={"model": "smollm2-135m", **body} if "model" not in body else body)
        assert direct.status_code == 200 and via.status_code == 200, (direct.text, via.text)
        assert via.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"], body
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    direct = upstream.http.post("/v1/chat/completions", json={"model": "good", **chat})
    via = gw.http.post("/v1/chat/completions", json={"model": "good", **chat})
    assert via.json()["choices"][0]["message"] == direct.json()["choices"][0]["message"]
    with gw.http.stream("POST", "/v1/completions", json={"model": "good", "prompt": "Shoes are",
                                                         "max_tokens": 6, "temperature": 0, "stream": True}) as s:
        streamed = s.read().decode()
    want = upstream.http.post("/v1/completions", json={"model": "good", "prompt": "Shoes are",
                                                       "max_tokens": 6, "temperature": 0}).json()
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in streamed.splitlines()
                   if line.startswith("data: {") and json.loads(line[6:])["choices"])
    assert text == want["choices"][0]["text"] and streamed.rstrip().endswith("data: [DONE]")


def test_what_the_gateway_sends_a_shoptune_upstream(engine, tok):
    e = engine
    choice = e.payload(Job([1, 2], "good", kind="choice", choices=("0", "1", "2")))
    assert choice["model"] == "good" and choice["max_tokens"] == 1 and choice["temperature"] == 0
    assert {int(t) for t in choice["logit_bias"]} == set(choice_tokens(tok, ("0", "1", "2")))
    plan = Plan("generate", max_new_tokens=9, numeric=True, stop_newline=True, max_value=40, count=3,
                values=(1, 5, 12, 40))
    gen = e.payload(Job([1, 2], None, max_new_tokens=9, plan=plan, logit_bias={7: -3.0}))
    assert gen["shoptune_plan"] == {"kind": "generate", "numeric": True, "max_value": 40, "count": 3,
                                    "unique": False, "values": [1, 5, 12, 40], "stop_newline": True}
    assert gen["max_tokens"] == 9 and gen["logit_bias"] == {"7": -3.0}
    assert "structured_outputs" not in gen and "grammar" not in gen


def test_adapter_loads_go_to_the_shoptune_upstream(gw, upstream):
    r = gw.http.post("/v1/load_lora_adapter", json={"lora_name": "good2"})
    assert r.status_code == 200 and "good2" in r.json()["models"], r.text
    assert "good2" in [m["id"] for m in upstream.http.get("/v1/models").json()["data"]]
    body = {"model": "good2", "prompt": "Shoes are", "max_tokens": 5, "temperature": 0}
    assert gw.http.post("/v1/completions", json=body).json()["choices"][0]["text"] == \
        upstream.http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    r = gw.http.post("/v1/unload_lora_adapter", json={"lora_name": "good2"})
    assert r.status_code == 200 and "good2" not in r.json()["models"], r.text
    assert "good2" not in [m["id"] for m in upstream.http.get("/v1/models").json()["data"]]
    r = gw.http.post("/v1/load_lora_adapter", json={"lora_name": "nope"})  # the upstream's own 400
    assert r.status_code == 400 and "upstream shoptune returned 400" in r.json()["error"]["message"], r.text


def test_other_kinds_get_a_clients_logit_bias_but_no_plan(tok):
    with FakeUpstream("vllm", tok) as up:
        e = UpstreamEngine(up.url, tok, base_name="m")
        assert e.kind == "vllm"
        plan = Plan("generate", max_new_tokens=9, numeric=True, stop_newline=True, max_value=5, count=5, unique=True)
        body = e.payload(Job([1], None, plan=plan, logit_bias={7: 2.5}))
        assert body["logit_bias"] == {"7": 2.5} and "shoptune_plan" not in body
        assert "regex" in body["structured_outputs"]
        with pytest.raises(Exception, match="is not a shoptune task list"):
            UpstreamEngine(up.url, tok, base_name="m", kind="shoptune")
