"""A real `shoptune serve` subprocess on a loopback port, with small random LoRA adapters."""
import signal
from pathlib import Path

import pytest

from shoptune.serve.testing import ServerProcess as Server
from shoptune.serve.testing import make_adapters

KEY = "sk-shoptune-test"


@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return make_adapters(root)


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server(["--adapter", f"alpha={adapters['alpha']}", "--adapter", f"beta={adapters['beta']}",
                "--adapters-dir", str(adapters["alpha"].parent), "--api-key", KEY,
                "--max-wait-ms", "50", "--max-body-bytes", "65536", "--max-new-tokens", "256",
                # float32: tests compare answers with plain peft and batched with single requests
                # token for token; in bf16 kernels (AMX, AVX512-BF16) round near ties apart (#20)
                "--dtype", "float32"], log)
    yield s
    assert s.stop() in (0, -signal.SIGTERM), log.read_text()  # uvicorn re-raises SIGTERM once drained
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture()
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)
