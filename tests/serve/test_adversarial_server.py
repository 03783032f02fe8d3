"""Issue #20's cases against the built-in server, in one scripted run: a real `shoptune serve`
(SmolLM2-135M, float32) with adapters loaded at start and at run time, every case replayed in
sequence (huge seeds alone and next to normal requests in flight, adapters peft cannot batch per
row, a config over weights of another rank, a link out of --adapters-dir, the task endpoint's huge
numbers and mixed inputs, loose types, tools asked for in other words, bodies that are not JSON or
not UTF-8, a full queue), then normal traffic through the official openai client, whose answers
must equal plain peft's greedy output.

    SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\
        .venv/bin/python -m pytest -q tests/serve/test_adversarial_server.py

With SHOPTUNE_HARDENING_REPORT set, the run's table is written to its "server" section.
"""
import json
import os
import shutil
import threading
import time

import httpx
import pytest

from tests.serve.conftest import KEY, Server
from tests.serve.test_adversarial import Recorder

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
J = {"Content-Type": "application/json"}
MAX_QUEUE = 8
PROMPT = "The best running shoe is"
COMMAND = ["SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\",
           "    .venv/bin/python -m pytest -q tests/serve/test_adversarial_server.py"]


@pytest.fixture(scope="module")
def setup(adapters, tmp_path_factory):
    from shoptune.models import resolve
    from shoptune.serve.testing import make_tiny_lora

    base = resolve("smollm2-135m")
    root = tmp_path_factory.mktemp("server-adapters")
    shutil.copytree(adapters["beta"], root / "beta")
    make_tiny_lora(base, root / "dora", seed=11, use_dora=True)
    make_tiny_lora(base, root / "modules_to_save", seed=12, modules_to_save=["lm_head"])
    shutil.copytree(adapters["beta"], root / "r16")  # an r=16 config over the r=4 tensors
    cfg = json.loads((root / "r16" / "adapter_config.json").read_text())
    (root / "r16" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapters["beta"], outside / "beta")
    (root / "escape").mkdir()  # a good config whose weights are a link out of --adapters-dir
    shutil.copy(adapters["beta"] / "adapter_config.json", root / "escape")
    os.symlink(outside / "beta" / "adapter_model.safetensors", root / "escape" / "adapter_model.safetensors")
    log = tmp_path_factory.mktemp("adversarial-server") / "server.log"
    # float32: the answers must equal plain peft token for token (bf16 kernels round near ties
    # apart between batched and single runs on some CPUs)
    s = Server(["--adapter", f"alpha={adapters['alpha']}", "--adapters-dir", str(root), "--api-key", KEY,
                "--max-queue", str(MAX_QUEUE), "--max-new-tokens", "64", "--max-wait-ms", "20",
                "--dtype", "float32"], log)
    yield s, root
    s.stop()
    text = log.read_text()  # no request of the run may have hit an internal error
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text


