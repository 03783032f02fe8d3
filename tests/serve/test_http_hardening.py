"""The HTTP layer against hostile and careless clients (issue #9), on a tiny model.

The app runs under a real uvicorn (in a thread of this process, so faults can be injected)
with real sockets: keep-alive reuse and partial bodies behave as in production.
"""
import json
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
QUEUE = 8


@pytest.fixture(scope="module")
def live(tiny):
    from shoptune.models import load
    from shoptune.serve.app import ServeSettings, build_app
    from shoptune.serve.engine import Engine
    from shoptune.serve.testing import app_in_thread

    model, tok = load(str(tiny["base"]), dtype="fp32")
    engine = Engine(model, tok, base_name="tiny", max_queue=QUEUE, max_wait=0.02)
    settings = ServeSettings(adapters_dir=tiny["good"].parent, max_new_tokens=64, body_timeout=1.0)
    with app_in_thread(build_app(engine, settings)) as url:
        yield SimpleNamespace(url=url, port=int(url.rsplit(":", 1)[1]), engine=engine, settings=settings)


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def complete(http, **body):
    return http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4,
                                              "temperature": 0, **body})


def assert_400(r, param, fragment=""):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


# ----------------------------------------------------------------------------- items 1, 2

@pytest.mark.parametrize("bad,fragment", [
    ("mismatch", "was trained for a different base model"),
    ("corrupt", "not a readable safetensors file"),
    ("prompt_tuning", "only LORA adapters"),
])
def test_bad_adapter_load_is_400_and_everything_keeps_working(live, http, bad, fragment):
    before = complete(http).json()["choices"][0]["text"]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "first", "lora_path": bad})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text
    assert len(r.text) < 1000  # one sentence, not a wall of size-mismatch lines
    assert complete(http).json()["choices"][0]["text"] == before
    assert http.get("/health").status_code == 200
    assert "first" not in [m["id"] for m in http.get("/v1/models").json()["data"]]
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "first"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert not live.engine.is_peft


# ----------------------------------------------------------------------------- item 4, 5, 8, 9

@pytest.mark.parametrize("body,param,fragment", [
    ('{"model": "tiny", "prompt": "hi", "temperature": 1e-45}', "temperature", "at least 0.01"),
    ('{"model": "tiny", "prompt": "hi", "temperature": NaN}', "temperature", "finite number"),
    ('{"model": "tiny", "prompt": "hi", "temperature": Infinity}', "temperature", "finite number"),
    ('{"model": "tiny", "prompt": "hi", "top_p": NaN}', "top_p", "finite number"),
    ('{"model": "tiny", "prompt": "hi", "top_p": -Infinity}', "top_p", ""),
    ('{"model": "tiny", "prompt": "hi", "top_p": 0}', "top_p", "greater than 0"),
    ('{"model": "tiny", "prompt": "\\ud800"}', "prompt", "lone UTF-16 surrogate"),
    ('{"model": "tiny", "prompt": ["ok", "x\\udfff"]}', "prompt.1", "lone UTF-16 surrogate"),
    (json.dumps({"model": "tiny", "prompt": "hi", "stop": ["s"] * 50_000}), "stop", "at most 32 stop strings"),
    (json.dumps({"model": "tiny", "prompt": "hi", "stop": "s" * 5000}), "stop", "at most 4096 characters"),
    (json.dumps({"model": "tiny", "prompt": ["a", "b", "c"], "n": 3}), "n", "exceeds the server's limit"),
])
def test_bad_completion_values_are_400_naming_the_field(http, body, param, fragment):
    r = http.post("/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert_400(r, param, fragment)


def test_surrogates_in_chat_and_tasks_and_nul_in_lora_path_are_400(http):
    r = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [{"role": "user", '
                  b'"content": "hi \\ud800"}]}', headers={"Content-Type": "application/json"})
    assert_400(r, "messages.0.content", "lone UTF-16 surrogate")
    r = http.post("/v1/tasks/shopbench_task4", content=b'{"input": {"text": "\\udc00", "entity_type": "brand"}}',
                  headers={"Content-Type": "application/json"})
    assert_400(r, "input.text", "lone UTF-16 surrogate")
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "good\x00/../../etc"})
    assert_400(r, "lora_path", "NUL byte")


def test_a_request_bigger_than_the_queue_is_400_a_full_queue_still_429(http):
    assert_400(complete(http, prompt=["a"] * 4, n=3), "n", f"limit of {QUEUE} queued sequences")
    r = http.post("/v1/chat/completions", json={"model": "tiny", "n": QUEUE + 1, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert_400(r, "n", "exceeds the server's limit")
    r = complete(http, prompt=["a"] * 4, n=2)  # exactly the queue's size: served
    assert r.status_code == 200 and len(r.json()["choices"]) == QUEUE


# ----------------------------------------------------------------------------- item 6

def test_junk_model_names_never_become_metric_labels(http):
    http.get("/metrics")
    complete(http)
    size = len(http.get("/metrics").text)
    for i in range(3):
        r = complete(http, model=f"junk-{i}-" + "x" * 20_000)
        assert r.status_code == 404
        r = http.post(f"/v1/tasks/shopbench_task4", json={"model": f"j{i}" + "y" * 20_000,
                                                           "input": {"text": "asus", "entity_type": "brand"}})
        assert r.status_code == 404
    text = http.get("/metrics").text
    assert "junk" not in text and "yyy" not in text
    assert len(text) - size < 3000  # at most a few new series (status="404"), not 3 x 20 KB each
    assert 'endpoint="/v1/completions",model="tiny",status="200"' in text


# ----------------------------------------------------------------------------- item 7

def test_health_live_and_ready(live, http, monkeypatch):
    for path in ("/health", "/health/ready", "/health/live"):
        r = http.get(path)
        assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["reason"] is None
    live.engine.probe_interval = 0.1

    def broken_forward(*a, **kw):
        raise RuntimeError("injected: the model cannot compute")
    monkeypatch.setattr(live.engine.model, "forward", broken_forward)
    r = complete(http)
    assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
    for path in ("/health", "/health/ready"):
        r = http.get(path)
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        assert "injected: the model cannot compute" in r.json()["reason"]
    assert http.get("/health/live").status_code == 200  # not a reason to restart the process
    monkeypatch.undo()
    deadline = time.monotonic() + 10
    while http.get("/health/ready").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert http.get("/health").status_code == 200 and complete(http).status_code == 200


# ----------------------------------------------------------------------------- item 10

def test_a_500_leaves_the_keep_alive_connection_usable(live, http, monkeypatch):
    def fault(model):
        raise RuntimeError("injected fault in a handler")
    monkeypatch.setattr(live.engine, "resolve_model", fault)
    r1 = complete(http)
    assert r1.status_code == 500 and r1.json()["error"]["type"] == "server_error"
    assert "injected fault in a handler" in r1.json()["error"]["message"]
    monkeypatch.undo()
    r2 = complete(http)
    assert r2.status_code == 200

    def local_port(r):
        return r.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
    assert local_port(r1) == local_port(r2)  # the same connection: the server did not close it
    assert r1.headers.get("connection") != "close"


# ----------------------------------------------------------------------------- item 11

def test_a_partial_body_is_cut_after_the_body_timeout(live):
    s = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    t0 = time.monotonic()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny\", ")
    reply = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break  # the server closed the connection
        reply += chunk
    elapsed = time.monotonic() - t0
    s.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"request body not received within 1 s" in reply
    assert live.settings.body_timeout <= elapsed < live.settings.body_timeout + 5
