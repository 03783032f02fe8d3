"""The real server, a real client: `shoptune serve` in a subprocess, the official openai client."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from shoptune.serve.testing import greedy_reference

from tests.conftest import DEV, needs_shared
from tests.serve.conftest import KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
http = httpx.Client(timeout=120)  # generous: CI shares 2 cores with the model
PROMPTS = ["The best running shoe is", "Customers who buy a tent also buy", "A good gift for a cook is"]


@pytest.fixture(scope="module")
def reference(adapters):
    """In-process greedy generation with plain peft: what the server must answer."""
    from peft import PeftModel

    from shoptune.models import load

    model, tok = load("smollm2-135m", dtype="fp32")
    pm = PeftModel.from_pretrained(model, str(adapters["alpha"]), adapter_name="alpha")
    pm.load_adapter(str(adapters["beta"]), adapter_name="beta")
    pm.eval()

    def generate(adapter: str | None, prompt: str, n: int) -> str:
        return greedy_reference(pm, tok, adapter, prompt, n)
    return generate


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "smollm2-135m" and {"alpha", "beta"} <= set(ids)


def test_completions_match_plain_peft_per_adapter(client, reference):
    for model, adapter in (("smollm2-135m", None), ("alpha", "alpha"), ("beta", "beta")):
        r = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == reference(adapter, PROMPTS[0], 8), model
        assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    texts = {m: client.completions.create(model=m, prompt=PROMPTS[0], max_tokens=8, temperature=0)
             .choices[0].text for m in ("smollm2-135m", "alpha", "beta")}
    assert len(set(texts.values())) == 3  # the adapters really change the answer


def test_completions_list_prompt_n_and_stop(client):
    r = client.completions.create(model="alpha", prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: n copies agree
    full = client.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=12,
                                     temperature=0).choices[0].text
    word = full.split()[1]
    cut = client.completions.create(model="smollm2-135m", prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0, stop=[word])
    assert cut.choices[0].text == full[:full.index(word)]
    assert cut.choices[0].finish_reason == "stop"


def test_sampling_without_a_seed_is_valid(client):
    r = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=5, temperature=0.8,
                                  top_p=0.9, n=3)
    assert len(r.choices) == 3 and all(c.finish_reason in ("stop", "length") for c in r.choices)


def test_chat_and_streaming_agree(client):
    msgs = [{"role": "system", "content": "You are a shopping assistant."},
            {"role": "user", "content": "Name one fruit."}]
    full = client.chat.completions.create(model="alpha", messages=msgs, max_tokens=10, temperature=0)
    assert full.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="alpha", messages=msgs, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    stream = client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=7, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream)
    assert streamed == client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=7,
                                                 temperature=0).choices[0].text


def test_concurrent_mixed_adapters_equal_single_requests(client, server):
    jobs = [(m, p) for m in ("smollm2-135m", "alpha", "beta") for p in PROMPTS] * 2
    single = {(m, p): client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0)
              .choices[0].text for m, p in set(jobs)}

    def one(job):
        m, p = job
        return client.completions.create(model=m, prompt=p, max_tokens=8, temperature=0).choices[0].text

    def batches_over_one(name):  # batches observed with a value above 1 (histogram: all - le=1)
        return _metric(server, f"{name}_count") - _metric(server, f'{name}_bucket{{le="1.0"}}')

    mixed_before = batches_over_one("shoptune_batch_adapters")
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [single[j] for j in jobs]
    # what the test claims: at least one batch of this burst held two or more distinct adapters
    # (and so more than one request), and the answers still equal one-at-a-time requests
    assert batches_over_one("shoptune_batch_adapters") - mixed_before >= 1


def _metric(server, prefix: str) -> float:
    """The value of the first sample whose name (and labels, when given) start with ``prefix``."""
    for line in http.get(server.url + "/metrics").text.splitlines():
        if line.startswith(prefix + " ") or (line.startswith(prefix) and prefix.endswith("}")) \
                or line.startswith(prefix + "{"):
            return float(line.split()[-1])
    return 0.0


# ----------------------------------------------------------------------------- task endpoint

TASK_INPUTS = {
    "shopbench_task2": {"question": "Which product category may have the attribute screen size?",
                        "options": ["banana", "television", "sock", "pencil"]},
    "shopbench_task3": {"question": "Select 3 snippets a customer would write about comfort. "
                                    "Output three numbers separated by comma.",
                        "candidates": ["very comfy", "fast shipping", "soft", "cheap", "comfortable"]},
    "shopbench_task12": {"question": "Rank the products for the query 'red running shoes'.",
                         "candidates": ["red running shoes", "blue hat", "red sneakers", "pen", "shoe polish"]},
    "shopbench_task4": {"text": "asus tablet 10 inch", "entity_type": "brand"},
    "shopbench_task1": {"instruction": "Tell me what this product category is about", "input": "Toggle Switch"},
    "ecguide_prp_bool": {"question": "Is a phone case relevant to the query 'iphone 15 cover'?"},
}


def _task(server, task, body, **kw):
    return http.post(f"{server.url}/v1/tasks/{task}", json=body, headers=AUTH, timeout=300, **kw)


def test_task_endpoint_each_task_type(server):
    listed = http.get(server.url + "/v1/tasks", headers=AUTH).json()["data"]
    types = {t["id"]: t for t in listed}
    assert {types[t]["task_type"] for t in TASK_INPUTS} == {
        "multiple-choice", "retrieval", "ranking", "named_entity_recognition", "generation"}
    assert "options" in types["shopbench_task2"]["input_schema"]["properties"]
    for task, inp in TASK_INPUTS.items():
        r = _task(server, task, {"input": inp})
        assert r.status_code == 200, (task, r.text)
        body = r.json()
        ans = body["answer"]
        kind = types[task]["task_type"]
        if types[task]["metric"] == "bool":
            assert ans in ("yes", "no")
        elif kind == "multiple-choice":
            assert ans in range(4) and body["answer_text"] == inp["options"][ans]
        elif kind == "retrieval":
            assert len(ans) == 3 and all(1 <= i <= 5 for i in ans)
        elif kind == "ranking":
            assert sorted(ans) == [1, 2, 3, 4, 5]
        elif kind == "named_entity_recognition":
            assert isinstance(ans, list) and all(isinstance(x, str) for x in ans)
        else:
            assert isinstance(ans, str) and ans == ans.strip()
        assert body["raw"] is not None and body["usage"]["prompt_tokens"] > 0


@needs_shared
def test_task_endpoint_answers_like_the_evaluator(server):
    """Same prompt, same constrained decoding: the server's raw answer is the evaluator's output."""
    from shoptune.data.loaders import load_records
    from shoptune.decoding import build_prompts
    from shoptune.tasks import plan_for
    from shoptune.eval.backends import LocalBackend
    from shoptune.models import load
    from shoptune.tasks import all_cards

    recs = load_records(DEV)
    picked, seen = [], set()
    for r in recs:
        if r.task_type not in seen and r.metric != "jp-bleu":
            seen.add(r.task_type)
            picked.append(r)
    model, tok = load("smollm2-135m", dtype="fp32")
    outs = LocalBackend(model, tok).run(build_prompts(picked, "starter-kit"), [plan_for(r) for r in picked])
    for rec, expected in zip(picked, outs):
        card = all_cards()[rec.task]
        r = _task(server, card.name, {"model": "smollm2-135m", "input": {"input_field": rec.input_field}})
        assert r.status_code == 200, r.text
        assert r.json()["raw"] == expected, card.name


def test_task_endpoint_routes_to_a_task_named_adapter_and_validates(server):
    r = _task(server, "shopbench_task2", {"model": "alpha", "input": TASK_INPUTS["shopbench_task2"]})
    assert r.json()["model"] == "alpha"
    bad = _task(server, "shopbench_task2", {"input": {"question": "Q?", "options": ["only one"]}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input.options"
    bad = _task(server, "shopbench_task4", {"input": {"txt": "asus"}})
    assert bad.status_code == 400 and "input.txt" in bad.json()["error"]["message"]
    missing = _task(server, "no_such_task", {"input": {"input_field": "x"}})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "task_not_found"
    unknown = _task(server, "shopbench_task2", {"model": "zzz", "input": TASK_INPUTS["shopbench_task2"]})
    assert unknown.status_code == 404


# ----------------------------------------------------------------------------- errors

def test_auth_failures(server):
    from openai import OpenAI
    for key in ("wrong-key", ""):
        c = OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    r = http.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert http.get(server.url + "/health").status_code == 200  # probes need no key


def test_unknown_adapter_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body,param", [
    ({"model": "alpha", "prompt": "hi", "temperature": 5}, "temperature"),
    ({"model": "alpha"}, "prompt"),
    ({"model": "alpha", "prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"model": "alpha", "prompt": "hi", "logprobs": 2, "stream": True}, "logprobs"),
    ({"model": "alpha", "prompt": [[1, 2, 99999999]]}, "prompt"),
])
def test_bad_completion_bodies_are_400_naming_the_field(server, body, param):
    r = http.post(server.url + "/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param)


def test_malformed_and_oversized_bodies(server):
    r = http.post(server.url + "/v1/chat/completions", content=b"{not json", headers={
        **AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = http.post(server.url + "/v1/chat/completions", json={"model": "alpha", "messages": []}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    big = {"model": "alpha", "prompt": "x" * 70000}
    r = http.post(server.url + "/v1/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds for chunked bodies too
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(80):
            yield b"y" * 1000
        yield b'"}'
    r = http.post(server.url + "/v1/completions", content=chunks(), headers={
        **AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = http.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "word " * 3000},
                   headers=AUTH)
    assert r.status_code in (400, 413)


# ----------------------------------------------------------------------------- admin

def test_hot_load_and_unload_while_requests_run(client, server, adapters, tmp_path):
    def slow(model):
        return client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=40, temperature=0)

    with ThreadPoolExecutor(6) as pool:
        running = [pool.submit(slow, m) for m in ("alpha", "beta", "alpha", "beta", "alpha", "smollm2-135m")]
        time.sleep(0.5)
        r = http.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "gamma"}, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        r = http.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "alpha"}, headers=AUTH,
                       timeout=300)
        assert r.status_code == 200, r.text
        results = [f.result() for f in running]  # nothing in flight was dropped
    assert all(res.choices[0].finish_reason in ("stop", "length") for res in results)
    ids = [m.id for m in client.models.list().data]
    assert "gamma" in ids and "alpha" not in ids
    assert client.completions.create(model="gamma", prompt="hi", max_tokens=2).choices
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="alpha", prompt="hi", max_tokens=2)
    # put a back, so test order does not matter
    r = http.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "alpha"}, headers=AUTH, timeout=120)
    assert r.status_code == 200


@pytest.mark.parametrize("body,fragment", [
    ({"lora_name": "x", "lora_path": "../../etc"}, "outside the adapters folder"),
    ({"lora_name": "x", "lora_path": "/etc"}, "outside the adapters folder"),
    ({"lora_name": "../alpha"}, "invalid adapter name"),
    ({"lora_name": "pickled"}, "pickled weights"),
    ({"lora_name": "nosafetensors"}, "only safetensors"),
    ({"lora_name": "beta"}, "already loaded"),
])
def test_admin_load_refuses_unsafe_adapters(server, adapters, body, fragment):
    import shutil
    root = adapters["alpha"].parent
    if not (root / "pickled").exists():
        shutil.copytree(adapters["alpha"], root / "pickled")
        (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04not really")
        (root / "nosafetensors").mkdir()
        shutil.copy(adapters["alpha"] / "adapter_config.json", root / "nosafetensors")
    r = http.post(server.url + "/v1/load_lora_adapter", json=body, headers=AUTH)
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_client_disconnect_stops_generation(client, server):
    start = _metric_label(server, "shoptune_generated_tokens_total", 'model="beta"')
    full = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=120, temperature=0)
    assert full.usage.completion_tokens >= 60, "precondition: a long answer"
    # the engine counts a batch's tokens after the batch, which may be just after the client got
    # its answer: wait until `full` is counted, or its tokens would be charged to the stream below
    deadline = time.monotonic() + 30
    while _metric_label(server, "shoptune_generated_tokens_total", 'model="beta"') < \
            start + full.usage.completion_tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    before = _metric_label(server, "shoptune_generated_tokens_total", 'model="beta"')
    with http.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "beta", "prompt": PROMPTS[1], "max_tokens": 120, "temperature": 0,
                            "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break  # hang up after a few tokens
    time.sleep(3)
    spent = _metric_label(server, "shoptune_generated_tokens_total", 'model="beta"') - before
    assert 0 < spent < full.usage.completion_tokens / 2


def _metric_label(server, name, label):
    for line in http.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.split()[-1])
    return 0.0


def test_health_and_metrics(server):
    h = http.get(server.url + "/health").json()
    assert h["status"] == "ok" and "beta" in h["adapters"]
    m = http.get(server.url + "/metrics").text
    for name in ("shoptune_requests_total", "shoptune_request_latency_seconds_bucket",
                 "shoptune_batch_size_bucket", "shoptune_queue_depth", "shoptune_tokens_per_second",
                 "shoptune_generated_tokens_total"):
        assert name in m
    assert 'endpoint="/v1/completions",model="alpha",status="200"' in m
