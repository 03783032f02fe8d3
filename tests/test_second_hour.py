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


def run(*args, width: int = 200):
    res = CliRunner().invoke(app, [str(a) for a in args], terminal_width=width, env={"COLUMNS": str(width)})
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
