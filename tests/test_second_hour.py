"""#34: past the quick start, what got in a new user's way: one name per task, help that explains
itself, config names and errors that point at the right place, honest summaries, a docs site a
reader can walk. One test (or a few) per numbered item; most run in well under a second."""
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoptune import REPO_CONFIGS
from shoptune.cli import app
from tests.conftest import REPO


def run(*args):
    """The command's result and its output on one line (help boxes and wrapping undone)."""
    res = CliRunner().invoke(app, [str(a) for a in args], terminal_width=200, env={"COLUMNS": "200"})
    return res, " ".join(res.output.replace("│", " ").split())


# ----------------------------------------------------------------------------- 6: config names

def test_a_shipped_config_is_found_by_the_name_configs_cp_prints(tmp_path, monkeypatch):
    from shoptune.configfile import resolve_config
    monkeypatch.chdir(tmp_path)  # no configs/ here
    qlora = REPO_CONFIGS / "train" / "gpu" / "qwen2.5-7b-qlora.yaml"
    assert resolve_config("gpu/qwen2.5-7b-qlora", "train") == qlora
    assert resolve_config("train/gpu/qwen2.5-7b-qlora", "train") == qlora
    assert resolve_config("smoke", "train") == REPO_CONFIGS / "train" / "smoke.yaml"
    res, text = run("configs", "cp", "qwen2.5-7b-qlora", tmp_path / "mine.yaml")
    assert res.exit_code == 0 and "copied train/gpu/qwen2.5-7b-qlora -> " in text, res.output
    named = text.split("copied ")[1].split(" -> ")[0]
    res, text = run("train", named, "--plan", "--gpu", "l4-24g")
    assert res.exit_code == 0 and "Qwen" in text and "fits" in text, res.output
    res, text = run("train", "gpu/qwen2.5-7b-qlora", "--plan")
    assert res.exit_code == 0 and "fits on:" in text, res.output


# ----------------------------------------------------------------------------- 8: where a bad value came from

def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    res, text = run("train", "smoke", "lora.r=0", f"output_dir={tmp_path / 'run'}")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert text == "error: override 'lora.r=0': lora.r: Input should be greater than or equal to 1 (got 0)", text
    assert "smoke.yaml" not in text and not (tmp_path / "run").exists()
    bad = tmp_path / "t.yaml"  # a bad value in the file is still the file's, with its line
    bad.write_text("max_steps: 3\nlora:\n  r: 0\n")
    res, text = run("train", bad, "max_steps=4", f"output_dir={tmp_path / 'run'}")
    assert text == f"error: {bad}:3: lora.r: Input should be greater than or equal to 1 (got 0)", text


# ----------------------------------------------------------------------------- 4: one cache after make setup

def test_the_cli_uses_the_cache_make_setup_filled(tmp_path, monkeypatch):
    """`make setup` converts the model into <repo>/.cache/shoptune; the CLI, run without make (no
    SHOPTUNE_CACHE_DIR), used to convert it again into ~/.cache/shoptune."""
    import platformdirs

    from shoptune import paths
    from shoptune.models import model_cache_dir
    assert "export SHOPTUNE_CACHE_DIR ?= $(CURDIR)/.cache/shoptune" in (REPO / "Makefile").read_text()
    monkeypatch.delenv("SHOPTUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "repo")
    # no checkout cache: the user's
    assert paths.cache_dir() == tmp_path / "xdg" / "shoptune" == Path(platformdirs.user_cache_dir("shoptune"))
    (tmp_path / "repo" / ".cache" / "shoptune").mkdir(parents=True)
    assert paths.cache_dir() == tmp_path / "repo" / ".cache" / "shoptune"
    assert model_cache_dir("smollm2-135m") == tmp_path / "repo" / ".cache" / "shoptune" / "models" / "smollm2-135m"
    monkeypatch.setenv("SHOPTUNE_CACHE_DIR", str(tmp_path / "mine"))  # the variable still wins
    assert paths.cache_dir() == tmp_path / "mine"
    res, text = run("--help")
    assert "else the data/ folder of the shoptune checkout" in text  # the data dir's last fallback, said


# ----------------------------------------------------------------------------- 10: a one-log run

def _text(renderable) -> str:
    from rich.console import Console
    c = Console(record=True, width=120)
    c.print(renderable)
    return c.export_text()


def test_a_run_that_logged_once_does_not_read_as_nothing_learned(tmp_path):
    from shoptune.train.cli import _loss_line
    from shoptune.train.progress import task_loss_table
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 5, "loss": 3.8635, "loss/ecguide_sa": 3.1, "loss/ecguide_mt": 4.25}) + "\n")
    once = {"first_loss": 3.8635, "final_loss": 3.8635, "loss_logs": 1, "mean_loss": 3.9012}
    line = _loss_line(once, 5)
    assert line == ("loss 3.8635 at the one logged step (logging_steps=5: too few logs to show a change; "
                    "mean loss 3.9012 over all steps)")
    table = _text(task_loss_table(log))
    assert "+0.0000" not in table and "too few logs to show a change" in table
    assert re.search(r"ecguide_mt\s+│\s+4\.2500", table) and re.search(r"ecguide_sa\s+│\s+3\.1000", table)
    # two logs: first -> last and the change, as before; a task logged once among them shows "-"
    with log.open("a") as fh:
        fh.write(json.dumps({"step": 10, "loss": 3.2, "loss/ecguide_sa": 2.6}) + "\n")
    assert _loss_line({"first_loss": 3.8635, "final_loss": 3.2, "loss_logs": 2}, 5) == "loss 3.8635 -> 3.2000"
    table = _text(task_loss_table(log))
    assert re.search(r"ecguide_sa\s+│\s+3\.1000\s+│\s+2\.6000\s+│\s+-0\.5000\s+│\s+2", table), table
    assert re.search(r"ecguide_mt\s+│\s+4\.2500\s+│\s+4\.2500\s+│\s+-\s+│\s+1", table), table


