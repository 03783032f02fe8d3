"""The openai backend against a real OpenAI-compatible HTTP server on loopback (a tiny FastAPI
app standing in for vLLM): requests, concurrency, stop handling, scoring."""
import json
import threading

import pytest
from fastapi import FastAPI, Request

from shoptune.eval.runner import evaluate
from shoptune.serve.testing import app_in_thread
from tests.conftest import mc, write_jsonl


@pytest.fixture
def server():
    app = FastAPI()
    seen = {"n": 0, "max_tokens": [], "inflight": 0, "peak": 0}
    lock = threading.Lock()

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        with lock:
            seen["n"] += 1
            seen["inflight"] += 1
            seen["peak"] = max(seen["peak"], seen["inflight"])
            seen["max_tokens"].append(body["max_tokens"])
        import asyncio
        await asyncio.sleep(0.05)
        with lock:
            seen["inflight"] -= 1
        text = "2" if "Answer:" in body["prompt"] else "nike, adidas\nmore text"
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}]}

    with app_in_thread(app) as url:
        yield f"{url}/v1", seen


def test_openai_backend_end_to_end(server, tmp_path):
    url, seen = server
    ner = {"input_field": "Extract brands.\nQuery: nike vs adidas shoes\nOutput: ", "output_field": ["nike", "adidas"],
           "task_type": "named_entity_recognition", "metric": "micro f1", "task_name": "task4",
           "track": "amazon-kdd-cup-24-understanding-shopping-concepts"}
    data = write_jsonl(tmp_path / "d.jsonl", [mc(f"Q{i}", gold=2) for i in range(12)] + [ner])
    s = evaluate(model="served-model", data=[str(data)], out=tmp_path / "run", backend="openai",
                 base_url=url, concurrency=8, quiet=True, n_boot=50)
    assert seen["n"] == 13 and seen["peak"] > 1                  # concurrent requests
    assert sorted(set(seen["max_tokens"])) == [1, 32]            # 1 token for MC, NER limit
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert preds[-1]["model_output"] == "nike, adidas"           # cut at the first line end
    assert s["tasks"]["shopbench_task2"]["score"] == 1.0 and s["tasks"]["shopbench_task4"]["score"] == 1.0


def test_openai_backend_needs_base_url(tmp_path):
    with pytest.raises(ValueError, match="--base-url"):
        evaluate(model="m", data=[str(write_jsonl(tmp_path / "d.jsonl", [mc()]))], out=tmp_path / "o",
                 backend="openai")
