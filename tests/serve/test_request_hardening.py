"""The HTTP layer against the second pass of hostile and careless clients (issue #20), on a tiny
model under a real uvicorn in a thread of this process (as test_http_hardening.py).

Requests: seeds out of range, loose types, tools asked for in other words, messages without
content, bodies that are not JSON or not UTF-8, a full queue. Adapters: ones peft cannot batch
per row, a config over weights of another rank, a link out of --adapters-dir, and what
/v1/models shows of their folders. The task endpoint: huge list numbers, input_field together
with structured fields, a candidate with a 30-digit number.
"""
import json
import os
import queue
import shutil
from types import SimpleNamespace

import httpx
import pytest

pytestmark = pytest.mark.slow  # the tiny fixtures need the real tokenizer (model cache)
J = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def live(tiny, tmp_path_factory):

    from shoptune.models import load
    from shoptune.serve.app import ServeSettings, build_app
    from shoptune.serve.engine import Engine
    from shoptune.serve.testing import app_in_thread

    root = tmp_path_factory.mktemp("adapters")
    for name in ("good", "good2", "dora", "modules_to_save"):
        shutil.copytree(tiny[name], root / name)
    shutil.copytree(tiny["good"], root / "r16")  # an r=16 config over the r=4 tensors
    cfg = json.loads((root / "r16" / "adapter_config.json").read_text())
    (root / "r16" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(tiny["good"], outside / "good")
    (root / "escape").mkdir()  # its weights: a link to a file outside the adapters folder
    shutil.copy(tiny["good"] / "adapter_config.json", root / "escape")
    os.symlink(outside / "good" / "adapter_model.safetensors", root / "escape" / "adapter_model.safetensors")
    (root / "inside").mkdir()  # a link to a file inside it: fine
    shutil.copy(tiny["good"] / "adapter_config.json", root / "inside")
    os.symlink(root / "good2" / "adapter_model.safetensors", root / "inside" / "adapter_model.safetensors")

    model, tok = load(str(tiny["base"]), dtype="fp32")
    engine = Engine(model, tok, base_name="tiny", max_queue=8, max_wait=0.02)
    engine.load_adapter("good", root / "good")
    engine.load_adapter("elsewhere", outside / "good")  # as `--adapter NAME=DIR` outside --adapters-dir
    settings = ServeSettings(adapters_dir=root, max_new_tokens=64, body_timeout=2.0)
    with app_in_thread(build_app(engine, settings)) as url:
        yield SimpleNamespace(url=url, engine=engine, root=root, outside=outside)


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def complete(http, **body):
    return http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4,
                                              "temperature": 0, **body})


def chat(http, messages, **body):
    return http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                   "max_tokens": 3, "temperature": 0, **body})


def assert_400(r, param, fragment=""):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


USER = {"role": "user", "content": "hi"}


# ----------------------------------------------------------------------------- item 1

@pytest.mark.parametrize("seed", [2**64, 2**63, -2**63 - 1])
def test_a_seed_out_of_range_is_400_naming_seed(http, seed):
    assert_400(complete(http, seed=seed, temperature=1.0), "seed")
    assert_400(chat(http, [USER], seed=seed, temperature=1.0), "seed")


def test_the_extreme_seeds_sample_and_repeat(http):
    for seed in (2**63 - 1, -2**63):  # with n=2, choice 1 samples with seed + 1
        a, b = (complete(http, seed=seed, n=2, temperature=1.0, max_tokens=6) for _ in range(2))
        assert a.status_code == 200, a.text
        assert [c["text"] for c in a.json()["choices"]] == [c["text"] for c in b.json()["choices"]]


# ----------------------------------------------------------------------------- minor: strict types

