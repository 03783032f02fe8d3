"""Slowloris and file-descriptor exhaustion (issue #20, item 5) against a real `shoptune serve`
subprocess (the built-in engine on a tiny model; the gateway shares the same server options and
is attacked the same way in test_adversarial_gateway.py)."""
from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from shoptune.serve.connections import AcceptErrorLogLimit
from shoptune.serve.supervise import wait_healthy
from shoptune.serve.testing import free_port

pytestmark = pytest.mark.slow  # (the tiny model needs the real tokenizer: model cache)
NOFILE = 256  # the server's open-files limit: --max-connections 1000 is cut to 256 - 128 - 64 = 64


class LimitedServer:
    """`shoptune serve` started under an open-files limit of NOFILE (soft and hard)."""

    def __init__(self, args: list[str], log):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoptune.cli", "serve", "--port", str(self.port), *args],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE)))
        state = wait_healthy(self.proc, self.url, 120)
        if state != "up":
            self.stop()
            raise RuntimeError(f"server {state}:\n{log.read_text()}")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


HEADER_TIMEOUT = 3.0  # s; long enough that "closed at once" and "closed by the timeout" differ on a busy machine


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from shoptune.serve.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("connections") / "tiny")


@pytest.fixture
def server(tiny_base, tmp_path):
    """One server per test: the accept-error log is rate-limited (one line per 10 s), so a line
    logged in one test would hide the next test's."""
    s = LimitedServer(["--model", str(tiny_base), "--header-timeout", str(HEADER_TIMEOUT),
                       "--max-connections", "1000", "--log-level", "info"], tmp_path / "server.log")
    s.idle_fds = s.fds()
    yield s
    s.stop()


def open_sockets(port: int, n: int, half_headers_every: int = 2) -> list[socket.socket]:
    """n connections: every other one sends half a request's headers, the rest nothing."""
    out = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i % half_headers_every == 0:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        out.append(s)
    return out


def closed(s: socket.socket) -> bool:
    s.settimeout(0.01)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, BlockingIOError):
        return False


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def health_latency(url: str) -> float:
    t0 = time.monotonic()
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200, r.text
    return time.monotonic() - t0


def test_idle_and_half_header_connections_are_capped_and_timed_out(server):
    log_before = server.log.stat().st_size
    assert "only 64 fit under the open-files limit" in server.log.read_text()
    socks = open_sockets(server.port, 300)  # more than the server may hold (64) or has descriptors for
    try:
        # the ones over the cap are closed at once (well before the header timeout)
        assert wait_for(lambda: sum(closed(s) for s in socks) >= 300 - 64, HEADER_TIMEOUT - 1), \
            sum(closed(s) for s in socks)
        latencies = [health_latency(server.url) for _ in range(5)]
        assert max(latencies) < 2.0, latencies  # the oldest idle connections made room
        assert server.fds() < NOFILE - 32
        assert wait_for(lambda: all(closed(s) for s in socks), HEADER_TIMEOUT + 5)  # the rest: after the timeout
    finally:
        for s in socks:
            s.close()
    # one idle connection under the cap lives until the header timeout, not forever
    (s,) = open_sockets(server.port, 1, half_headers_every=1)
    time.sleep(0.5)
    assert not closed(s)
    assert wait_for(lambda: closed(s), HEADER_TIMEOUT + 5)
    s.close()
    # keep-alive clients are not hurt: requests spaced under the timeout reuse one connection
    with httpx.Client(base_url=server.url, timeout=10) as c:
        ports = set()
        for _ in range(3):
            r = c.get("/health")
            assert r.status_code == 200
            ports.add(r.extensions["network_stream"].get_extra_info("socket").getsockname()[1])
            time.sleep(0.3)
    assert len(ports) == 1
    text = server.log.read_text()[log_before:]
    assert "Traceback" not in text and "out of system resource" not in text
    assert server.log.stat().st_size - log_before < 20_000, text[-2000:]


def test_accept_errors_when_out_of_descriptors_are_logged_rarely(server):
    """Out of file descriptors anyway (the limit lowered under the running server): asyncio
    would log a traceback per failed accept(), up to 2048 per loop tick; one line per 10 s."""
    assert wait_for(lambda: server.fds() <= server.idle_fds + 2, 10), (server.fds(), server.idle_fds)
    log_before = server.log.stat().st_size
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (server.fds() + 8, NOFILE))
    socks = []
    try:
        # 8 accepted, then the backlog (32) fills while every accept() fails; beyond that the
        # kernel drops SYNs and each connect() waits out retransmits (200 sockets took 60 s)
        socks = open_sockets(server.port, 48)
        time.sleep(3)
        grown = server.log.stat().st_size - log_before
        text = server.log.read_text()[log_before:]
        assert "out of system resource" in text and "Traceback" not in text, text[-3000:]
        assert grown < 20_000, grown
    finally:
        for s in socks:
            s.close()
        resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (NOFILE, NOFILE))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if health_latency(server.url) < 1.0:
                break
        except (httpx.HTTPError, AssertionError):
            time.sleep(0.2)
    assert health_latency(server.url) < 1.0


def test_accept_error_filter_keeps_one_line_per_interval():
    logger = logging.getLogger("test-accept-filter")
    f = AcceptErrorLogLimit(interval=60)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addFilter(f)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        err = OSError(24, "Too many open files")
        for _ in range(5000):
            logger.error("socket.accept() out of system resource\nsocket: <socket>", exc_info=(OSError, err, None))
        logger.error("something else")
    finally:
        logger.removeFilter(f)
        logger.removeHandler(handler)
    assert [r.getMessage().split(":")[0] for r in records] == ["socket.accept() out of system resource",
                                                               "something else"]
    assert records[0].exc_info is None and "Too many open files" in records[0].getMessage()
