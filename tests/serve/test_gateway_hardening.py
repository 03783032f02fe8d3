"""The gateway against a hostile or broken upstream (issue #20, items 4, 6-9, 13): the real app
over :class:`UpstreamEngine` under uvicorn, in front of tests/serve/fake_upstream.py."""
from __future__ import annotations

import re
import threading
import time

import httpx
import openai
import pytest

from shoptune.serve.upstream import UpstreamEngine, UpstreamError, number_list_gbnf, number_list_regex
from shoptune.serve.upstream_wire import MAX_NUMBER_DIGITS, ConstraintTooLarge

from tests.serve.fake_upstream import FakeUpstream
from tests.serve.test_gateway import KEY, Gateway, completions

UP_KEY = "up-secret-key-1234"
RETRIEVAL = "shopbench_task3"


@pytest.fixture(scope="module")
def tok():
    from shoptune.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


@pytest.fixture()
def vllm(tok):
    with FakeUpstream("vllm", tok, api_key=UP_KEY) as up:
        yield up


@pytest.fixture()
def gw(vllm, tok):
    g = Gateway(vllm.url, tok, api_key=UP_KEY, max_reply_bytes=1 << 20)
    yield g
    g.close()


def question(*numbers: int) -> dict:
    lines = "".join(f"{n}. item {n}\n" for n in numbers)
    return {"input": {"input_field": f"Pick the 3 best for 'red shoes'.\n{lines}Output: "}}


def gbnf_as_regex(gbnf: str) -> str:
    """Our GBNF's rules as one Python regex (quoted literals unquoted, `num` inlined)."""
    def rx(rule: str) -> str:
        return "".join(t[1:-1] if t.startswith('"') else t for t in re.findall(r'"[^"]*"|[^\s"]+', rule))
    rules = dict(line.split(" ::= ", 1) for line in gbnf.strip().splitlines())
    return rx(rules["root"]).replace("num", f"({rx(rules.get('num', ''))})")


# ----------------------------------------------------------------------------- item 4

@pytest.mark.parametrize("max_value,limit", [(10 ** 7, 120), (10 ** 30 - 7, 4000), (10 ** MAX_NUMBER_DIGITS - 1, 9000)])
def test_number_constraints_grow_with_digits_not_values(max_value, limit):
    t0 = time.perf_counter()
    rx, gbnf = number_list_regex(max_value, 3, False), number_list_gbnf(max_value, 3, False)
    assert time.perf_counter() - t0 < 0.05
    assert len(rx) < limit and len(gbnf) < limit, (len(rx), len(gbnf))
    for pattern in (rx, gbnf_as_regex(gbnf)):
        full = re.compile(pattern)
        top = str(max_value)
        for ok in ("1, 2, 3", f"{top}, 1, {int(top) - 1}", f"9, {'9' * (len(top) - 1)}, 10"):
            assert full.fullmatch(ok), (ok, pattern[:200])
        for bad in (f"{max_value + 1}, 1, 2", "0, 1, 2", "01, 1, 2", "1, 2", "1, 2, 3, 4", "1,2,3"):
            assert not full.fullmatch(bad), (bad, pattern[:200])


def test_gbnf_and_regex_allow_the_same_numbers():
    for top in range(1, 130):
        rx, gbnf = re.compile(number_list_regex(top, 1, False)), re.compile(gbnf_as_regex(number_list_gbnf(top, 1, False)))
        for v in range(0, top + 30):
            assert bool(rx.fullmatch(str(v))) == bool(gbnf.fullmatch(str(v))) == (1 <= v <= top), (top, v)


def test_number_constraint_above_the_digit_limit_is_a_400():
    for value in (10 ** MAX_NUMBER_DIGITS, 10 ** 5000):
        with pytest.raises(ConstraintTooLarge) as e:
            number_list_regex(value, 3, False)
        assert e.value.status == 400 and f"at most {MAX_NUMBER_DIGITS} digits" in e.value.message


def test_candidate_ten_million_is_answered_while_health_stays_responsive(gw, vllm):
    latencies, done = [], threading.Event()

    def poll():
        with httpx.Client(base_url=gw.url, timeout=30) as c:
            while not done.is_set():
                t0 = time.monotonic()
                assert c.get("/health").status_code == 200
                latencies.append(time.monotonic() - t0)
                time.sleep(0.01)
    t = threading.Thread(target=poll)
    t.start()
    try:
        vllm.numbers_answer = "10000000, 2, 1"
        r = gw.http.post(f"/v1/tasks/{RETRIEVAL}", json=question(1, 2, 10_000_000))
        r30 = gw.http.post(f"/v1/tasks/{RETRIEVAL}", json=question(1, 2, 10 ** 29 + 5))
        time.sleep(0.2)
    finally:
        done.set()
        t.join()
    assert r.status_code == 200 and r.json()["answer"] == [10_000_000, 2, 1], r.text
    assert r30.status_code == 200, r30.text  # (the fake checks its answer against the regex)
    assert max(vllm.body_sizes[-2:]) < 8000, vllm.body_sizes  # was 236 MB
    assert len(latencies) > 5 and max(latencies) < 1.0, max(latencies)
    regex = completions(vllm)[-2]["structured_outputs"]["regex"]
    assert regex == "([1-9][0-9]{0,6}|10000000)(, ([1-9][0-9]{0,6}|10000000)){2}"
    # a number of more digits than the limit: 400 before anything is sent upstream
    sent = len(completions(vllm))
    r = gw.http.post(f"/v1/tasks/{RETRIEVAL}", json=question(1, 10 ** 60))
    assert r.status_code == 400 and r.json()["error"]["param"] in ("input", "input.input_field"), r.text
    assert "at most 40 digits" in r.json()["error"]["message"] and len(completions(vllm)) == sent


