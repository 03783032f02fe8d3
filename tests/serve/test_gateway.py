"""Gateway mode (`shoptune serve --upstream`): shoptune's API in front of a vLLM-like or a
llama.cpp-like engine. The upstream is a fake but real HTTP server (tests/serve/fake_upstream.py);
the gateway is the real app over :class:`UpstreamEngine`, served by uvicorn on loopback."""
from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from shoptune.decoding import NumberListProcessor
from shoptune.serve.app import ServeSettings, build_app
from shoptune.serve.testing import app_in_thread
from shoptune.serve.upstream import (UpstreamEngine, choice_tokens, number_list_gbnf,
                                     number_list_regex)

from tests.serve.fake_upstream import FakeUpstream

KEY = "sk-gateway"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def tok():
    from shoptune.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


class Gateway:
    """build_app(UpstreamEngine(...)) under uvicorn in a thread."""

    def __init__(self, upstream_url: str, tok, adapters_dir=None, **kw):
        self.engine = UpstreamEngine(upstream_url, tok, base_name="smollm2-135m", health_interval=0.2, **kw)
        settings = ServeSettings(api_keys=frozenset({KEY}), adapters_dir=adapters_dir, max_new_tokens=64)
        self._stack = contextlib.ExitStack()
        self.url = self._stack.enter_context(app_in_thread(build_app(self.engine, settings)))
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def close(self):
        self._stack.close()


@pytest.fixture()
def vllm(tok):
    with FakeUpstream("vllm", tok, api_key="up-key") as up:
        yield up


@pytest.fixture()
def llama(tok):
    with FakeUpstream("llama.cpp", tok) as up:
        yield up


@pytest.fixture()
def gw_vllm(vllm, tok, tmp_path):
    g = Gateway(vllm.url + "/v1", tok, api_key="up-key", adapters_dir=tmp_path)
    yield g
    g.close()


@pytest.fixture()
def gw_llama(llama, tok):
    g = Gateway(llama.url, tok)
    yield g
    g.close()


def completions(up) -> list[dict]:
    return [r for r in up.requests if r["path"] == "/v1/completions"]


# ----------------------------------------------------------------------------- constraints

def _processor_language(tok, max_value, count, unique) -> set[str]:
    """Every string NumberListProcessor lets the model write (walked over its allowed tokens)."""
    p = NumberListProcessor(tok, 0, max_value, count, unique)
    end = set(p.end)
    out, stack = set(), [""]
    while stack:
        text = stack.pop()
        for t in p.allowed(text):
            if t in end:
                out.add(text)
            else:
                stack.append(text + tok.decode([t]))
    return out


@pytest.mark.parametrize("max_value,count,unique", [(5, 5, True), (5, 3, False), (12, 2, False),
                                                    (3, 3, True), (1, 3, False)])
def test_number_list_constraints_allow_exactly_what_the_built_in_processor_allows(tok, max_value, count, unique):
    language = _processor_language(tok, max_value, count, unique)
    rx = re.compile(number_list_regex(max_value, count, unique))
    assert {s for s in language if rx.fullmatch(s)} == language
    # and nothing else: every regex match of the same shape is in the language
    nums = [str(n) for n in range(1, max(max_value, 13) + 1)]
    import itertools
    n = min(count, max_value)
    for combo in itertools.product(nums, repeat=n):
        s = ", ".join(combo)
        assert bool(rx.fullmatch(s)) == (s in language), s
    gbnf = number_list_gbnf(max_value, count, unique)
    assert gbnf.startswith("root ::= ")
    if unique and n > 1:  # spelled-out permutations: the GBNF alternatives are the language
        assert set(re.findall(r'"([^"]+)"', gbnf)) == language


def test_choice_tokens_are_best_choice_tokens(tok):
    """The upstream's argmax among the biased tokens maps to the option best_choice picks when
    that token scores highest; no biased token stands for two options (" " starts " 0" and " 1")."""
    import torch

    from shoptune.decoding import best_choice
    for choices in (("0", "1", "2", "3"), ("yes", "no")):
        m = choice_tokens(tok, choices)
        assert set(m.values()) == set(choices)
        for t, c in m.items():
            logits = torch.zeros(len(tok))
            logits[t] = 10.0
            assert best_choice(logits, choices, tok) == c, (tok.decode([t]), c)


# ----------------------------------------------------------------------------- vLLM

