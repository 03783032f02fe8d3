"""``shoptune serve --engine llama.cpp``: one command that serves every task on llama.cpp.

Exports the base model and adapters to GGUF (cached by their content: a second start reuses the
files), starts ``llama-server`` on a loopback port with the adapters loaded at scale 0 (the
gateway picks one per request), restarts it when it dies, and stops it when the server shuts
down. The gateway (:class:`~shoptune.serve.upstream.UpstreamEngine`) sits in front of it; while
it restarts, /health says not ready and requests get 503.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx

from shoptune.paths import cache_dir
from shoptune.serve.gguf import LLAMA_CPP_PYTHON, ExportError, export_gguf, llama_server_path

log = logging.getLogger("shoptune.serve")


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_cached(model: str, adapters: dict[str, str], *, outtype: str = "bf16", status=None) -> tuple[Path, dict]:
    """``export_gguf`` into ``<cache>/gguf/<key>``, the key hashing the model folder's and each
    adapter's weights (path, size, mtime), the names, the outtype and the llama.cpp version."""
    from shoptune.models import resolve
    base = resolve(model)

    def stamp(folder: Path) -> list:
        return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns]
                      for p in Path(folder).iterdir() if p.is_file())
    key = {"model": str(base.resolve()), "model_files": stamp(base), "outtype": outtype,
           "llama_cpp_python": LLAMA_CPP_PYTHON,
           "adapters": {n: [str(Path(d).resolve()), stamp(Path(d))] for n, d in adapters.items()}}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{base.name}-{digest}"
    if (out / "manifest.json").is_file():
        log.info("reusing the GGUF export in %s", out)
        return out, json.loads((out / "manifest.json").read_text())
    return out, export_gguf(model, [f"{n}={d}" for n, d in adapters.items()], out, outtype=outtype,
                            status=status)


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the thread that started it ends, e.g. shoptune killed
    with SIGKILL; no orphaned llama-server keeps its port and memory."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, *, poll: float = 0.3,
                 stop: threading.Event | None = None) -> str:
    """Poll ``URL/health`` until it answers 200 (``"up"``), the process ends (``"exited"``), or
    the timeout passes or ``stop`` is set (``"timeout"``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        if proc.poll() is not None:
            return "exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return "up"
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return "timeout"


class LlamaServerSupervisor:
    """Runs ``llama-server`` for an export folder on a fixed loopback port; restarts it on exit."""

    def __init__(self, folder: Path, manifest: dict, *, slots: int = 16, ctx_per_slot: int = 2048,
                 threads: int | None = None, log_path: Path | None = None,
                 restart_delay: float = 1.0, startup_timeout: float = 300.0):
        binary = llama_server_path()
        if binary is None:
            raise ExportError("no llama-server binary: run `make llama-server` (or set SHOPTUNE_LLAMA_SERVER)")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        loras = [str(folder / f) for f in manifest["adapters"].values()]
        self.cmd = [str(binary), "-m", str(folder / manifest["base"]), "--host", "127.0.0.1",
                    "--port", str(self.port), "-np", str(slots), "-c", str(ctx_per_slot * slots),
                    "-t", str(threads or os.cpu_count() or 1)]
        if loras:
            self.cmd += ["--lora", ",".join(loras), "--lora-init-without-apply"]
        self.log_path = log_path or folder / "llama-server.log"
        self.restart_delay, self.startup_timeout = restart_delay, startup_timeout
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="llama-server-watch", daemon=True)

    def start(self) -> str:
        self._spawn()
        self._wait_ready()
        self._watcher.start()
        return self.url

    def _spawn(self) -> None:
        with open(self.log_path, "a") as fh:
            self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         start_new_session=True,  # (a ctrl-C goes to us, not it)
                                         preexec_fn=_die_with_parent)
        log.info("llama-server pid %d: %s", self.proc.pid, " ".join(self.cmd))

    def _wait_ready(self) -> None:
        state = wait_healthy(self.proc, self.url, self.startup_timeout, poll=0.2, stop=self._stopping)
        if state == "up":
            return
        if state == "exited":
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ExportError(f"llama-server exited {self.proc.returncode}: {tail[0][:300]} "
                              f"(log: {self.log_path})")
        raise ExportError(f"llama-server not ready within {self.startup_timeout:.0f} s (log: {self.log_path})")

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            if self.proc.poll() is None:
                continue
            log.error("llama-server exited with %s; restarting (log: %s)", self.proc.returncode, self.log_path)
            time.sleep(self.restart_delay)
            if self._stopping.is_set():
                return
            try:
                self._spawn()
                self._wait_ready()
                self.restarts += 1
                log.warning("llama-server restarted (%d restarts so far)", self.restarts)
            except Exception as e:  # noqa: BLE001 - keep trying: /health reports the outage meanwhile
                log.error("llama-server restart failed: %s", e)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._watcher.is_alive():
            self._watcher.join(5)
