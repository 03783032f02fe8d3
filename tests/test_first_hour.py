"""#24: commands that failed or surprised in a new user's first hour. One invalid-row policy for
every data command (item 4), shipped configs from any folder and `configs ls/cp` (item 5),
progress where commands used to sit silent and dry runs that write nothing (item 9)."""
import json
import re

import pytest
from typer.testing import CliRunner

from shoptune import REPO_CONFIGS
from shoptune.cli import app
from shoptune.configfile import resolve_config
from tests.conftest import mc, needs_shared, write_jsonl


def run(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res, " ".join(res.output.split())


def gap_row():
    """Options labelled 0, 1, 3 with gold 2 (as EC-Guide's MCQ/PRP.json)."""
    return {**mc("Which fits?"), "input_field": "Which fits?\n0. a\n1. b\n3. c\nAnswer: ", "output_field": 2}


@pytest.fixture()
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [mc(f"Which colour is item {i}?") for i in range(8)] + [gap_row()])


BAD = "d.jsonl:9: output_field: option index 2 is not one of the listed options (0, 1, 3)"


def test_split_and_dedup_skip_invalid_rows_by_default_and_say_how_many(tmp_path, data):
    res, text = run("data", "split", data, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert "invalid rows skipped: 1 (first: " in text and BAD in text
    assert sum(len(p.read_text().splitlines()) for p in (tmp_path / "s").glob("*.jsonl")) == 8
    res, text = run("data", "dedup", data, "--out", tmp_path / "clean.jsonl", "--no-near")
    assert res.exit_code == 0 and "invalid rows skipped: 1 (first: " in text, res.output
    clean = write_jsonl(tmp_path / "ok.jsonl", [mc("Which one?")])
    res, text = run("data", "split", clean, "--out", tmp_path / "s2")
    assert res.exit_code == 0 and "invalid rows skipped: 0" in text  # the count is always printed


def test_on_invalid_fail_stops_before_writing_and_names_the_row(tmp_path, data):
    for cmd in (["data", "split", data, "--out", tmp_path / "s"],
                ["data", "dedup", data, "--out", tmp_path / "clean.jsonl"]):
        res, text = run(*cmd, "--on-invalid", "fail")
        assert res.exit_code == 1 and BAD in text and "Traceback" not in res.output, res.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "clean.jsonl").exists()
    res, text = run("data", "split", data, "--out", tmp_path / "s", "--on-invalid", "maybe")
    assert res.exit_code == 2 and "skip" in text and "fail" in text


def test_a_contiguous_option_range_still_says_out_of_range(tmp_path):
    f = write_jsonl(tmp_path / "r.jsonl", [mc("Which?", gold=7)])
    res, text = run("data", "validate", f)
    assert res.exit_code == 1 and "option index 7 out of range (options 0-3)" in text


def test_shipped_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert resolve_config("configs/mixtures/diverse.yaml") == REPO_CONFIGS / "mixtures" / "diverse.yaml"
    assert resolve_config("train/smoke") == REPO_CONFIGS / "train" / "smoke.yaml"
    assert resolve_config("smoke", "train") == REPO_CONFIGS / "train" / "smoke.yaml"
    assert resolve_config("diverse.yaml", "mixtures") == REPO_CONFIGS / "mixtures" / "diverse.yaml"
    (tmp_path / "configs" / "train").mkdir(parents=True)  # a file of your own wins
    mine = tmp_path / "configs" / "train" / "smoke.yaml"
    mine.write_text("model: x\n")
    assert resolve_config("configs/train/smoke.yaml").resolve() == mine
    res, text = run("train", "configs/train/nope.yaml")
    assert res.exit_code == 1 and "configs/train/nope.yaml" in text and "shoptune configs ls" in text
    res, text = run("data", "mix", "configs/mixtures/nope.yaml", "--out", tmp_path / "m.jsonl")
    assert res.exit_code == 1 and "nor a shipped config" in text


def test_configs_ls_and_cp(tmp_path):
    res = CliRunner().invoke(app, ["configs", "ls", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    for name in ("train/smoke", "train/demo", "mixtures/diverse", "eval/core", "experiments/rank"):
        assert name in rows and rows[name]["description"], name
    res, text = run("configs", "cp", "train/smoke", tmp_path)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "smoke.yaml").read_text() == (REPO_CONFIGS / "train" / "smoke.yaml").read_text()
    res, text = run("configs", "cp", "configs/train/smoke.yaml", tmp_path / "smoke.yaml")
    assert res.exit_code == 1 and "exists (--overwrite replaces it)" in text
    res, text = run("configs", "cp", "smoke", tmp_path / "smoke.yaml", "--force")
    assert res.exit_code == 0, res.output
    res, text = run("configs", "cp", "no-such", tmp_path / "x.yaml")
    assert res.exit_code == 1 and "no shipped config of that name" in text and "train/smoke" in text


def test_eval_bar_moves_inside_a_generation_batch(tmp_path):
    """The bar used to move once per batch of 16 (119 s without movement): now rows count as they
    finish, in steps that add up exactly to the number of questions."""
    from shoptune.tasks import Plan
    from shoptune.eval.backends import LocalBackend
    from shoptune.models import load
    from shoptune.serve.testing import make_tiny_model

    model, tok = load(str(make_tiny_model(tmp_path / "m")), dtype="fp32")
    steps = []
    plan = Plan("generate", max_new_tokens=12)
    out = LocalBackend(model, tok, batch_size=8).run([f"Describe item {i}:" for i in range(8)], [plan] * 8,
                                                     progress=steps.append)
    assert len(out) == 8 and len(steps) > 1  # one batch, several moves
    assert sum(steps) == 8


def test_stats_reports_progress(tmp_path):
    from shoptune.data.loaders import iter_records
    from shoptune.data.stats import compute_stats
    from shoptune.models import DEFAULT_MODEL, load_tokenizer

    recs = list(iter_records(write_jsonl(tmp_path / "s.jsonl", [mc(f"Q{i}?") for i in range(5)])))
    seen = []
    st = compute_stats(recs, tokenizer=load_tokenizer(DEFAULT_MODEL), batch_size=2,
                       progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 5), (4, 5), (5, 5)] and st["tokens"]["total_input"] > 0


