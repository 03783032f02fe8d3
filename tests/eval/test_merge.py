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
    same = [a["model_output"] == b["model_output"] for a, b in zip(runs[False], runs[True])]
    assert sum(same) >= 15, [(a["model_output"], b["model_output"]) for a, b in zip(runs[False], runs[True])]
    # and the adapter really is applied when merged (it changes answers vs the base model)
    base_out = [json.loads(x)["model_output"] for x in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    assert base_out != [r["model_output"] for r in runs[True]]