# ----------------------------------------------------------------------------- item 7

CMPL = {"model": "alpha", "prompt": "x", "max_tokens": 4}


@pytest.mark.parametrize("mode,fragment", [
    ("text", "text/plain"), ("json-list", "not an event stream"), ("sse-list", "a JSON list"),
    ("sse-not-json", "not JSON"), ("cut", "without [DONE] or a finish_reason"), ("abort", "'abort'")])
def test_broken_streams_are_502_not_200(gw, vllm, mode, fragment):
    vllm.misbehave_next = mode
    r = gw.http.post("/v1/completions", json=CMPL)
    assert r.status_code == 502, r.text
    assert fragment in r.json()["error"]["message"], r.text
    assert gw.http.post("/v1/completions", json=CMPL).json()["choices"][0]["text"] == " alpha" * 4


@pytest.mark.parametrize("mode,fragment", [("text", "not JSON"), ("json-list", "a JSON list")])
def test_broken_non_streamed_replies_are_502(gw, vllm, mode, fragment):
    """Multiple choice goes upstream as one non-streamed token."""
    vllm.misbehave_next = mode
    r = gw.http.post("/v1/tasks/shopbench_task2", json={"input": {"question": "Red?", "options": ["a", "b"]}})
    assert r.status_code == 502 and fragment in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "upstream_bad_reply"


def test_a_cut_stream_ends_the_clients_stream_with_an_error_never_stop(gw, vllm):
    """What a streaming client sees: the deltas that came, then an error event and [DONE] (as
    vLLM does); no chunk says finish_reason "stop". The openai client raises APIError."""
    vllm.misbehave_next = "cut"
    with gw.http.stream("POST", "/v1/completions", json={**CMPL, "stream": True}) as s:
        assert s.status_code == 200
        events = [x[6:] for x in "".join(s.iter_text()).split("\n\n") if x.startswith("data: ")]
    assert events[-1] == "[DONE]" and '"error"' in events[-2] and "cut short" in events[-2]
    assert '"finish_reason":"stop"' not in "".join(events).replace(" ", "")
    vllm.misbehave_next = "cut"
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIError, match="cut short"):
        for _ in client.completions.create(**CMPL, stream=True):
            pass


# ----------------------------------------------------------------------------- item 8

def test_upstream_key_and_bearer_tokens_are_redacted(gw, vllm):
    vllm.misbehave_next = "echo-auth"
    r = gw.http.post("/v1/completions", json=CMPL)
    assert r.status_code == 400 and UP_KEY not in r.text and "Bearer [redacted]\"" in r.text, r.text
    vllm.misbehave_next = "echo-auth-500"
    r = gw.http.post("/v1/completions", json=CMPL)
    assert r.status_code == 502 and UP_KEY not in r.text and "[redacted]" in r.text, r.text
    vllm.misbehave_next = "echo-auth-stream"
    with gw.http.stream("POST", "/v1/completions", json={**CMPL, "stream": True}) as s:
        text = "".join(s.iter_text())
    assert UP_KEY not in text and "died; Bearer [redacted]\"" in text, text
    from shoptune.serve.upstream_wire import redact
    assert redact("GET http://bob:hunter2@host/v1 Authorization: bearer abc.def") == \
        "GET http://[redacted]@host/v1 Authorization: bearer [redacted]"


# ----------------------------------------------------------------------------- item 9

def test_upstream_replies_are_bounded(gw, vllm):
    vllm.huge_bytes = 300 << 20
    for mode, req in (("huge", ("/v1/tasks/shopbench_task2", {"input": {"question": "Red?", "options": ["a", "b"]}})),
                      ("huge", ("/v1/completions", CMPL))):
        vllm.misbehave_next = mode
        t0 = time.monotonic()
        r = gw.http.post(req[0], json=req[1])
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_reply_too_large", r.text
        assert "larger than 1048576 bytes" in r.json()["error"]["message"] and time.monotonic() - t0 < 10
    vllm.misbehave_next = "endless"
    r = gw.http.post("/v1/completions", json=CMPL)
    assert r.status_code == 502 and "ignores max_tokens" in r.json()["error"]["message"], r.text
    deadline = time.monotonic() + 5
    while not vllm.closed_early and time.monotonic() < deadline:
        time.sleep(0.02)
    assert vllm.closed_early  # the gateway hung up on it
    vllm.misbehave_next = "usage-bomb"  # 10**12 completion tokens claimed: not believed
    r = gw.http.post("/v1/completions", json=CMPL)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1, r.text


