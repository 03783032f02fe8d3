"""#24 item 10: what `shoptune train` prints and where it writes. A random tiny model (real
tokenizer) trains in seconds: `--out` like every other command, an output folder holding a run
is refused without --resume/--overwrite, short runs print a loss (never `None`), resumed runs
round it, per-task losses are a table, and no transformers FutureWarning reaches the terminal."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from tests.conftest import REPO, mc, write_jsonl

SMOKE = REPO / "configs/train/smoke.yaml"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from shoptune.serve.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture()
def args(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [mc(f"Which colour is item {i}?") for i in range(40)])
    return [str(SMOKE), f"model={tiny_model}", f"mixture.sources=[{data}]", "mixture.total=16",
            "mixture.exclude_tasks=[]", "batch_size=4", "max_length=96", "report_to=[]", "save_steps=2"]


def invoke(*a):
    return CliRunner().invoke(app, ["train", *map(str, a)])


def out_of(res) -> str:
    return " ".join(res.output.split())


def test_out_option_short_run_loss_and_rerun_policy(tmp_path, args):
    out = tmp_path / "run"
    res = invoke(*args, "max_steps=3", "--out", out)
    assert res.exit_code == 0, res.output
    text = out_of(res)
    # (the bug: "loss None -> None"; not any "None": a progress frame caught under load may hold one)
    assert "loss None" not in text and "-> None" not in text
    assert "mean loss " in text and "(no step logged: logging_steps=5 > steps)" in text
    assert "invalid rows skipped: 0" in text
    assert (out / "adapter" / "adapter_config.json").exists()
    # (#31 item 34) readable as any other output, not safetensors' 0600: checkpoints too
    from shoptune._io import umask
    for f in (out / "adapter" / "adapter_model.safetensors", out / "checkpoint-2" / "adapter_model.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask(), f
    # the same folder again: refused, nothing touched
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    res = invoke(*args, "max_steps=3", "--out", out)
    assert res.exit_code == 1 and f"error: {out} already holds a training run (adapter, run.json" in out_of(res)
    assert "--resume continues it, --overwrite starts over" in out_of(res)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    # --overwrite says so and starts over; output_dir= still works; both at once must agree
    (out / "notes.txt").write_text("mine")
    res = invoke(*args, "max_steps=2", f"output_dir={out}", "--overwrite", "logging_steps=1")
    assert res.exit_code == 0, res.output
    assert f"{out}: removed the earlier run (adapter, run.json" in out_of(res)
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files go
    assert json.loads((out / "run.json").read_text())["metrics"]["steps"] == 2
    res = invoke(*args, f"output_dir={tmp_path / 'a'}", "--out", tmp_path / "b")
    assert res.exit_code == 2 and "two output folders" in out_of(res)


def test_train_never_writes_into_a_users_folder_or_an_input(tmp_path, args):
    """#31: a folder holding someone's files and no earlier run is refused, --overwrite or not; an
    --out that is, holds or sits in an input (the data) is always refused. Nothing is touched."""
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "paper.tex").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for out, says in ((tmp_path / "thesis", "holds files shoptune did not write (paper.tex)"),
                      (tmp_path, "holds an input"), (tmp_path / "d.jsonl", "exists and is not a folder"),
                      (Path(args[1].partition("=")[2]).parent, "holds an input"),  # the model folder's
                      (Path(args[1].partition("=")[2]) / "run", "is inside the input folder")):
        for extra in ([], ["--overwrite"], ["--resume"]):
            res = invoke(*args, "max_steps=1", "--out", out, *extra)
            assert res.exit_code == 1 and says in out_of(res), (out, extra, res.output)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_per_task_losses_are_a_table_and_resume_rounds(tmp_path, args):
    data = write_jsonl(tmp_path / "two.jsonl", [mc(f"Which colour is item {i}?") for i in range(20)]
                       + [mc(f"Which size is item {i}?", task_name="task1") for i in range(20)])
    a = [x if not x.startswith("mixture.sources=") else f"mixture.sources=[{data}]" for x in args]
    out = tmp_path / "run"
    res = invoke(*a, "max_steps=4", "logging_steps=1", "--out", out)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert not any("'loss/" in ln or "{'loss'" in ln for ln in lines), res.output  # no raw dict
    assert any("training loss per task" in ln for ln in lines)
    assert any(ln.lstrip("│ ").startswith("shopbench_task1") for ln in lines)
    assert any(ln.lstrip("│ ").startswith("shopbench_task2") for ln in lines)
    # resuming a finished run: the losses it reports are rounded, not 4.326401710510254
    res = invoke(*a, "max_steps=4", "logging_steps=1", "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    loss = next(ln for ln in res.output.splitlines() if ln.startswith("loss "))
    first, last = loss.split()[1], loss.split()[3]
    assert len(first.split(".")[1]) == 4 and len(last.split(".")[1]) == 4, loss

    # #31 items 18, 30 on the same run (no more training): resuming it under another adapter
    # structure, from a checkpoint damaged after its COMPLETE marker, or from a folder holding no
    # run is one line naming why; nothing is trained or written
    ckpt = out / "checkpoint-4"
    res = invoke(*a, "max_steps=4", "--out", out, "--resume", "peft=poly")
    assert res.exit_code == 1 and "Traceback" not in res.output and (
        f"error: {ckpt}: saved by a run with peft_type 'LORA', but this config gives 'POLY' (peft): "
        "resume with the run's own config, or --overwrite to start over") in out_of(res), res.output
    opt = ckpt / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:len(opt.read_bytes()) // 2])
    res = invoke(*a, "max_steps=4", "--out", out, "--resume")
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert f"error: {opt}: not a whole torch file (" in out_of(res) and \
        "remove checkpoint-4 to resume from the one before" in out_of(res), res.output
    (tmp_path / "empty").mkdir()
    for missing, why in ((tmp_path / "nothing", "no such folder"), (tmp_path / "empty", "no checkpoint, adapter or log")):
        res = invoke(*a, "max_steps=4", "--out", missing, "--resume")
        assert res.exit_code == 1 and out_of(res) == (
            f"error: --resume: {missing} holds no training run to continue ({why}"
            + ("" if why == "no such folder" else " there") + "); run without --resume to start one"), res.output
    assert not (tmp_path / "nothing").exists()


def test_on_invalid_fail_stops_training_before_any_work(tmp_path, args):
    bad = write_jsonl(tmp_path / "bad.jsonl", [mc(f"Q{i}?") for i in range(20)] + [mc("Odd?", gold=7)])
    a = [x if not x.startswith("mixture.sources=") else f"mixture.sources=[{bad}]" for x in args]
    res = invoke(*a, "max_steps=1", "--out", tmp_path / "r", "--on-invalid", "fail")
    assert res.exit_code == 1 and "bad.jsonl:21: output_field: option index 7 out of range" in out_of(res)
    assert not (tmp_path / "r").exists()
    res = invoke(*a, "max_steps=1", "--out", tmp_path / "r")
    assert res.exit_code == 0 and "invalid rows skipped: 1 (first: " in out_of(res), res.output


def test_no_transformers_future_warnings_on_the_command_line(tmp_path, args):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "PYTHONWARNINGS": "default"}
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", "train", *args, "max_steps=1",
                        "--out", str(tmp_path / "w")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FutureWarning" not in r.stderr + r.stdout, r.stderr[-2000:]