def test_adversarial_server_sequence_then_normal_traffic(setup, adapters, tiny, tmp_path):
    server, root = setup
    http = httpx.Client(base_url=server.url, timeout=120)
    rec = Recorder(http)
    cmpl = {"model": "alpha", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    alone = {m: rec("-", f"{m} answers alone (the reference for below)", "POST", "/v1/completions",
                    json={**cmpl, "model": m}, expect=200).json()["choices"][0]["text"]
             for m in ("alpha", "smollm2-135m")}

    # 1: huge seeds, alone and next to normal requests in flight; /health polled all along
    health, stop = [], threading.Event()

    def poll():
        with httpx.Client(base_url=server.url, timeout=30) as h:
            while not stop.is_set():
                health.append(h.get("/health").status_code)
                time.sleep(0.02)
    poller = threading.Thread(target=poll)
    poller.start()
    huge = [("seed 2**64", {"seed": 2**64}), ("seed 2**64-1, n=2", {"seed": 2**64 - 1, "n": 2}),
            ("seed -2**63-1", {"seed": -2**63 - 1})]
    sampled = {**cmpl, "temperature": 1.0}
    for label, extra in huge:
        rec(1, f"{label}, alone", "POST", "/v1/completions", json={**sampled, **extra}, expect=400,
            fragment="seed: Input should be")
    for label, extra in huge + [("seed 2**63-1 (the largest), n=2", {"seed": 2**63 - 1, "n": 2})]:
        normal = {}

        def send(m):
            normal[m] = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=120,
                                   json={**cmpl, "model": m})
        threads = [threading.Thread(target=send, args=(m,)) for m in alone]
        for t in threads:
            t.start()
        ok = "largest" in label
        rec(1, f"{label}, with two normal requests in flight", "POST", "/v1/completions",
            json={**sampled, **extra}, expect=200 if ok else 400)
        for t in threads:
            t.join()
        for m, r in normal.items():
            rec.note(1, f"... the normal {m} request next to it: same answer as alone", "POST /v1/completions", r)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone[m], r.text
    stop.set()
    poller.join()
    rec.rows.append((1, f"/health polled {len(health)} times during the seed cases", "GET /health",
                     "/".join(sorted({str(c) for c in health})), "ok" if set(health) == {200} else "FLAPPED"))
    assert set(health) == {200}

    # 2, 3, 12, minor: adapters the engine cannot serve, refused before they reach the model
    for item, name, fragment in (
            (2, "modules_to_save", "it replaces whole base modules (modules_to_save: ['lm_head'])"),
            (3, "dora", "it is a DoRA adapter (use_dora: True)"),
            (12, "r16", "adapter_config.json says r=16 but tensor"),
            ("minor", "escape", "adapter_model.safetensors is a link to a file outside the adapters folder")):
        rec(item, f"load {name}", "POST", "/v1/load_lora_adapter", json={"lora_name": name}, expect=400,
            fragment=fragment)
        for m in alone:
            r = rec(item, f"... then {m}: same answer", "POST", "/v1/completions", json={**cmpl, "model": m},
                    expect=200)
            assert r.json()["choices"][0]["text"] == alone[m]
    rec(3, "load beta (a plain LoRA) at run time", "POST", "/v1/load_lora_adapter",
        json={"lora_name": "beta"}, expect=200)
    models = rec("minor", "/v1/models: adapters' root relative to --adapters-dir or none", "GET", "/v1/models",
                 expect=200).json()["data"]
    roots = {m["id"]: m["root"] for m in models}
    assert roots == {"smollm2-135m": "smollm2-135m", "alpha": None, "beta": "beta"}, roots
    rec.rows[-1] = (*rec.rows[-1][:4], "roots: " + ", ".join(f"{k}={v}" for k, v in roots.items()))
    for path in ("/health", "/health/live"):
        rec(2, f"{path} after the refused loads", "GET", path, expect=200)

    # 10, 11: the task endpoint
    rec(10, "task line starting with a 4,301-digit number (multiple choice)", "POST",
        "/v1/tasks/shopbench_task2", expect=400, fragment="4301-digit number",
        json={"input": {"input_field": "9" * 4301 + ". a\n0. b\n1. c\nAnswer: "}})
    rec(10, "task line starting with a 4,301-digit number (retrieval)", "POST", "/v1/tasks/shopbench_task3",
        expect=400, fragment="4301-digit number",
        json={"input": {"input_field": "Which?\n1. a\n" + "1" * 4301 + ". b\nOutput: "}})
    rec(11, "task: input_field with options", "POST", "/v1/tasks/shopbench_task2", expect=400,
        fragment="not both", json={"input": {"input_field": "q\n0. a\n1. b\nAnswer: ", "options": ["x", "y"]}})
    rec(11, "task: input_field with question and candidates", "POST", "/v1/tasks/shopbench_task3",
        expect=400, fragment="not both",
        json={"input": {"input_field": "q\n1. a\nOutput: ", "question": "q", "candidates": ["x", "y"]}})
    big = 123456789012345678901234567890
    r = rec("minor", "retrieval: the listed candidate is numbered with 30 digits", "POST",
            "/v1/tasks/shopbench_task3", expect=200, json={"model": "smollm2-135m", "input": {
                "input_field": f"Which product is a running shoe?\n{big}. trail running shoe\nOutput: "}})
    assert r.json()["answer"] == [big]
    rec.rows[-1] = (*rec.rows[-1][:4], f"answer {r.json()['answer']}")

    # minor: loose types, tools in other words, messages without content, bodies
    for label, body, param in (('"n": "2"', {"n": "2"}, "n"), ('"echo": "yes"', {"echo": "yes"}, "echo"),
                               ("prompt [true, false]", {"prompt": [True, False]}, "prompt")):
        rec("minor", label, "POST", "/v1/completions", json={**cmpl, **body}, expect=400, fragment=f"{param}: ")
    user = {"role": "user", "content": "Name one fruit."}
    chat = {"model": "alpha", "max_tokens": 4, "messages": [user]}
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    for label, body, fragment in (
            ('tool_choice "auto" (no tools)', {**chat, "tool_choice": "auto"}, "tool_choice is not supported"),
            ("assistant message with tool_calls", {**chat, "messages": [user, call, user]}, "messages.1.tool_calls"),
            ("user message without content", {**chat, "messages": [{"role": "user"}]}, "a user message needs content")):
        rec("minor", label, "POST", "/v1/chat/completions", json=body, expect=400, fragment=fragment)
    rec("minor", 'tool_choice "none"', "POST", "/v1/chat/completions", json={**chat, "tool_choice": "none"},
        expect=200)
    rec("minor", "body that is not JSON", "POST", "/v1/completions", content=b'{"model": "alpha", "prompt": ',
        headers=J, expect=400, fragment="the request body is not valid JSON")
    rec("minor", "prompt with bytes that are not UTF-8", "POST", "/v1/completions", headers=J, expect=400,
        content=b'{"model": "alpha", "prompt": "caf\xe9"}', fragment="prompt: invalid text: not valid UTF-8")
    rec("minor", "body that is not UTF-8 at all", "POST", "/v1/completions", headers=J, expect=400,
        content=b'\xff\xfe{"model": "alpha"}', fragment="the request body is not valid UTF-8")

    # minor: a full queue answers 429 with Retry-After (one batch of 8 running, 8 more waiting)
    fill = {**cmpl, "n": MAX_QUEUE, "max_tokens": 64}
    held = {}

    def occupy(key):
        held[key] = httpx.post(server.url + "/v1/completions", headers=AUTH, json=fill, timeout=300)

    def wait_for(metric, value):
        deadline = time.monotonic() + 30
        while f"{metric} {value:.1f}" not in http.get("/metrics").text and time.monotonic() < deadline:
            time.sleep(0.005)
    threads = [threading.Thread(target=occupy, args=(k,)) for k in ("running", "queued")]
    threads[0].start()
    wait_for("shoptune_running_requests", MAX_QUEUE)  # taken into a batch: the queue is empty again
    threads[1].start()
    wait_for("shoptune_queue_depth", MAX_QUEUE)
    r = rec("minor", f"one more request while {MAX_QUEUE} run and {MAX_QUEUE} wait", "POST", "/v1/completions",
            json=cmpl, expect=429, fragment="queue is full")
    assert r.headers["Retry-After"] == "1"
    rec.rows[-1] = (*rec.rows[-1][:4], f"Retry-After: {r.headers['Retry-After']}; {rec.rows[-1][4]}")
    for t in threads:
        t.join()
    assert held["running"].status_code == 200 and held["queued"].status_code == 200

    # 12: the CLI says the same about a rank mismatch (a tiny base, in process)
    from typer.testing import CliRunner

    from shoptune.cli import app
    from tests.conftest import mc, write_jsonl
    r16 = tmp_path / "r16"
    shutil.copytree(tiny["good"], r16)
    cfg = json.loads((r16 / "adapter_config.json").read_text())
    (r16 / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny["base"]), "--adapter", str(r16),
                                   "--data", str(write_jsonl(tmp_path / "q.jsonl", [mc()])),
                                   "--out", str(tmp_path / "o")])
    line = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert res.exit_code == 1 and len(line) == 1 and "says r=16 but tensor" in line[0], res.output
    rec.rows.append((12, "shoptune eval --adapter with an r=16 config over r=4 tensors", "shoptune eval",
                     f"exit {res.exit_code}", line[0].replace(str(tmp_path), "…")))

    for path in ("/health", "/health/ready", "/health/live"):
        rec("-", f"{path} at the end", "GET", path, expect=200)
    assert not [row for row in rec.rows if row[3] == 500]
    answers = normal_traffic(server, adapters)
    report(rec.rows, answers)


