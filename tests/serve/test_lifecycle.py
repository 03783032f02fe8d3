"""Limits and shutdown of a real server: a full queue answers 429, SIGTERM drains in-flight work."""
import signal
import threading
import time

import httpx
import pytest

from tests.serve.conftest import KEY, Server

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}


def _gauge(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(name)


def _wait_for(cond, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_queue_full_is_429_and_sigterm_drains_in_flight_requests(tmp_path):
    s = Server(["--max-batch-size", "1", "--max-queue", "1", "--api-key", KEY], tmp_path / "server.log")
    results = {}

    def call(name):
        results[name] = httpx.post(s.url + "/v1/completions", headers=AUTH, timeout=300, json={
            "model": "smollm2-135m", "prompt": "Shopping tips:", "max_tokens": 48, "temperature": 0})

    try:
        a = threading.Thread(target=call, args=("running",))
        a.start()
        _wait_for(lambda: _gauge(s.url, "shoptune_running_requests") == 1)
        b = threading.Thread(target=call, args=("queued",))
        b.start()
        _wait_for(lambda: _gauge(s.url, "shoptune_queue_depth") == 1)
        full = httpx.post(s.url + "/v1/completions", headers=AUTH, json={
            "model": "smollm2-135m", "prompt": "x", "max_tokens": 2})
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        s.proc.send_signal(signal.SIGTERM)  # while one request runs and one waits
        a.join(300)
        b.join(300)
        assert s.proc.wait(120) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once drained
    finally:
        s.stop(signal.SIGKILL)
    for name in ("running", "queued"):
        r = results[name]
        assert r.status_code == 200, (name, r.text)
        assert r.json()["usage"]["completion_tokens"] > 0
    assert results["running"].json()["choices"][0]["text"] == results["queued"].json()["choices"][0]["text"]


def test_bad_startup_options_fail_clearly(tmp_path, adapters):
    import subprocess
    import sys
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    for args, fragment in ((["--adapter", f"x={bad}"], "adapter_config.json"),
                           (["--adapter", "nonsense"], "NAME=VALUE"),
                           (["--merge"], "exactly one --adapter"),
                           (["--api-keys-file", str(tmp_path / "missing.txt")], "cannot read API keys")):
        p = subprocess.run([sys.executable, "-m", "shoptune.cli", "serve", *args], capture_output=True,
                           text=True, timeout=120)
        assert p.returncode != 0 and fragment in p.stdout + p.stderr, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stdout + p.stderr