# ----------------------------------------------------------------------------- item 13, minor

def test_models_list_that_is_a_json_list_is_one_clear_error(vllm, tok, monkeypatch):
    vllm.models_reply = "list"
    with pytest.raises(UpstreamError, match=r"/v1/models: the upstream answered 200 with a JSON list"):
        UpstreamEngine(vllm.url, tok, base_name="m", api_key=UP_KEY)
    from typer.testing import CliRunner

    from shoptune.cli import app
    monkeypatch.setenv("UP_KEY", UP_KEY)
    res = CliRunner().invoke(app, ["serve", "--upstream", vllm.url, "--upstream-api-key-env", "UP_KEY",
                                   "--api-key", KEY])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert lines[-1].startswith("error:") and "JSON list" in lines[-1], res.output


def test_health_poll_logs_only_changes(vllm, tok, caplog):
    caplog.set_level("INFO", logger="shoptune.serve")
    g = Gateway(vllm.url, tok, api_key=UP_KEY)  # (polls every 0.2 s)
    try:
        time.sleep(1.0)
        vllm.healthy = False
        time.sleep(1.0)
        vllm.healthy = True
        time.sleep(1.0)
    finally:
        g.close()
    polls = [r.getMessage() for r in caplog.records if "upstream" in r.getMessage() and "ready" in r.getMessage()]
    assert len(polls) <= 3 and any("not ready" in m for m in polls), polls


# ----------------------------------------------------------------------------- item 6 (Gate)

@pytest.mark.parametrize("header,status", [
    (b"Bearer \xc2\xa0", 401), (b"Bearer \xa0", 401), (KEY.encode(), 401),
    (b"Bearer " + KEY.encode() + b"\xa0", 401), (b"Bearer " + KEY.encode() + b"x", 401),
    (b"Bearer " + KEY[:-1].encode(), 401), (b"Bearer " + KEY.encode(), 200),
    (b"bearer " + KEY.encode(), 200), (b"Bearer  " + KEY.encode(), 200)])
def test_presented_key_is_compared_exactly(gw, header, status):
    r = httpx.get(gw.url + "/v1/models", headers={"Authorization": header})
    assert r.status_code == status, (header, r.text)


def test_an_empty_configured_key_lets_nobody_in(vllm, tok):
    """(The CLI refuses an empty key; built by hand, such settings lock everyone out.)"""
    from starlette.testclient import TestClient

    from shoptune.serve.app import ServeSettings, build_app
    engine = UpstreamEngine(vllm.url, tok, base_name="m", api_key=UP_KEY)
    with TestClient(build_app(engine, ServeSettings(api_keys=frozenset({""})))) as c:
        for h in (b"Bearer ", b"Bearer \xa0", b"Bearer x"):
            assert c.get("/v1/models", headers={"Authorization": h}).status_code == 401


# ----------------------------------------------------------------------------- item 6 (start-up)

@pytest.mark.parametrize("args,env,fragment", [
    (["--api-key", ""], {}, "--api-key: the API key is empty"),
    (["--api-key", " \t"], {}, "--api-key: the API key is empty"),
    (["--api-key", "sk a"], {}, "--api-key: an API key must be printable ASCII without spaces"),
    (["--api-key", "sk-\u00e9t\u00e9"], {}, "printable ASCII"),
    ([], {"SHOPTUNE_API_KEY": ""}, "SHOPTUNE_API_KEY: the API key is empty"),
    (["--api-keys-file", "{keys}"], {}, "keys.txt:3: an API key must be printable ASCII"),
    (["--api-keys-file", "{empty}"], {}, "empty.txt: no API keys in the file"),
])
def test_empty_or_malformed_api_keys_are_refused_at_start(tmp_path, args, env, fragment):
    from typer.testing import CliRunner

    from shoptune.cli import app
    (tmp_path / "keys.txt").write_text("# keys\nsk-good\nsk bad\n")
    (tmp_path / "empty.txt").write_text("# none yet\n\n")
    args = [a.format(keys=tmp_path / "keys.txt", empty=tmp_path / "empty.txt") for a in args]
    res = CliRunner().invoke(app, ["serve", "--model", "/nonexistent", *args], env=env)
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert fragment in lines[0] and "sk-good" not in lines[0], lines[0]


def test_api_key_help_says_what_happens_without_one():
    from typer.testing import CliRunner

    from shoptune.cli import app
    res = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200", "TERM": "dumb"})
    text = " ".join(res.output.split())
    assert "Required bearer key" not in text and "Without any key the API is open" in text, text