# ----------------------------------------------------------------------------- 3: one name per task

def _eval_run(out: Path, data: Path, outputs: list[str], *, before_34: bool = False) -> Path:
    """An evaluation folder as `shoptune eval` writes it (real scoring of ``outputs``);
    ``before_34``: as runs then wrote it, ShopBench's short task names in rows and scores."""
    from shoptune._io import write_json, write_jsonl
    from shoptune.data.loaders import load_records
    from shoptune.eval.scoring import score_outputs, summarize
    from shoptune.eval.suite import data_manifest
    recs = load_records([str(data)])
    rows = score_outputs(recs, outputs)
    summary = {**summarize(rows, n_boot=200), "manifest": data_manifest(recs, [str(data)]), "model": "m"}
    if before_34:
        for r in rows:
            r["task_name"] = r["task_name"].removeprefix("shopbench_")
        summary["tasks"] = {t.removeprefix("shopbench_"): v for t, v in summary["tasks"].items()}
    write_jsonl(out / "predictions.jsonl", rows)
    write_json(out / "scores.json", summary)
    return out


@pytest.fixture()
def dev_like(tmp_path):
    """Multiple-choice questions of three ShopBench tasks in two tracks (gold: option 1)."""
    from tests.conftest import mc, write_jsonl
    from shoptune.records import CAPABILITY_TO_TRACK
    track = {"task2": CAPABILITY_TO_TRACK["concept_understanding"],
             "task5": CAPABILITY_TO_TRACK["concept_understanding"],
             "task11": CAPABILITY_TO_TRACK["user_behavior_alignment"]}
    return write_jsonl(tmp_path / "dev.jsonl", [mc(f"Which fits {t} item {i}?", task_name=t, track=track[t])
                                                 for t in track for i in range(6)])


def test_a_task_has_one_name_in_eval_output_and_the_short_names_are_aliases(tmp_path, dev_like):
    from shoptune.tasks import card_name, get_card, task_aliases
    from shoptune.train.mixture import MixtureConfig
    assert len(task_aliases()) == 18 and card_name("task2") == "shopbench_task2" == get_card("task2").name
    assert card_name("ecguide_sa") == "ecguide_sa" and card_name("nope") == "nope"
    run_ = _eval_run(tmp_path / "new", dev_like, ["1"] * 12 + ["0"] * 6)
    preds = [json.loads(x) for x in (run_ / "predictions.jsonl").read_text().splitlines()]
    scores = json.loads((run_ / "scores.json").read_text())
    assert {p["task_name"] for p in preds} == set(scores["tasks"]) == {
        "shopbench_task2", "shopbench_task5", "shopbench_task11"}
    assert scores["tasks"]["shopbench_task11"]["score"] == 0.0 and scores["tasks"]["shopbench_task2"]["score"] == 1.0
    # the short names still work as input: configs, task lookups
    m = MixtureConfig(include_tasks=["task2"], exclude_tasks=["task5"], weights={"task11": 1, "*": 0},
                      per_task_caps={"task2": 3})
    assert (m.include_tasks, m.exclude_tasks, m.weights, m.per_task_caps) == (
        ["shopbench_task2"], ["shopbench_task5"], {"shopbench_task11": 1.0, "*": 0.0}, {"shopbench_task2": 3})
    res, text = run("tasks", "show", "task2")
    assert res.exit_code == 0 and "name: shopbench_task2" in res.output


