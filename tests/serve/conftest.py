"""A real `shoptune serve` subprocess on a loopback port, with small random LoRA adapters."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

KEY = "sk-shoptune-test"


def make_adapters(root: Path, names=("alpha", "beta", "gamma")) -> dict[str, Path]:
    """Rank-4 adapters with random B (so each one visibly changes the model's output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from shoptune.models import load

    model, _ = load("smollm2-135m")
    out = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(2.0)
        pm.save_pretrained(root / name)
        model = pm.unload()
        out[name] = root / name
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "shoptune.cli", "serve", "--port", str(self.port),
                                      "--log-level", "warning", *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{log.read_text()}")

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapters(root)


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server(["--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}",
                "--adapters-dir", str(adapters["alpha"].parent), "--api-key", KEY,
                "--max-wait-ms", "50", "--max-body-bytes", "65536", "--max-new-tokens", "256"], log)
    yield s
    assert s.stop() in (0, -signal.SIGTERM), log.read_text()  # uvicorn re-raises SIGTERM once drained
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture()
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
