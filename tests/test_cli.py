import json

from typer.testing import CliRunner

from shoptune.cli import app
from tests.conftest import EC_GUIDE, mc, needs_shared, write_jsonl

runner = CliRunner()

# Row counts from ../shared/data/README.md
EC_GUIDE_ROWS = {"Generation/CR.json": 1000, "Generation/EBT.json": 2315, "Generation/EPF.json": 3000,
                 "Generation/EPK.json": 3000, "Generation/ERK.json": 1000, "Generation/MT.json": 2997,
                 "Generation/PE.json": 479, "Generation/PKS.json": 1296, "Generation/PQA.json": 6834,
                 "Generation/RTS.json": 1455, "MCQ/ACR.json": 7184, "MCQ/MDM.json": 500,
                 "MCQ/PKS.json": 271, "MCQ/PRP.json": 1499, "MCQ/QPRJ.json": 501,
                 "MCQ/QPRP.json": 2150, "MCQ/SA.json": 3500, "MCQ/SAP.json": 1385,
                 "MCQ/SPA.json": 520, "NER/NER.json": 7429, "Retrieval/PR.json": 2297,
                 "Retrieval/RRA.json": 1000, "Retrieval/RRS.json": 810}


@needs_shared
def test_tasks_ls_json(monkeypatch):
    monkeypatch.setenv("SHOPTUNE_DATA_DIR", str(EC_GUIDE.parent))
    res = runner.invoke(app, ["tasks", "ls", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert len(rows) >= 25 and {"capability", "task", "type", "metric", "rows"} <= set(rows[0])
    assert len({r["capability"] for r in rows}) == 4
    by = {r["task"]: r["rows"] for r in rows}
    assert by["ecguide_acr_mcq"] + by["ecguide_acr_gen"] == 7184
    assert by["ecguide_pks_bleu"] == 293 and by["shopbench_task17"] == 5


@needs_shared
def test_data_stats_matches_readme_counts():
    res = runner.invoke(app, ["data", "stats", str(EC_GUIDE), "--json", "--no-tokens"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["total_rows"] == sum(EC_GUIDE_ROWS.values()) == 52422
    assert st["by_source"] == {"ec-guide": 52422}
    per_task = {t["task"]: t["rows"] for t in st["by_task"]}
    assert per_task["ecguide_ner"] == 7429 and per_task["ecguide_prp_bool"] == 500


def test_data_stats_token_lengths(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [mc("Which colour?"), mc("Which colour?")])
    res = runner.invoke(app, ["data", "stats", str(p), "--json"])
    st = json.loads(res.output)
    assert st["total_rows"] == 2 and st["duplicates"]["exact_question_and_answer"] == 1
    assert st["tokens"]["input"]["max"] > 5


def test_validate_exit_codes(tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl", [mc()])
    assert runner.invoke(app, ["data", "validate", str(good)]).exit_code == 0
    bad = write_jsonl(tmp_path / "b.jsonl", [mc(), "{oops", mc(gold=7)])
    res = runner.invoke(app, ["data", "validate", str(bad)])
    assert res.exit_code == 1
    assert "b.jsonl:2: invalid JSON" in res.output
    assert "b.jsonl:3: output_field: option index 7 out of range" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "missing.json")])
    assert res.exit_code == 1 and "shoptune data fetch" in res.output


def test_split_cli(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [mc(f"Q{i}") for i in range(200)])
    res = runner.invoke(app, ["data", "split", str(p), "--out", str(tmp_path / "s"), "--test", "0.2"])
    assert res.exit_code == 0, res.output
    n = {s: len((tmp_path / "s" / f"{s}.jsonl").read_text().splitlines())
         for s in ("train", "validation", "test")}
    assert sum(n.values()) == 200 and n["test"] > 20


def test_models_pull_takes_the_name_as_argument(monkeypatch):
    import shoptune.models as M
    monkeypatch.setattr(M, "is_cached", lambda name: name == "smollm2-135m")
    res = runner.invoke(app, ["models", "pull", "smollm2-135m"])
    assert res.exit_code == 0 and "cached" in res.output
