"""Evaluating with an adapter merged into the weights gives the unmerged adapter's answers."""
import json

import pytest

from shoptune.eval.runner import evaluate
from shoptune.serve.testing import make_adapters
from tests.conftest import DEV, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]


def test_merged_adapter_answers_equal_unmerged(tmp_path):
    adapter = make_adapters(tmp_path / "adapters", names=("alpha",))["alpha"]
    runs = {}
    for merge in (False, True):
        out = tmp_path / f"merge-{merge}"
        s = evaluate(model="smollm2-135m", adapter=str(adapter), data=[str(DEV)], out=out, limit=16,
                     dtype="fp32", merge=merge, quiet=True, n_boot=0)
        assert s["adapter_merged"] is merge
        runs[merge] = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    base = evaluate(model="smollm2-135m", data=[str(DEV)], out=tmp_path / "base", limit=16,
                    dtype="fp32", quiet=True, n_boot=0)
    # the prefix cache (shared preamble's KV reused) answers the same development questions
    cached = evaluate(model="smollm2-135m", data=[str(DEV)], out=tmp_path / "cached", limit=16,
                      dtype="fp32", quiet=True, n_boot=0, prefix_cache=True)
    assert cached["prefix_cache"] is True and base["prefix_cache"] is False
    assert (tmp_path / "cached" / "predictions.jsonl").read_text() == \
        (tmp_path / "base" / "predictions.jsonl").read_text()
    same = [a["model_output"] == b["model_output"] for a, b in zip(runs[False], runs[True])]
    assert sum(same) >= 15, [(a["model_output"], b["model_output"]) for a, b in zip(runs[False], runs[True])]
    # and the adapter really is applied when merged (it changes answers vs the base model)
    base_out = [json.loads(x)["model_output"] for x in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    assert base_out != [r["model_output"] for r in runs[True]]

    # a per-task deployment: two tasks' questions go to the adapter, the rest to the base model
    tasks = sorted({m["task_name"] for m, b in zip(runs[True], base_out) if m["model_output"] != b})[:2]
    s = evaluate(model="smollm2-135m", data=[str(DEV)], out=tmp_path / "per-task", limit=16,
                 dtype="fp32", quiet=True, n_boot=0, task_adapters={t: str(adapter) for t in tasks})
    assert s["task_adapters"] == {t: str(adapter) for t in tasks}
    routed = [json.loads(x) for x in (tmp_path / "per-task" / "predictions.jsonl").read_text().splitlines()]
    want = [m["model_output"] if m["task_name"] in tasks else b
            for m, b in zip(runs[True], base_out)]
    agree = sum(r["model_output"] == w for r, w in zip(routed, want))
    assert tasks and agree >= 15, (tasks, agree)
    assert [r["model_output"] for r in routed] != base_out  # the adapter was really used


def test_per_task_adapters_refuse_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        evaluate(model="smollm2-135m", data=[str(DEV)], out=tmp_path / "x", limit=2, quiet=True,
                 task_adapters={"task1": str(tmp_path / "nope")})