def test_eval_compare_pairs_a_run_from_before_the_rename_with_a_new_one(tmp_path, dev_like):
    old = _eval_run(tmp_path / "old", dev_like, ["0"] * 18, before_34=True)
    new = _eval_run(tmp_path / "new", dev_like, ["1"] * 18)
    res = CliRunner().invoke(app, ["eval", "compare", str(old), str(new), "--n-boot", "200", "--n-perm", "200"])
    assert res.exit_code == 0, res.output
    rows = {ln.split("|")[1].strip(): ln for ln in res.output.splitlines() if ln.startswith("| shopbench_task")}
    assert set(rows) == {"shopbench_task2", "shopbench_task5", "shopbench_task11"}, res.output
    assert "| task2 " not in res.output and "| task11 " not in res.output
    assert "| 0.000 | 1.000 | +1.000 |" in rows["shopbench_task11"]  # paired question by question


def test_committed_experiment_reports_rebuild_with_card_names_and_the_same_numbers():
    """The committed results (docs/results/experiments) name tasks as ShopBench does; a report
    rebuilt from them names the cards and keeps every number (bootstrap draws included)."""
    from shoptune.experiment.report import build_report
    for name in ("subtasks", "ranking"):
        d = REPO / "docs" / "results" / "experiments" / name
        old = json.loads(re.sub(r'"task(\d+)"', r'"shopbench_task\1"', (d / "results.json").read_text()))
        new = json.loads(json.dumps(build_report(d)))
        assert any(t.startswith("shopbench_task") for c in new["cells"].values() for t in c["tasks"])
        assert not any(re.fullmatch(r"task\d+", t) for c in new["cells"].values() for t in c["tasks"])
        assert new["cells"] == old["cells"] and new["contrasts"] == old["contrasts"]


# ----------------------------------------------------------------------------- 2: names whole, tables that fit

@pytest.fixture()
def terminal_80(monkeypatch):
    """stdout as an 80-column terminal (CliRunner's is a pipe)."""
    from shoptune.console import console
    monkeypatch.setattr(console, "_force_terminal", True)
    monkeypatch.setattr(console, "_width", 80)


