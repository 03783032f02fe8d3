"""End to end: `shoptune eval` on real dev questions, re-scored by an independent implementation
of the rules written here from ../shared/notes/shopbench-metrics.md (no shoptune.eval imports)."""
import ast
import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from tests.conftest import DEV, needs_shared

pytestmark = [pytest.mark.slow, needs_shared]


def ref_parse(tt, metric, out):
    out = out[:5000]
    if tt == "multiple-choice":
        s = out.strip()
        return int(s[0]) if s and s[0].isdigit() and s[0] in "0123456789" else -1
    if tt in ("ranking", "retrieval"):
        keep = "".join(c for c in out if c in "0123456789, ")
        nums = []
        for piece in keep.split(","):
            try:
                nums.append(int(piece))
            except ValueError:
                pass
        if tt == "retrieval":
            return nums[:3]
        nums = [n for n in nums if n <= 5][:5]
        return nums if len(nums) == len(set(nums)) else []
    if tt == "named_entity_recognition":
        try:
            v = ast.literal_eval(out)
            if isinstance(v, list) and all(isinstance(x, str) for x in v):
                return v
        except Exception:
            pass
        return [x.strip() for x in out.split(",") if x.strip()]
    return out.strip()


def ref_score(row, encoder):
    tt, m, gold = row["task_type"], row["metric"], row["output_field"]
    p = ref_parse(tt, m, row["model_output"])
    assert p == row["parsed"], row
    if m == "accuracy":
        return float(p == gold)
    if m == "hit rate@3":
        return len(set(gold) & set(p[:3])) / len(gold)
    if m == "ndcg":
        p = p[:len(gold)]
        dcg = sum((2 ** (gold[x - 1] if 0 < x <= len(gold) else 0) - 1) / math.log2(i + 2) for i, x in enumerate(p))
        idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(sorted(gold, reverse=True)))
        return dcg / idcg if idcg else 0.0
    if m == "micro f1":
        pp = [x.lower().strip() for x in p]
        gg = [x.lower() for x in gold]
        tp = len(set(pp) & set(gg))
        return (tp, len(pp) - tp, len(gg) - tp)
    if m == "rougel":
        from rouge_score import rouge_scorer
        return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(p, gold)["rougeL"].fmeasure
    if m in ("bleu", "jp-bleu"):
        import sacrebleu
        line = row["model_output"].strip("\n").split("\n")[0]
        kw = {"tokenize": "ja-mecab"} if m == "jp-bleu" else {}
        return sacrebleu.sentence_bleu(line, [gold], lowercase=True, **kw).score / 100
    if m == "sent-transformer":
        a, b = encoder.encode([p, gold])
        return max(0.0, float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))
    raise AssertionError(m)


def test_eval_writes_four_files_and_agrees_with_independent_rules(tmp_path):
    rows = [json.loads(x) for x in DEV.read_text().splitlines()]
    one_per_task = {}
    for r in rows:
        one_per_task.setdefault((r["task_name"], r["metric"]), r)
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(json.dumps(r) + "\n" for r in one_per_task.values()))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--data", str(sub),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("predictions.jsonl", "scores.json", "report.md", "tracks.png"):
        assert (out / f).stat().st_size > 0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    scores = json.loads((out / "scores.json").read_text())
    assert len(preds) == len(one_per_task) == 19
    assert {"input_field", "task_name", "model_output", "parsed", "score"} <= set(preds[0])

    from sentence_transformers import SentenceTransformer
    from shoptune.eval.metrics import minilm_path
    enc = SentenceTransformer(minilm_path(), device="cpu")
    per_task = {}
    for p in preds:
        per_task.setdefault(p["task_name"], []).append((p, ref_score(p, enc)))
    task_scores = {}
    for t, items in per_task.items():
        if items[0][0]["metric"] == "micro f1":
            tp, fp, fn = (sum(c[1][k] for c in items) for k in range(3))
            pr, rc = (tp / (tp + fp) if tp + fp else 0), (tp / (tp + fn) if tp + fn else 0)
            task_scores[t] = 2 * pr * rc / (pr + rc) if pr + rc else 0.0
        else:
            task_scores[t] = float(np.mean([c[1] for c in items]))
    track_of = {p["task_name"]: p["capability"] for p in preds}
    tracks = {c: np.mean([s for t, s in task_scores.items() if track_of[t] == c]) for c in set(track_of.values())}
    for t, s in task_scores.items():
        assert scores["tasks"][t]["score"] == pytest.approx(s, abs=1e-6)
    assert scores["overall"] == pytest.approx(np.mean(list(tracks.values())), abs=1e-6)
    assert scores["overall_tasks"] == pytest.approx(np.mean(list(task_scores.values())), abs=1e-6)
    assert scores["ci95"]["overall"][0] <= scores["overall"] <= scores["ci95"]["overall"][1]

    res = CliRunner().invoke(app, ["eval", "compare", str(out), str(out), "--plot", str(tmp_path / "c.png")])
    assert res.exit_code == 0 and "all-around" in res.output and (tmp_path / "c.png").exists()


def test_eval_bad_input_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_field": "x"}\n')
    res = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--data", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "bad.jsonl:1: output_field: missing" in res.output
    res = CliRunner().invoke(app, ["eval", "--model", "nope", "--data", str(DEV), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "not an embedded model" in res.output
    assert not (tmp_path / "o").exists()


def test_eval_with_a_corrupt_or_foreign_adapter_is_one_clear_message(tmp_path):
    """#9 item 12: no traceback, no wall of size-mismatch lines; nothing written."""
    from shoptune.serve.testing import make_tiny_fixtures
    from tests.conftest import mc, write_jsonl

    fx = make_tiny_fixtures(tmp_path / "fx")
    data = write_jsonl(tmp_path / "q.jsonl", [mc()])
    for bad, fragment in (
            ("mismatch", f"error: adapter {fx['mismatch']} was trained for a different base model "
                         f"({fx['base'].parent / 'tiny-32'}), not {fx['base']}: model.layers.0."),
            ("corrupt", f"error: {fx['corrupt'] / 'adapter_model.safetensors'}: not a readable "
                        "safetensors file")):
        res = CliRunner().invoke(app, ["eval", "--model", str(fx["base"]), "--adapter", str(fx[bad]),
                                       "--data", str(data), "--out", str(tmp_path / "o"), "--dtype", "fp32"])
        assert res.exit_code == 1, res.output
        assert fragment in res.output, res.output
        assert "Traceback" not in res.output and len(res.output) < 1000 and res.output.count("\n") <= 2
        assert not (tmp_path / "o").exists()
