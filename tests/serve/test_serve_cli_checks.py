"""`shoptune serve` refuses bad start-up options in one line, before any model loads or any GGUF
export runs (#31 items 10, 24, 25, 26). The tiny fixtures; no server is started."""
import json
import time

import pytest
from typer.testing import CliRunner

from shoptune.cli import app


def serve(*args):
    return CliRunner().invoke(app, ["serve", *map(str, args)])


def one_line(r) -> str:
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


@pytest.mark.parametrize("content, says", [
    ("{not json", "is not JSON"),
    ("[1, 2]", "experts must be a JSON object of expert names"),
    ('{"experts": {"a": "x"}, "task_experts": ["a"]}', "task_experts must map task names"),
    ('{"experts": {"a": "x"}, "task_experts": {"shopbench_task2": "b"}}', "task_experts must map task names"),
    ('{"experts": {"../a": "x"}}', "experts must be a JSON object of expert names"),
])
def test_a_malformed_experts_json_is_one_line(tiny, tmp_path, content, says):
    (tmp_path / "experts.json").write_text(content)
    line = one_line(serve("--model", tiny["base"], "--experts", tmp_path))
    assert says in line and "experts.json" in line


def test_merge_with_experts_and_unknown_task_adapters_are_refused_at_start(tiny, tmp_path):
    (tmp_path / "experts.json").write_text(json.dumps({"experts": {"good": "x"}, "task_experts": {}}))
    assert "--experts serves several" in one_line(
        serve("--model", tiny["base"], "--experts", tmp_path, "--merge", "--adapter", f"m={tiny['good']}"))
    line = one_line(serve("--model", tiny["base"], "--adapter", f"good={tiny['good']}",
                          "--task-adapter", "shopbench_task2=ghost"))
    assert "no adapter 'ghost' is served (served: good)" in line
    line = one_line(serve("--model", tiny["base"], "--adapter", f"good={tiny['good']}",
                          "--task-adapter", "shopbench_tsk2=good"))
    assert "no task card 'shopbench_tsk2' (did you mean shopbench_task2" in line


def test_llama_cpp_without_its_binary_says_so_before_exporting(tiny, tmp_path, monkeypatch):
    """#31 item 26: it spent 104 s converting to GGUF before naming the missing binary."""
    monkeypatch.setenv("SHOPTUNE_LLAMA_SERVER", str(tmp_path / "no-such-llama-server"))
    monkeypatch.setenv("SHOPTUNE_CACHE_DIR", str(tmp_path / "cache"))
    t0 = time.monotonic()
    line = one_line(serve("--model", tiny["base"], "--engine", "llama.cpp", "--adapter", f"good={tiny['good']}"))
    assert "no llama-server binary" in line and time.monotonic() - t0 < 30
    assert not (tmp_path / "cache" / "gguf").exists()  # nothing was exported
