"""Helpers for tests and benchmarks: random task adapters, a `shoptune serve` subprocess."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def make_adapters(root: Path, names=("alpha", "beta", "gamma"), *, model: str = "smollm2-135m",
                  scale: float = 2.0) -> dict[str, Path]:
    """Rank-4 q/v LoRA adapters with random B, saved as PEFT folders (each changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shoptune.models import load

    base, _ = load(model)
    out = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
        pm.save_pretrained(root / name)
        base = pm.unload()
        out[name] = root / name
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m shoptune.cli serve ARGS` on a free loopback port; waits for /health."""

    def __init__(self, args: list[str], log: Path, *, startup_timeout: float = 180.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "shoptune.cli", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{log.read_text()}")

    def rss_bytes(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
