"""Issue #20's gateway cases in one scripted run: a real `shoptune serve --upstream` subprocess in
front of a misbehaving fake vLLM (tests/serve/fake_upstream.py), then normal traffic through the
official openai client, which must get the right answers.

    SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\
        .venv/bin/python -m pytest -q tests/serve/test_adversarial_gateway.py

With SHOPTUNE_HARDENING_REPORT set, the run's table is written to its "gateway" section.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import pytest

from shoptune.serve.testing import ServerProcess
from tests.hardening_report import machine_line, table, write_section
from tests.serve.fake_upstream import FakeUpstream

pytestmark = pytest.mark.slow
KEY, UP_KEY = "sk-gw-adversarial", "up-secret-key-98765"
AUTH = {"Authorization": f"Bearer {KEY}"}
RETRIEVAL, RANKING, CHOICE = "shopbench_task3", "shopbench_task12", "shopbench_task2"
HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_BYTES = 2, 64, 1 << 20
COMMAND = ("SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\\n"
           "    .venv/bin/python -m pytest -q tests/serve/test_adversarial_gateway.py")


@pytest.fixture(scope="module")
def tok():
    from shoptune.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    log = tmp_path_factory.mktemp("adversarial-gateway") / "gateway.log"
    os.environ["SHOPTUNE_TEST_UPSTREAM_KEY"] = UP_KEY
    with FakeUpstream("vllm", tok, api_key=UP_KEY) as up:
        gw = ServerProcess(["--upstream", up.url, "--upstream-api-key-env", "SHOPTUNE_TEST_UPSTREAM_KEY",
                            "--api-key", KEY, "--header-timeout", str(HEADER_TIMEOUT),
                            "--max-connections", str(MAX_CONNECTIONS), "--upstream-max-bytes", str(MAX_BYTES),
                            "--max-new-tokens", "64", "--log-level", "info"], log, startup_timeout=120)
        yield gw, up, log
        gw.stop()
    os.environ.pop("SHOPTUNE_TEST_UPSTREAM_KEY", None)


class Recorder:
    def __init__(self, url: str):
        self.url, self.rows = url, []
        self.http = httpx.Client(base_url=url, timeout=60)

    def __call__(self, item, case, method, path, *, expect, fragment="", shown=None, headers=None, **kw):
        r = self.http.request(method, path, headers=headers or AUTH, **kw)
        self.note(item, case, shown or f"{method} {path}", r.status_code, message(r))
        assert r.status_code == expect, (case, r.status_code, r.text[:500])
        assert fragment in r.text, (case, r.text[:500])
        assert UP_KEY not in r.text, (case, r.text[:500])
        return r

    def stream(self, item, case, path, body, *, fragment):
        """A streamed request whose upstream breaks after the status line was sent."""
        with self.http.stream("POST", path, json={**body, "stream": True}, headers=AUTH) as s:
            status, text = s.status_code, "".join(s.iter_text())
        events = [x[6:] for x in text.split("\n\n") if x.startswith("data: ")]
        errors = [json.loads(e)["error"]["message"] for e in events if e.startswith('{"error"')]
        deltas = "".join(c["text"] for e in events if e.startswith('{"id"') for c in json.loads(e)["choices"])
        self.note(item, case, f"POST {path} (stream)", f"{status} SSE",
                  f"deltas {deltas!r}, then error event: {errors[0] if errors else '-'}; then [DONE]")
        assert status == 200 and events[-1] == "[DONE]" and errors and fragment in errors[0], text
        assert '"finish_reason":"stop"' not in text.replace(" ", "") and UP_KEY not in text
        return deltas

    def note(self, item, case, request, status, msg):
        self.rows.append((item, case, request, status, msg))


def message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        return f"[param {err['param']}] {err['message']}" if err.get("param") else err["message"]
    return f"answer {body['answer']}" if isinstance(body, dict) and "answer" in body else "ok"


def cli(args: list[str], env: dict | None = None) -> tuple[int, str]:
    from typer.testing import CliRunner

    from shoptune.cli import app
    res = CliRunner().invoke(app, args, env=env)
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert "Traceback" not in res.output, res.output
    return res.exit_code, (lines[-1] if lines else "")


def question(*numbers: int) -> dict:
    lines = "".join(f"{n}. item {n}\n" for n in numbers)
    return {"input": {"input_field": f"Pick the 3 best for 'red shoes'.\n{lines}Output: "}}


def test_adversarial_gateway_sequence_then_normal_traffic(setup, tok):
    gw, up, log = setup
    rec = Recorder(gw.url)
    cmpl = {"model": "alpha", "prompt": "Shoes are", "max_tokens": 4}
    rec("-", "normal completion before the run", "POST", "/v1/completions", json=cmpl, expect=200)

    # 6: API keys
    for args, env, shown in ((["--api-key", ""], None, 'shoptune serve --api-key ""'),
                             (["--api-key", " "], None, 'shoptune serve --api-key " "'),
                             ([], {"SHOPTUNE_API_KEY": ""}, "SHOPTUNE_API_KEY= shoptune serve")):
        code, line = cli(["serve", "--upstream", up.url, *args], env)
        rec.note(6, "empty API key at start", shown, f"exit {code}", line)
        assert code == 1 and line.startswith("error:") and "empty" in line
    for header, expect, case in ((b"Bearer \xa0", 401, "Bearer <no-break space>"),
                                 (f"Bearer {KEY}\xa0".encode("latin-1"), 401, "Bearer KEY<no-break space>"),
                                 (f"Bearer {KEY[:-1]}".encode(), 401, "Bearer KEY minus its last character"),
                                 (f"bearer {KEY}".encode(), 200, "bearer KEY (scheme in lower case)")):
        rec(6, case, "GET", "/v1/models", headers={"Authorization": header}, expect=expect)

    # 4: number-list constraints that do not grow with the numbers' values
    latencies, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            while not done.is_set():
                t0 = time.monotonic()
                c.get("/health")
                latencies.append(time.monotonic() - t0)
                time.sleep(0.01)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        while not latencies:
            time.sleep(0.01)
        up.numbers_answer = "10000000, 2, 1"
        r = rec(4, "retrieval, a candidate numbered 10000000", "POST", f"/v1/tasks/{RETRIEVAL}",
                json=question(1, 2, 10_000_000), expect=200)
        assert r.json()["answer"] == [10_000_000, 2, 1]
        size10m = up.body_sizes[-1]
        up.numbers_answer = "2, 1, 3"
        rec(4, "retrieval, a 30-digit candidate", "POST", f"/v1/tasks/{RETRIEVAL}",
            json=question(1, 2, 3, 10 ** 29 + 5), expect=200)
        size30 = up.body_sizes[-1]
        time.sleep(0.1)
    finally:
        done.set()
        poller.join()
    rec.note(4, "request bodies sent upstream (were 236 MB for 10**7)", "-", "-",
             f"{size10m} and {size30} bytes; /health answered {len(latencies)} times meanwhile, "
             f"slowest {max(latencies) * 1000:.0f} ms")
    assert max(size10m, size30) < 8000 and max(latencies) < 1.0
    rec(4, "retrieval, a 60-digit candidate", "POST", f"/v1/tasks/{RETRIEVAL}", json=question(1, 10 ** 59),
        expect=400, fragment="at most 40 digits")

    # 7: broken upstream replies
    choice_q = {"input": {"question": "Which is red?", "options": ["apple", "sky"]}}
    for mode, fragment in (("text", "not an event stream"), ("json-list", "not an event stream"),
                           ("sse-list", "a JSON list"), ("sse-not-json", "not JSON"),
                           ("cut", "cut short"), ("abort", "'abort'")):
        up.misbehave_next = mode
        rec(7, f"upstream stream: {mode}", "POST", "/v1/completions", json=cmpl, expect=502, fragment=fragment)
    for mode, fragment in (("text", "not JSON"), ("json-list", "a JSON list")):
        up.misbehave_next = mode
        rec(7, f"upstream non-streamed (choice): {mode}", "POST", f"/v1/tasks/{CHOICE}", json=choice_q,
            expect=502, fragment=fragment)
    up.misbehave_next = "cut"
    rec.stream(7, "client stream, upstream stream cut after two tokens", "/v1/completions", cmpl,
               fragment="cut short")

    # 8: secrets echoed by the upstream
    for mode, expect in (("echo-auth", 400), ("echo-auth-500", 502)):
        up.misbehave_next = mode
        rec(8, f"upstream {expect if mode == 'echo-auth' else 500} echoing the Authorization header",
            "POST", "/v1/completions", json=cmpl, expect=expect, fragment="[redacted]")
    up.misbehave_next = "echo-auth-stream"
    rec.stream(8, "client stream, in-band upstream error echoing the header", "/v1/completions", cmpl,
               fragment="Bearer [redacted]")

    # 9: unbounded replies
    up.huge_bytes = 300 << 20
    for path, body, shown in ((f"/v1/tasks/{CHOICE}", choice_q, "300 MB non-streamed reply (choice)"),
                              ("/v1/completions", cmpl, "300 MB in one stream event")):
        up.misbehave_next = "huge"
        t0 = time.monotonic()
        rec(9, shown, "POST", path, json=body, expect=502, fragment="larger than 1048576 bytes")
        assert time.monotonic() - t0 < 10
    up.misbehave_next = "endless"
    rec(9, "stream ignoring max_tokens (endless)", "POST", "/v1/completions", json=cmpl, expect=502,
        fragment="ignores max_tokens")
    up.misbehave_next = "usage-bomb"
    r = rec(9, "usage claiming 10**12 completion tokens", "POST", "/v1/completions", json=cmpl, expect=200)
    assert r.json()["usage"]["completion_tokens"] == 1

    # 13: an upstream whose /v1/models is a JSON list
    with FakeUpstream("vllm", tok) as bad:
        bad.models_reply = "list"
        code, line = cli(["serve", "--upstream", bad.url])
    rec.note(13, "upstream /v1/models answers a JSON list", "shoptune serve --upstream URL", f"exit {code}", line)
    assert code == 1 and "JSON list" in line

    # 5: slowloris against the gateway
    socks = []
    try:
        for i in range(5 * MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            if i % 2 == 0:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(s)
        t0 = time.monotonic()
        h = httpx.get(gw.url + "/health", timeout=10)
        took = time.monotonic() - t0
        rec.note(5, f"/health with {len(socks)} idle and half-header connections open", "GET /health",
                 h.status_code, f"answered in {took * 1000:.0f} ms")
        assert h.status_code == 200 and took < 1.0
        time.sleep(HEADER_TIMEOUT + 1)
        left = sum(not _closed(s) for s in socks)
        rec.note(5, f"those connections {HEADER_TIMEOUT + 1} s later (--header-timeout {HEADER_TIMEOUT}, "
                    f"--max-connections {MAX_CONNECTIONS})", "-", "-", f"{left} of {len(socks)} still open")
        assert left == 0
    finally:
        for s in socks:
            s.close()

    # the end: healthy, quiet log, normal traffic with the right answers
    rec.http = httpx.Client(base_url=gw.url, timeout=60)  # (its connection was among the idle ones)
    for path in ("/health", "/health/live", "/health/ready"):
        rec("-", f"{path} at the end", "GET", path, expect=200)
    text = log.read_text()
    polls = sum("GET" in x and "/health" in x and up.url in x for x in text.splitlines())
    rec.note("minor", "upstream health polls in the gateway log (--log-level info; one every 2 s)",
             "-", "-", f"{polls} lines")
    assert polls == 0, text[-2000:]
    answers = normal_traffic(gw, up)
    assert not [r for r in rec.rows if r[3] == 500]
    text = log.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]
    assert UP_KEY not in text
    report(rec.rows, answers)


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, BlockingIOError):
        return False


def normal_traffic(gw, up) -> list[tuple[str, str]]:
    from openai import OpenAI
    client = OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    seen = []
    assert [m.id for m in client.models.list().data] == ["smollm2-135m", "alpha", "beta"]
    r = client.completions.create(model="alpha", prompt="Shoes are", max_tokens=3, temperature=0)
    assert r.choices[0].text == " alpha alpha alpha" and r.choices[0].finish_reason == "length"
    seen.append(("completions, alpha", r.choices[0].text))
    chunks = list(client.completions.create(model="beta", prompt="x", max_tokens=4, stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == " beta beta beta beta"
    seen.append(("completions, beta, streamed", text))
    chat = client.chat.completions.create(model="smollm2-135m", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == " base base"
    seen.append(("chat, base model", chat.choices[0].message.content))
    up.numbers_answer = "3, 1, 2, 5, 4"
    r = client.post(f"/tasks/{RANKING}", cast_to=object, body={"input": {
        "question": "Rank for 'red shoes'.", "candidates": ["a", "b", "c", "d", "e"]}})
    assert r["answer"] == [3, 1, 2, 5, 4]
    seen.append(("task endpoint, ranking", str(r["answer"])))
    return seen


def report(rows, answers) -> None:
    lines = [
        "## Gateway: the adversarial run", "",
        "Issue #20's gateway and server-option cases replayed in one sequence against a real",
        "`shoptune serve --upstream` (in front of a fake vLLM that misbehaves on request, "
        f"`--header-timeout {HEADER_TIMEOUT} --max-connections {MAX_CONNECTIONS} "
        f"--upstream-max-bytes {MAX_BYTES}`), then normal traffic through the official `openai` client.",
        "When a streamed upstream reply breaks after the client's stream started, the client gets the",
        "deltas already sent, then an error event (`data: {\"error\": {...}}`, as vLLM sends) and",
        "`data: [DONE]`, never a `finish_reason` of `stop`; the `openai` client raises `APIError`.", "",
        "```bash", COMMAND, "```", "", machine_line(), "",
    ]
    lines += table(["item", "case", "request", "status", "message"], rows)
    lines += ["", "Normal traffic afterwards (official `openai` client; the fake's deterministic answers):", ""]
    lines += [f"- {what}: `{text.strip()}`" for what, text in answers]
    lines += ["", "No 500, no traceback and no upstream key in the gateway's log or in any reply."]
    write_section("gateway", lines)
