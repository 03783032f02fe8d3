"""The worked example end to end, from its CSVs: `tasks new` -> `data split` -> a tiny `train` ->
`eval` -> `serve` -> the official openai client on /v1/tasks/... -> a label / schema-valid JSON,
from the base model and from the tuned adapter."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-tasks"
pytestmark = pytest.mark.slow


def cli(*args, cwd: Path, env: dict) -> str:
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", *args], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{args}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_worked_example_from_csv_to_a_served_valid_answer(tmp_path, monkeypatch):
    import os

    from jsonschema import validate
    from openai import OpenAI

    from shoptune.serve.testing import ServerProcess

    for f in ("products.csv", "attributes.csv", "train.yaml"):
        shutil.copy(EXAMPLE / f, tmp_path / f)
    env = {**os.environ, "SHOPTUNE_TASKS_PATH": str(tmp_path / "tasks")}
    cli("tasks", "new", "product_category", "--from", "products.csv", "--input", "title",
        "--label", "category", cwd=tmp_path, env=env)
    cli("tasks", "new", "product_attributes", "--from", "attributes.csv", "--input", "title",
        "--json", "attributes", cwd=tmp_path, env=env)
    for t in ("product_category", "product_attributes"):
        out = cli("data", "split", "--task", t, "--out", f"data/{t}", "--validation", "0", "--test", "0.3",
                  cwd=tmp_path, env=env)
        assert "invalid rows skipped: 0" in out
    cli("train", "train.yaml", "--out", "runs/tuned", "max_steps=2", "batch_size=2", "max_length=96",
        "logging_steps=1", "save_steps=2", cwd=tmp_path, env=env)
    adapter = tmp_path / "runs" / "tuned" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    cli("eval", "--data", "data/product_category/test.jsonl", "--data", "data/product_attributes/test.jsonl",
        "--limit-per-task", "2", "--model", "smollm2-135m", "--adapter", str(adapter), "--out", "runs/eval",
        cwd=tmp_path, env=env)
    scores = json.loads((tmp_path / "runs" / "eval" / "scores.json").read_text())
    assert scores["tasks"]["product_category"]["metric"] == "accuracy"
    assert scores["tasks"]["product_attributes"]["metrics"]["valid json"] == 1.0
    preds = [json.loads(x) for x in (tmp_path / "runs" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["parsed"] is not None for p in preds)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHOPTUNE_TASKS_PATH", str(tmp_path / "tasks"))
    server = ServerProcess(["--model", "smollm2-135m", "--adapter", f"tuned={adapter}",
                            "--max-new-tokens", "256"], tmp_path / "serve.log")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
        info = client.get("/tasks/product_attributes", cast_to=object)
        assert info["request_schema"]["$defs"]["ProductAttributesInput"]["required"] == ["title"]
        schema = info["answer_schema"]["anyOf"][0]
        labels = client.get("/tasks/product_category", cast_to=object)["labels"]
        assert len(labels) == 6
        for model in ("smollm2-135m", "tuned"):
            r = client.post("/tasks/product_category", cast_to=object, body={
                "model": model, "input": {"title": "Oakridge Bamboo Cutting Board, large"}})
            assert r["answer"] in labels, r
            r = client.post("/tasks/product_attributes", cast_to=object, body={
                "model": model, "input": {"title": "Veltra Electric Kettle, 1.7 L, silver"}})
            validate(r["answer"], schema)
    finally:
        server.stop()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