@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"n": "2"}, "n"),
    ("/v1/completions", {"n": 2.0}, "n"),
    ("/v1/completions", {"echo": "yes"}, "echo"),
    ("/v1/completions", {"stream": 1}, "stream"),
    ("/v1/completions", {"max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"seed": "7"}, "seed"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, True]]}, "prompt"),
    ("/v1/completions", {"stop": [1]}, "stop"),
    ("/v1/completions", {"model": 5}, "model"),
    ("/v1/chat/completions", {"logprobs": 1}, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": "yes"}, "stream": True},
     "stream_options.include_usage"),
])
def test_loose_types_are_400_not_coerced(http, path, body, param):
    base = {"model": "tiny", "max_tokens": 4, **({"prompt": "Hello"} if "completions" == path[4:] else
                                                {"messages": [USER]})}
    r = http.post(path, json={**base, **body})
    assert_400(r, param)
    assert "must be" in r.json()["error"]["message"] or "should be" in r.json()["error"]["message"]


def test_errors_inside_a_union_name_the_field_not_the_member_tried(http):
    r = chat(http, [{"role": "user", "content": [{"type": "text"}]}])
    assert_400(r, "messages.0.content", "messages.0.content.0.text: Field required")
    assert "list[" not in r.text


def test_whole_numbers_stay_valid_floats(http):
    assert complete(http, temperature=1, top_p=1, seed=3).status_code == 200


# ----------------------------------------------------------------------------- minor: tools, messages

@pytest.mark.parametrize("body,param", [
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
])
def test_tool_choice_is_refused_like_tools(http, body, param):
    assert_400(chat(http, [USER], **body), param, "not supported")


def test_tool_choice_none_asks_for_what_is_served(http):
    assert chat(http, [USER], tool_choice="none").status_code == 200


def test_assistant_tool_calls_and_messages_without_content_are_400(http):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert_400(chat(http, [USER, call, USER]), "messages.1.tool_calls", "tool_calls is not supported")
    assert_400(chat(http, [{"role": "user"}]), "messages.0.content", "a user message needs content")
    assert_400(chat(http, [{"role": "user", "content": None}]), "messages.0.content", "needs content")
    assert_400(chat(http, [{"role": "system", "content": "be brief"}, {"role": "user", "content": []}]),
               "messages.1.content", "needs content")
    assert_400(chat(http, [USER, {"role": "assistant"}, USER]), "messages.1.content", "an assistant message")


# ----------------------------------------------------------------------------- minor: bodies

def test_a_body_that_is_not_json_is_named_as_the_body(http):
    r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers=J)
    assert_400(r, None, "the request body is not valid JSON: Expecting value (at character 28)")
    r = http.post("/v1/chat/completions", content=b"model=tiny", headers=J)
    assert_400(r, None, "not valid JSON")


def test_bytes_that_are_not_utf8_are_named_by_their_field(http):
    r = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "caf\xe9"}', headers=J)
    assert_400(r, "prompt", "prompt: invalid text: not valid UTF-8 (byte 0xe9 at offset 32")
    r = http.post("/v1/chat/completions", headers=J, content=b'{"model": "tiny", "messages": '
                  b'[{"role": "user", "content": "ok"}, {"role": "user", "content": "\xff"}]}')
    assert_400(r, "messages.1.content", "not valid UTF-8")
    r = http.post("/v1/completions", content=b'\xfe\xff{"model": "tiny"}', headers=J)
    assert_400(r, None, "the request body is not valid UTF-8 (byte 0xfe at offset 0)")


def test_a_full_queue_says_when_to_retry(live, http, monkeypatch):
    def full(job):
        raise queue.Full
    monkeypatch.setattr(live.engine.queue, "put_nowait", full)
    r = complete(http)
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert r.headers["Retry-After"] == "1"
    monkeypatch.undo()
    assert complete(http).status_code == 200


# ----------------------------------------------------------------------------- items 2, 3, 12, minor: adapters