def test_vllm_kind_detected_adapters_listed_and_openai_client_works(gw_vllm, vllm, tok):
    assert gw_vllm.engine.kind == "vllm"
    assert gw_vllm.engine.upstream_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    client = openai.OpenAI(base_url=gw_vllm.url + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m", "alpha", "beta"]
    r = client.completions.create(model="alpha", prompt="Shoes are", max_tokens=3, temperature=0)
    assert r.choices[0].text == " alpha alpha alpha" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    sent = completions(vllm)[-1]
    assert sent["model"] == "alpha" and sent["prompt"] == tok.encode("Shoes are")
    assert sent["max_tokens"] == 3 and sent["temperature"] == 0 and sent["stream"] is True
    assert "lora" not in sent and "logit_bias" not in sent
    # base model -> the upstream's base id; chat goes through the gateway's own chat template
    r = client.chat.completions.create(model="smollm2-135m", max_tokens=2,
                                       messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == " base base"
    sent = completions(vllm)[-1]
    assert sent["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sent["prompt"] == tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    # streaming through the gateway
    chunks = list(client.completions.create(model="beta", prompt="x", max_tokens=4, stream=True,
                                            stop=["a be"]))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " bet"


def test_vllm_task_endpoint_translates_constraints(gw_vllm, vllm, tok):
    # multiple choice: logit_bias over exactly the valid option tokens, one token
    ids = choice_tokens(tok, ("0", "1", "2", "3"))
    best = next(t for t, c in ids.items() if c == "2")
    vllm.choice_scores = {best: 5.0}
    r = gw_vllm.http.post("/v1/tasks/shopbench_task2", json={"model": "beta", "input": {
        "question": "Which has a screen?", "options": ["banana", "television", "tv", "sock"]}})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == 2 and r.json()["answer_text"] == "tv"
    sent = completions(vllm)[-1]
    assert sent["model"] == "beta" and sent["max_tokens"] == 1 and sent["temperature"] == 0
    assert {int(t) for t in sent["logit_bias"]} == set(ids) and set(sent["logit_bias"].values()) == {100.0}
    # ranking: a regex that only allows permutations of the candidates
    vllm.numbers_answer = "3, 1, 2, 5, 4"
    vllm.token_delay = 0.05  # (so the gateway's close arrives while the upstream still streams)
    r = gw_vllm.http.post("/v1/tasks/shopbench_task12", json={"input": {
        "question": "Rank for 'red shoes'.", "candidates": ["a", "b", "c", "d", "e"]}})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == [3, 1, 2, 5, 4]
    sent = completions(vllm)[-1]
    rx = sent["structured_outputs"]["regex"]
    assert re.fullmatch(rx, "3, 1, 2, 5, 4") and not re.fullmatch(rx, "3, 3, 2, 5, 4")
    assert not re.fullmatch(rx, "3, 1, 2, 5, 6")
    # the answer ended at its line end: the gateway closed the stream (the upstream stops there)
    deadline = time.monotonic() + 5
    while vllm.closed_early < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vllm.closed_early >= 1


def test_vllm_adapter_load_and_unload_map_to_its_endpoints(gw_vllm, vllm, tmp_path):
    (tmp_path / "gamma").mkdir()
    r = gw_vllm.http.post("/v1/load_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 200, r.text
    load = [x for x in vllm.requests if x["path"] == "/v1/load_lora_adapter"][-1]
    assert load == {"path": "/v1/load_lora_adapter", "lora_name": "gamma",
                    "lora_path": str((tmp_path / "gamma").resolve())}
    assert "gamma" in r.json()["models"]
    r = gw_vllm.http.post("/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == " gamma"
    # the upstream's refusal comes back with its message
    r = gw_vllm.http.post("/v1/load_lora_adapter", json={"lora_name": "alpha2", "lora_path": "gamma"})
    assert r.status_code == 200
    vllm.loras.append("delta")  # (loaded behind the gateway's back: the upstream refuses the name)
    (tmp_path / "delta").mkdir()
    r = gw_vllm.http.post("/v1/load_lora_adapter", json={"lora_name": "delta"})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = gw_vllm.http.post("/v1/unload_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 200 and "gamma" not in r.json()["models"]
    assert [x for x in vllm.requests if x["path"] == "/v1/unload_lora_adapter"][-1]["lora_name"] == "gamma"
    r = gw_vllm.http.post("/v1/completions", json={"model": "gamma", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_upstream_errors_propagate_with_clear_statuses(gw_vllm, vllm):
    vllm.fail_next = (400, "This model's maximum context length is 8192 tokens")
    r = gw_vllm.http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 400
    err = r.json()["error"]
    assert "maximum context length" in err["message"] and "upstream vllm returned 400" in err["message"]
    vllm.fail_next = (500, "CUDA error: out of memory")
    r = gw_vllm.http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 502 and "out of memory" in r.json()["error"]["message"]
    # (the openai client sees the same statuses as its own exception types)
    client = openai.OpenAI(base_url=gw_vllm.url + "/v1", api_key=KEY, max_retries=0)
    vllm.fail_next = (400, "bad prompt")
    with pytest.raises(openai.BadRequestError, match="bad prompt"):
        client.completions.create(model="alpha", prompt="x", max_tokens=2)
    # in a stream the error arrives in-band, then [DONE]
    vllm.fail_next = (500, "engine died")
    with gw_vllm.http.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": "x",
                                                              "max_tokens": 2, "stream": True}) as s:
        text = "".join(s.iter_text())
    assert "engine died" in text and text.rstrip().endswith("data: [DONE]")


def test_upstream_down_is_503_and_health_follows_it(tok):
    with FakeUpstream("vllm", tok) as up:
        g = Gateway(up.url, tok)
        assert g.http.get("/health").status_code == 200
        up.healthy = False
        deadline = time.monotonic() + 5
        while g.http.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        h = g.http.get("/health")
        assert h.status_code == 503 and "Loading model" in h.json()["reason"]
        assert g.http.get("/health/live").status_code == 200  # restarting the gateway cannot help
    try:  # the upstream is gone now
        r = g.http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
    finally:
        g.close()


def test_upstream_key_is_sent_and_a_wrong_one_is_reported(vllm, tok):
    with pytest.raises(Exception, match="401"):
        UpstreamEngine(vllm.url, tok, base_name="m", api_key="wrong")
    g = Gateway(vllm.url, tok, api_key="up-key")
    try:
        vllm.api_key = "rotated"
        r = g.http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 502 and "--upstream-api-key-env" in r.json()["error"]["message"]
    finally:
        g.close()


def test_upstream_timeout_is_504(tok):
    with FakeUpstream("vllm", tok, token_delay=2.0) as up:
        g = Gateway(up.url, tok, timeout=0.5)
        try:
            r = g.http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_timeout"
        finally:
            g.close()


# ----------------------------------------------------------------------------- llama.cpp

def test_llama_cpp_adapters_by_per_request_lora_scales(gw_llama, llama, tok):
    assert gw_llama.engine.kind == "llama.cpp"
    assert gw_llama.engine.models() == ["smollm2-135m", "alpha", "beta"]
    r = gw_llama.http.post("/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == " beta beta"
    assert completions(llama)[-1]["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 1.0}]
    r = gw_llama.http.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "x", "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == " base"  # every scale explicitly 0 ([] = the defaults)
    assert completions(llama)[-1]["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]


def test_llama_cpp_grammar_and_line_end(gw_llama, llama):
    llama.numbers_answer = "4, 2, 5"
    r = gw_llama.http.post("/v1/tasks/shopbench_task3", json={"model": "alpha", "input": {
        "question": "Pick 3.", "candidates": ["a", "b", "c", "d", "e", "f"]}})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == [4, 2, 5] and r.json()["raw"] == "4, 2, 5"
    sent = completions(llama)[-1]
    assert sent["grammar"] == number_list_gbnf(6, 3, False)
    assert sent["grammar"] == 'root ::= num (", " num){2}\nnum ::= [1-5] | "6"\n'  # (1..6 by digit class)
    assert sent["lora"] == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]


def test_runtime_loads_need_adapters_dir(gw_llama):
    g = gw_llama
    r = g.http.post("/v1/load_lora_adapter", json={"lora_name": "gamma"})
    assert r.status_code == 400 and "--adapters-dir" in r.json()["error"]["message"]


def test_llama_cpp_unload_hides_and_reload_reexposes(llama, tok, tmp_path):
    g = Gateway(llama.url, tok, adapters_dir=tmp_path)
    try:
        r = g.http.post("/v1/unload_lora_adapter", json={"lora_name": "alpha"})
        assert r.status_code == 200 and r.json()["models"] == ["smollm2-135m", "beta"]
        r = g.http.post("/v1/load_lora_adapter", json={"lora_name": "gamma"})
        assert r.status_code == 501
        assert "cannot load adapters at run time" in r.json()["error"]["message"]
        r = g.http.post("/v1/load_lora_adapter", json={"lora_name": "alpha2", "lora_path": "alpha"})
        assert r.status_code == 200 and "alpha2" in r.json()["models"]
        g.http.post("/v1/completions", json={"model": "alpha2", "prompt": "x", "max_tokens": 1})
        assert completions(llama)[-1]["lora"] == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]
    finally:
        g.close()


def test_adapter_rename_and_unknown_reference(llama, tok):
    e = UpstreamEngine(llama.url, tok, base_name="base", adapters={"shopping": "alpha.gguf"})
    assert e.models() == ["base", "beta", "shopping"]
    with pytest.raises(Exception, match="no such adapter"):
        UpstreamEngine(llama.url, tok, base_name="base", adapters={"x": "nope"})


# ----------------------------------------------------------------------------- CLI, eval

def test_cli_gateway_and_eval_backend_openai(llama, tmp_path):
    """`shoptune serve --upstream` as a process, and `shoptune eval --backend openai` through it:
    the evaluator's questions go to the task endpoint, so the upstream gets the constraints."""
    from shoptune.serve.testing import ServerProcess
    import json as _json

    from tests.conftest import mc, write_jsonl
    data = write_jsonl(tmp_path / "q.jsonl", [mc("Which is red?", gold=1), mc("Which is blue?", gold=2)])
    srv = ServerProcess(["--upstream", llama.url, "--api-key", KEY], tmp_path / "gw.log",
                        startup_timeout=120)
    try:
        llama.choice_scores = {t: (5.0 if c == "1" else 0.0)
                               for t, c in choice_tokens(srv_tok(), tuple("0123")).items()}
        out = tmp_path / "eval"
        r = subprocess.run([sys.executable, "-m", "shoptune.cli", "eval", "--backend", "openai",
                            "--base-url", srv.url + "/v1", "--api-key", KEY, "--model", "smollm2-135m",
                            "--data", str(data), "--out", str(out)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        preds = [_json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        assert [p["model_output"] for p in preds] == ["1", "1"]
        assert _json.loads((out / "scores.json").read_text())["task_endpoint_questions"] == 2
        sent = [x for x in completions(llama)]
        assert len(sent) == 2 and all(s["max_tokens"] == 1 and s["logit_bias"] for s in sent)
    finally:
        srv.stop()
    assert "Traceback" not in (tmp_path / "gw.log").read_text()


def srv_tok():
    from shoptune.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


# ----------------------------------------------------------------------------- --engine llama.cpp

@pytest.mark.real_engine  # the llama.cpp source (its converters); llama-server itself is faked here
def test_engine_llama_cpp_exports_starts_restarts_and_stops_llama_server(tmp_path, monkeypatch):
    """`shoptune serve --engine llama.cpp`: export (cached), start llama-server, restart it when it
    dies, stop it on SIGTERM. llama-server is the fake (a real one is tested in test_gguf.py)."""
    import os
    import signal

    from shoptune.serve.gguf import ExportError, llama_cpp_dir
    from shoptune.serve.testing import ServerProcess, make_tiny_lora, make_tiny_model
    try:
        src = llama_cpp_dir(fetch=False)
    except ExportError as e:
        pytest.skip(str(e))
    base = make_tiny_model(tmp_path / "tiny")
    ad = make_tiny_lora(base, tmp_path / "shop", seed=1)
    fake = tmp_path / "llama-server"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -m tests.serve.fake_upstream \"$@\"\n")
    fake.chmod(0o755)
    pid_file = tmp_path / "pid"
    for k, v in {"SHOPTUNE_LLAMA_SERVER": str(fake), "SHOPTUNE_LLAMA_CPP_DIR": str(src),
                 "SHOPTUNE_CACHE_DIR": str(tmp_path / "cache"), "FAKE_LLAMA_PID_FILE": str(pid_file),
                 "FAKE_LLAMA_TOKENIZER": str(base)}.items():
        monkeypatch.setenv(k, v)
    args = ["--engine", "llama.cpp", "--model", str(base), "--adapter", f"shop={ad}", "--api-key", KEY]
    gw = ServerProcess(args, tmp_path / "gw.log", startup_timeout=180)
    try:
        http = httpx.Client(base_url=gw.url, headers=AUTH, timeout=30)
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [str(base), "shop"]
        r = http.post("/v1/completions", json={"model": "shop", "prompt": "x", "max_tokens": 2})
        assert r.json()["choices"][0]["text"] == " shop shop"
        first = int(pid_file.read_text())
        os.kill(first, signal.SIGKILL)  # llama-server crashes ...
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ... and comes back on the same port
            if pid_file.read_text() != str(first):
                r = http.post("/v1/completions", json={"model": "shop", "prompt": "x", "max_tokens": 1})
                if r.status_code == 200:
                    break
            time.sleep(0.2)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == " shop"
        second = int(pid_file.read_text())
        assert second != first
    finally:
        gw.stop()
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # SIGTERM to shoptune stopped its llama-server
        os.kill(second, 0)
    text = (tmp_path / "gw.log").read_text()
    assert "restarting" in text and "Traceback" not in text
    exports = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(exports) == 1 and (exports[0] / "shop.gguf").is_file()
    # a second start reuses the export
    stamp = (exports[0] / "manifest.json").stat().st_mtime_ns
    gw = ServerProcess(args, tmp_path / "gw2.log", startup_timeout=180)
    third = int(pid_file.read_text())
    gw.stop(signal.SIGKILL)  # shoptune killed outright: its llama-server goes too (PDEATHSIG)
    assert (exports[0] / "manifest.json").stat().st_mtime_ns == stamp
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(third, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(third, 0)
