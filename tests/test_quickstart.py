"""#24 "done when": the README's quick start, run as written with tiny settings (a random tiny model
with the real tokenizer instead of SmolLM2-135M), from an empty folder: tasks -> eval -> a 3-step
training -> eval -> compare -> serve, and the two curl bodies give replies of the shape shown."""
import json
import re
import shlex

import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from tests.conftest import REPO, SHARED, needs_shared

README = (REPO / "README.md").read_text(encoding="utf-8")
QUICK = README.split("## Quick start", 1)[1].split("## Headline", 1)[0]


def commands() -> list[list[str]]:
    block = re.sub(r"\\\n\s*", " ", QUICK.split("```bash", 1)[1].split("```", 1)[0])
    lines = (ln.split(" #", 1)[0].strip().rstrip("&").strip() for ln in block.splitlines())
    return [shlex.split(ln)[1:] for ln in lines if ln.startswith("shoptune ")]


def curls() -> list[tuple[str, dict, dict]]:
    """(path, body, reply) of each curl in the quick start."""
    out = []
    for m in re.finditer(r"curl -s http://127\.0\.0\.1:8000(\S+) .*?-d \\\n\s*'(.*?)'\n```\n```json\n(.*?)```", QUICK, re.S):
        out.append((m[1], json.loads(m[2]), json.loads(m[3])))
    return out


@pytest.mark.slow  # ~30-70 s on 2 cores: two evaluations of the tiny suite, a 3-step training
@needs_shared
def test_quick_start_runs_as_written_with_a_tiny_model(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from shoptune.models import load
    from shoptune.serve.app import build_app
    from shoptune.serve.engine import Engine
    from shoptune.serve.handlers import ServeSettings
    from shoptune.serve.testing import make_tiny_model

    tiny = str(make_tiny_model(tmp_path / "tiny"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # an empty folder: shipped configs are found by name
    monkeypatch.setenv("SHOPTUNE_DATA_DIR", str(SHARED))
    serve_args = None
    for args in commands():
        args = [tiny if a == "smollm2-135m" else a for a in args]
        if args[0] == "serve":
            serve_args = args
            continue
        if args[0] == "train":  # tiny settings
            args += [f"model={tiny}", "mixture.total=16", "batch_size=4", "max_length=96", "report_to=[]"]
        if args[0] == "eval" and "--suite" in args:
            args += ["--limit-per-task", "1"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, (args, res.output[-2000:])
    assert (tmp_path / "work/runs/qs/train/adapter/adapter_config.json").exists()
    assert json.loads((tmp_path / "work/runs/qs/tuned/scores.json").read_text())["overall"] >= 0

    adapter = next(a for a in serve_args if a.startswith("shopping="))
    model, tok = load(tiny, dtype="fp32")
    engine = Engine(model, tok, base_name="smollm2-135m", max_queue=8, max_wait=0.02)
    try:
        engine.load_adapter("shopping", tmp_path / "work" / adapter.split("=", 1)[1])
        http = TestClient(build_app(engine, ServeSettings(max_new_tokens=64)))
        shown = curls()
        assert [p for p, _, _ in shown] == ["/v1/chat/completions", "/v1/tasks/shopbench_task2"]
        for path, body, reply in shown:
            r = http.post(path, json=body)
            assert r.status_code == 200, r.text
            got = r.json()
            assert list(got) == list(reply), path  # the fields the README shows, in order
            assert got["model"] == reply["model"] == "shopping"
        assert got["answer_text"] == body["input"]["options"][got["answer"]]
    finally:
        engine.stop()