def test_tasks_ls_keeps_every_name_whole_at_80_columns(terminal_80):
    from shoptune.tasks import all_cards
    res = CliRunner().invoke(app, ["tasks", "ls", "--no-count-rows"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(map(len, lines)) <= 80
    words = {w for ln in lines for w in ln.split()}
    assert set(all_cards()) <= words and "…" not in res.output  # (was: shopbench_task…, concept_unders…)


def test_piped_tables_are_tab_separated_lines_with_nothing_cut():
    from shoptune.configfile import describe, shipped_configs
    from shoptune.tasks import all_cards
    res = CliRunner().invoke(app, ["tasks", "ls", "--no-count-rows"])
    lines = res.output.splitlines()
    assert lines[0] == "capability\ttask\ttype\tmetric\trows" and len(lines) == 1 + len(all_cards())
    assert [ln.split("\t")[1] for ln in lines[1:]] == list(all_cards())
    assert not re.search("[│┃━─]", res.output)
    res = CliRunner().invoke(app, ["configs", "ls"])
    rows = [ln.split("\t") for ln in res.output.splitlines()]
    assert rows[0] == ["name", "description"]
    assert rows[1:] == [[n, describe(p)] for n, p in shipped_configs()]


def test_eval_compare_rows_stay_whole_at_80_columns(tmp_path, dev_like, terminal_80):
    old = _eval_run(tmp_path / "base", dev_like, ["0"] * 18)
    new = _eval_run(tmp_path / "tuned", dev_like, ["1"] * 12 + ["0"] * 6)
    res = CliRunner().invoke(app, ["eval", "compare", str(old), str(new), "--n-boot", "200", "--n-perm", "200"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert max(map(len, lines)) <= 80, res.output
    for task, b, diff in (("shopbench_task2", "1.000", "+1.000"), ("shopbench_task11", "0.000", "+0.000")):
        # the paired table's row: name, both scores and the difference on one line
        assert any(re.match(rf"\s*{task}\s+0\.000\s+{b}\s+\{diff}\s", ln) for ln in lines), res.output
    assert any(re.match(r"\s*mean of 2 of 4 tracks\s+0\.000\s+0\.500\s+\+0\.500\s", ln) for ln in lines), res.output


# ----------------------------------------------------------------------------- 7: configs ls

def test_configs_ls_describes_every_config_in_whole_sentences():
    from shoptune.configfile import describe, shipped_configs
    from shoptune.demo import DURATION
    for name, path in shipped_configs():
        d = describe(path)
        assert d.endswith((".", "?")) and not d.endswith("..."), (name, d)  # whole, not cut mid-word
        assert not d.startswith(("accelerate ", "shoptune ", "`shoptune")), (name, d)  # not a command
        assert not re.search(r"#\d", d), (name, d)  # no internal issue numbers
    assert DURATION in describe(REPO_CONFIGS / "train" / "demo.yaml")  # (said ~6 minutes)


# ----------------------------------------------------------------------------- 5: help that explains itself

def _commands():
    """(path, click command) of every command and group, the root first."""
    import typer.main
    out = []

    def walk(cmd, path):
        out.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])
    walk(typer.main.get_command(app), [])
    return out


def test_every_option_of_every_command_is_described_in_its_help():
    """Walks every command's --help: each visible option and argument says what it is (a new
    option without a help text fails here), no flag shows a value type (``<bool>``), and an
    option with choices lists them."""
    from shoptune.console import DTYPE_METAVAR
    undescribed, kinds = [], {}
    for path, cmd in _commands():
        res, text = run(*path, "--help")
        assert res.exit_code == 0, (path, res.output)
        assert "<bool>" not in text, path
        for p in cmd.get_params(cmd.context_class(cmd)):
            name = f"shoptune {' '.join(path)} {p.opts[0] if p.param_type_name == 'option' else p.name}"
            if getattr(p, "hidden", False):
                assert p.opts[0] not in text.split(), name  # an old spelling, kept working, not shown
                continue
            helped = " ".join((p.help or "").split())
            if not helped:
                undescribed.append(name)
                continue
            assert helped[:30] in text, (name, helped[:30])
            d = getattr(p, "type_descriptor", None)  # (typer's own click: no p.type)
            choices = tuple(d.choices) if d is not None and d.is_choice else ()
            if choices:
                if p.metavar == DTYPE_METAVAR:
                    assert DTYPE_METAVAR in text, name
                else:  # (a long list folds over lines)
                    assert f"<{choices[0]}|" in text and all(c in text for c in choices), (name, choices)
            if p.param_type_name == "option" and p.name != "help":
                kinds.setdefault(p.opts[0], set()).add((bool(p.is_flag), choices))
    assert undescribed == [], "options with no help text: " + ", ".join(undescribed)
    # one meaning under one name: an option is a flag everywhere or nowhere, and its choices
    # where it has some are one list or a longer one (eval's --engine adds openai)
    for opt, k in kinds.items():
        if opt == "--json":  # (`tasks new --json COL`, the JSON column: the name issue #32 gives it)
            k = {x for x in k if x != (False, ())}
        assert len({flag for flag, _ in k}) == 1, (opt, k)
        lists = sorted((set(c) for _, c in k), key=len)
        assert all(a <= b for a, b in zip(lists, lists[1:])), (opt, k)
    res, text = run("--help")
    assert "data, training, evaluation, serving" in text


def test_renamed_options_keep_their_old_spelling_hidden(tmp_path):
    from shoptune.console import Dtype, Protocol
    from shoptune.decoding import PROTOCOLS
    from shoptune.eval.cli import Engine
    from shoptune.eval.runner import ENGINES
    from shoptune.experts import FALLBACKS
    from shoptune.serve import cli as serve_cli
    from shoptune.serve.upstream import KINDS
    from typing import get_args
    hidden = {(" ".join(path), p.opts[0]) for path, cmd in _commands()
              for p in cmd.get_params(cmd.context_class(cmd)) if getattr(p, "hidden", False)}
    assert {("serve", "--task-adapter"), ("eval compare", "--json"), ("configs cp", "--force"), ("data dedup", "--report"),
            ("tasks ls", "--rows"), ("data derive mcq", "--task"), ("data derive mcq", "--limit")} <= hidden
    res, text = run("tasks", "ls", "--no-rows")  # (still parsed: no rows counted)
    assert res.exit_code == 0 and all(ln.endswith("\t") for ln in res.output.splitlines()[1:])
    # the command line's copies of choices other modules own (kept there: no torch at start-up)
    assert get_args(Protocol) == PROTOCOLS and get_args(Engine) == ENGINES
    assert (serve_cli.KINDS, serve_cli.FALLBACKS) == (KINDS, FALLBACKS)
    from shoptune.models import torch_dtype
    assert {torch_dtype(d) for d in get_args(Dtype)} == {torch_dtype("bf16"), torch_dtype("fp32"), torch_dtype("fp16")}


# ----------------------------------------------------------------------------- 9: data mix

def test_data_mix_takes_a_training_configs_mixture_and_says_why_it_is_short(tmp_path):
    """A training config gave 13 "Extra inputs are not permitted" lines; `total: 80` gave 73 rows
    with no word on why. Now its mixture: key is the mixture, and a short task is named."""
    from tests.conftest import mc, write_jsonl
    rows = write_jsonl(tmp_path / "rows.jsonl", [mc(f"Which fits small item {i}?", task_name="task5") for i in range(5)]
                       + [mc(f"Which fits big item {i}?") for i in range(100)])
    train = tmp_path / "train.yaml"
    train.write_text(f"model: smollm2-135m\nmax_steps: 3\nmixture:\n  sources: [{rows}]\n  total: 80\n"
                     "  weights: {'*': 1}\n  split_test: 0\n  split_validation: 0\n  dedup: false\n")
    out = tmp_path / "mix.jsonl"
    res, text = run("data", "mix", train, "--out", out)
    assert res.exit_code == 0, res.output
    assert "a training config; building its mixture: key" in text and "Extra inputs" not in text
    assert ("45 of the 80 rows asked (total): 1 task(s) have fewer rows than their share asks for "
            "(upsample: true repeats their rows): shopbench_task5 5 of 40") in text, text
    manifest = json.loads((tmp_path / "mix.jsonl.manifest.json").read_text())
    assert manifest["rows"] == 45 and manifest["short_tasks"] == {"shopbench_task5": {"asked": 40, "rows": 5}}
    assert len(out.read_text().splitlines()) == 45
    # overrides apply inside the mixture: key; a bad one is the override's fault
    res, text = run("data", "mix", train, "--out", tmp_path / "m2.jsonl", "upsample=true")
    assert res.exit_code == 0 and "80 rows over 2 tasks" in text and "asked" not in text, text
    res, text = run("data", "mix", train, "--out", tmp_path / "m3.jsonl", "total=0")
    assert text == "error: override 'total=0': total: Input should be greater than or equal to 1 (got 0)", text
    train.write_text(train.read_text().replace("total: 80", "total: -1"))
    res, text = run("data", "mix", train, "--out", tmp_path / "m4.jsonl")
    assert text == f"error: {train}:5: total: Input should be greater than or equal to 1 (got -1)", text


# ----------------------------------------------------------------------------- 12: a docs site a reader can walk

def test_every_page_is_in_the_nav_and_no_heading_cites_an_issue_number():
    import yaml
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]

    def pages(items):
        for item in items:
            for v in item.values():
                yield from (pages(v) if isinstance(v, list) else [v])
    listed = set(pages(nav))
    on_disk = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")}
    assert on_disk - listed == set() and len([p for p in listed if p.startswith("results/")]) == 24
    headings = [(p, ln) for p in sorted(on_disk) for ln in (REPO / "docs" / p).read_text().splitlines()
                if re.match(r"#+ ", ln) and re.search(r"#\d", ln)]
    assert headings == []  # ("(#10)", "Scaling up (#23)": internal issue numbers)
    assert "(getting-started.md)" in (REPO / "docs" / "index.md").read_text()  # (named the README, unlinked)
    assert not re.search(r"#\d+ recipe", " ".join((REPO / "docs" / p).read_text() for p in on_disk))


def test_getting_started_and_readme_agree_on_the_quick_start_and_the_test_times():
    readme = (REPO / "README.md").read_text()
    start = (REPO / "docs" / "getting-started.md").read_text()
    block = lambda text: text.split("## Quick start" if "## Quick start" in text else "## The quick start", 1)[1] \
        .split("```bash", 1)[1].split("```", 1)[0]
    assert block(readme) == block(start)  # the same commands, the same comments and times
    for text in (readme, start):
        flat = " ".join(text.split())
        assert "`make test` took 2161 s (36 min) of pytest on a 2-core Intel Xeon" in flat
        assert "make test-fast" in flat and "otherwise idle machine" in flat