@needs_shared
def test_experiment_dry_run_writes_nothing_and_shows_planning(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text(f"name: e\nbase: {REPO_CONFIGS / 'train' / 'smoke.yaml'}\nsuite: tiny\nbaseline: a\n"
                 "seeds: [0]\ncells:\n  - {name: a, overrides: [lora.r=8]}\n  - {name: b, overrides: [lora.r=16]}\n")
    res, text = run("experiment", "run", p, "--out", tmp_path / "out", "--results", tmp_path / "res", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "[to run]" in text and text.count(" steps") >= 2
    assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()


def _pred(task, cap, i, score):
    return {"id": f"{task}-{i}", "task_name": task, "capability": cap, "metric": "accuracy", "score": score}


def test_compared_runs_show_a_paired_interval_or_say_none_can_be_computed(tmp_path):
    """Item 8: the demo printed 0.203 -> 0.126 with no interval; one question per task gave
    zero-width whiskers. Now a paired CI and a verdict, or "no CI" when it cannot be computed."""
    from shoptune.demo import paired_line
    from shoptune.eval.paired import format_paired, paired_compare

    caps = ("concept_understanding", "knowledge_reasoning")
    one = [[_pred(f"t{k}", caps[k % 2], 0, s) for k, s in enumerate(run)] for run in ((1, 0, 1), (0, 0, 1))]
    res = paired_compare([one[0]], [one[1]], n_boot=200, n_perm=200)
    assert res["overall"]["ci95"] is None and res["single_question_tasks"] == ["t0", "t1", "t2"]
    table = format_paired(res)
    assert "no CI (1 question per task)" in table and "cannot tell (no CI)" in table
    many = [[_pred("t0", caps[0], i, float(i % 2 if r == 0 else (i + 1) % 3 == 0)) for i in range(30)]
            for r in range(2)]
    for name, rows in zip(("eval-dev-base", "eval-dev-tuned"), many):
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = paired_line(tmp_path / "eval-dev-base", tmp_path / "eval-dev-tuned")
    # one track's questions: never called all-around (#33 item 3)
    assert re.fullmatch(r"dev: mean of 1 of 4 tracks \(concept_understanding\), not all-around "
                        r"0\.500 -> 0\.333, paired diff -0\.167 \[[-+]\d\.\d{3}, [-+]\d\.\d{3}\] "
                        r"\(95%, 30 questions\): (within noise|lower)", line), line


@needs_shared
def test_suite_help_lists_every_suite_and_overlap_says_when_the_suite_is_drawn_from_that_data():
    """Item 12: `--suite` help omitted `ranking`; "517 of 601 overlapping" with ec-guide came with
    no note that the core suite samples EC-Guide's test split."""
    from shoptune.eval.cli import _drawn_from

    res = CliRunner().invoke(app, ["eval", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert "(core, ranking, tiny)" in " ".join(res.output.replace("│", " ").split())
    notes = _drawn_from("core", ["ec-guide"])
    assert notes and "is drawn from" in notes[0] and "by construction" in notes[0]
    assert "decontaminated against suite:core" in notes[0]
    assert _drawn_from("core", ["shopbench-dev"])  # the dev set is a part too
    assert _drawn_from("tiny", [str(REPO_CONFIGS)]) == []  # unrelated data: no note


def test_data_mix_has_the_same_policy(tmp_path, data):
    cfg = tmp_path / "mix.yaml"
    cfg.write_text(f"sources: [{data}]\nsplit: train\nsplit_validation: 0.0\nsplit_test: 0.0\ndedup: false\n")
    res, text = run("data", "mix", cfg, "--out", tmp_path / "m.jsonl")
    assert res.exit_code == 0, res.output
    assert "invalid rows skipped: 1 (first: " in text and BAD in text
    assert json.loads((tmp_path / "m.jsonl.manifest.json").read_text())["skipped_invalid_rows"] == 1
    res, text = run("data", "mix", cfg, "--out", tmp_path / "f.jsonl", "--on-invalid", "fail")
    assert res.exit_code == 1 and BAD in text and not (tmp_path / "f.jsonl").exists()