def normal_traffic(server, adapters) -> list[tuple[str, str]]:
    import torch
    from openai import OpenAI
    from peft import PeftModel

    from shoptune.models import load
    from shoptune.serve.testing import greedy_reference

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
    model, tok = load("smollm2-135m", dtype="fp32")  # as the server
    pm = PeftModel.from_pretrained(model, str(adapters["alpha"]), adapter_name="alpha")
    pm.load_adapter(str(adapters["beta"]), adapter_name="beta")
    pm.eval()
    seen = []
    for name, adapter in (("smollm2-135m", None), ("alpha", "alpha"), ("beta", "beta")):
        r = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, n=2)
        want = greedy_reference(pm, tok, adapter, PROMPT, 12)
        assert [c.text for c in r.choices] == [want, want], name
        stream = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == want
        seen.append((f"completions, {name}, n=2 and streamed", want))
    msgs = [{"role": "user", "content": "Name one fruit."}]
    chat = client.chat.completions.create(model="beta", messages=msgs, max_tokens=10, temperature=0)
    ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
              return_tensors="pt", add_special_tokens=False)
    pm.set_adapter("beta")
    with torch.inference_mode():
        out = pm.generate(**ids, max_new_tokens=10, do_sample=False)
    want = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert chat.choices[0].message.content == want
    seen.append(("chat, beta", want))
    return seen


def report(rows, answers) -> None:
    from tests.hardening_report import cell, machine_line, table, write_section
    lines = [
        "## The built-in server, second pass", "",
        "Issue #20's cases against the built-in `shoptune serve` (SmolLM2-135M, float32, `--adapter alpha`,",
        f"`--adapters-dir`, `--max-queue {MAX_QUEUE}`), replayed in one scripted sequence, then normal traffic",
        "through the official `openai` client, whose answers must equal plain peft's greedy output",
        "(float32, where that equality is defined). Each item also has its own test that failed before the fix.",
        "", "```bash", *COMMAND, "```", "", machine_line(), "",
        *table(["item", "case", "request", "status", "message"], rows),
        "", "Normal traffic afterwards (official `openai` client; every answer equals plain peft's):", "",
        *[f"- {what}: `{cell(text.strip())}`" for what, text in answers],
        "", "No 500, and no `Traceback` or `Exception in ASGI application` in the server log during the run.",
    ]
    write_section("server", lines)