@pytest.mark.parametrize("name,fragment", [
    ("dora", "cannot be served next to other adapters: it is a DoRA adapter (use_dora: True)"),
    ("modules_to_save", "cannot be served next to other adapters: it replaces whole base modules "
                        "(modules_to_save: ['lm_head'])"),
    ("r16", "its config and weights do not belong together: adapter_config.json says r=16 but tensor "
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight has rank 4 (shape (4, 64))"),
    ("escape", "lora_path 'escape': adapter_model.safetensors is a link to a file outside the adapters folder"),
])
def test_adapters_that_cannot_be_served_are_400_and_nothing_changes(http, name, fragment):
    before = [complete(http, model=m).json()["choices"][0]["text"] for m in ("tiny", "good")]
    r = http.post("/v1/load_lora_adapter", json={"lora_name": name})
    assert_400(r, "lora_path", fragment)
    assert [complete(http, model=m).json()["choices"][0]["text"] for m in ("tiny", "good")] == before
    assert http.get("/health").json()["status"] == "ok" and http.get("/health/live").status_code == 200
    assert name not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_a_link_inside_the_adapters_folder_loads(http):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "inside"})
    assert r.status_code == 200, r.text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "inside"}).status_code == 200


def test_models_show_no_folder_of_the_server(live, http):
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": "good2"}).status_code == 200
    try:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert cards["tiny"]["root"] == "tiny" and cards["tiny"]["parent"] is None
        assert cards["good"]["root"] == "good" and cards["second"]["root"] == "good2"  # as lora_path takes it
        assert cards["elsewhere"]["root"] is None  # loaded from outside --adapters-dir
        assert all(m["parent"] == "tiny" for k, m in cards.items() if k != "tiny")
        text = http.get("/v1/models").text
        assert str(live.root) not in text and str(live.outside) not in text
    finally:
        http.post("/v1/unload_lora_adapter", json={"lora_name": "second"})


# ----------------------------------------------------------------------------- items 10, 11, minor: task endpoint

@pytest.mark.parametrize("task,text", [
    ("shopbench_task2", "9" * 4301 + ". a very long option number\n0. a\n1. b\nAnswer: "),  # multiple choice
    ("shopbench_task3", "Which one?\n1. a\n2. b\n" + "1" * 4301 + ". c\nOutput: "),  # retrieval
    ("shopbench_task12", "Rank them.\n1. a\n" + "2" * 5000 + ". b\n"),  # ranking
])
def test_a_line_with_a_huge_number_is_400(http, task, text):
    r = http.post(f"/v1/tasks/{task}", json={"input": {"input_field": text}})
    assert_400(r, "input.input_field", "starts with a")
    assert "-digit number; numbered lines (options, candidates) may start with at most 40 digits" in r.text


@pytest.mark.parametrize("task,inp,named", [
    ("shopbench_task2", {"input_field": "q\n0. a\n1. b\nAnswer: ", "options": ["x", "y"]}, "`options`"),
    ("shopbench_task3", {"input_field": "q\n1. a\n2. b\nOutput: ", "question": "q", "candidates": ["x", "y"]},
     "`candidates`, `question`"),
    ("shopbench_task4", {"input_field": "Query: asus laptop", "text": "asus laptop"}, "`text`"),
])
def test_input_field_with_structured_fields_is_400(http, task, inp, named):
    r = http.post(f"/v1/tasks/{task}", json={"input": inp})
    assert_400(r, "input", f"give `input_field` or the structured fields, not both (got `input_field` and {named})")


def test_a_listed_candidate_with_a_30_digit_number_can_be_the_answer(http):
    big = 123456789012345678901234567890
    r = http.post("/v1/tasks/shopbench_task3", json={"model": "tiny", "input": {
        "input_field": f"Which product is a running shoe?\n{big}. trail running shoe\nOutput: "}})
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == [big]  # the one listed number, whole (not 9999999999999999)
    r = http.post("/v1/tasks/shopbench_task3", json={"model": "tiny", "input": {
        "input_field": f"Which product is a running shoe?\n1. hat\n{big}. trail running shoe\n7. bag\nOutput: "}})
    assert r.status_code == 200 and set(r.json()["answer"]) <= {1, 7, big}, r.text
