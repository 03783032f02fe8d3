"""#20 items 13-14 and the CLI minor items: a bad input, path, config or server is one line
(``error: ...`` naming the file, line and key, or the URL), exit non-zero, and nothing is
written; a real bug keeps its traceback. Offline, no model loaded."""
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from tests.conftest import REPO, mc, write_jsonl

SMOKE = REPO / "configs/train/smoke.yaml"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(res, code: int = 1) -> str:
    """The single ``error:`` line of a clean failure (no exception escaped the CLI)."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and "errors.pydantic.dev" not in res.output
    return lines[0]


@pytest.fixture()
def rows(tmp_path) -> Path:
    return write_jsonl(tmp_path / "d.jsonl", [mc(f"Q{i}?") for i in range(30)])


# ----------------------------------------------------------------------------- item 13/14: data mix

@pytest.mark.parametrize("text, expect", [
    ("sources: [d.jsonl\ntotal: 3\n", "m.yaml:2: not valid YAML: expected ',' or ']'"),
    ("- a\n- b\n", "m.yaml:1: a mixture must be a YAML mapping (key: value lines), not a list"),
    ("", "m.yaml: empty mixture"),
    ("sources: []\n", "m.yaml:1: sources: List should have at least 1 item"),
    ("sources: [D]\nweights: {shopbench_task2: -1}\n",
     "m.yaml:2: weights.shopbench_task2: Input should be greater than or equal to 0 (got -1)"),
    ("sources: [D]\nweights: {shopbench_task2: 0}\n", "weights: every weight is 0"),
    ("sources: [J]\n", "m.yaml: sources ["),
    ("sources: [D]\ninclude_tasks: [nope]\n", "m.yaml: include_tasks: 'nope' has no rows in the sources "
                                              "(tasks in the sources: shopbench_task2)"),
    ("sources: [D]\nexclude_tasks: [shopbench_tsak2]\n", "exclude_tasks: 'shopbench_tsak2' is not a known task"),
    ("sources: [D]\ninclude_capabilities: [multilingual]\n", "m.yaml: the mixture selects no rows: 30 valid rows"),
])
def test_data_mix_refuses_a_bad_or_empty_mixture_in_one_line(tmp_path, rows, text, expect):
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(text.replace("[D]", f"[{rows}]").replace("[J]", f"[{junk}]"))
    out = tmp_path / "mix.jsonl"
    msg = one_line(invoke("data", "mix", cfg, "--out", out, "dedup=false"))
    assert expect in msg, msg
    assert not out.exists() and not list(tmp_path.glob("mix.jsonl*"))


def test_data_mix_junk_sources_say_why(tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"sources: [{junk}]\n")
    msg = one_line(invoke("data", "mix", cfg, "--out", tmp_path / "o.jsonl"))
    assert "no valid rows (1 problem(s); first: " in msg and "junk.jsonl:1: invalid JSON" in msg


def test_a_mixture_that_is_not_text_or_not_a_file_is_one_line(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_bytes(b"sources: [\xff\xfe]\n")
    assert one_line(invoke("data", "mix", cfg, "--out", tmp_path / "o.jsonl")) == \
        f"error: {cfg}: not UTF-8 text (byte 10)"
    assert one_line(invoke("data", "mix", tmp_path, "--out", tmp_path / "o.jsonl")) == \
        f"error: {tmp_path}: is a folder (a mixture is wanted here)"
    assert one_line(invoke("data", "mix", tmp_path / "nope.yaml", "--out", tmp_path / "o.jsonl")) == \
        f"error: {tmp_path / 'nope.yaml'}: No such file or directory"


@pytest.mark.parametrize("override, expect", [
    ("=5", "override '=5': the key is empty"),
    ("total", "override 'total': expected key=value"),
    ("weights.x=[1", "override 'weights.x=[1': weights.x: not a YAML value"),
    ("total=0", "override 'total=0': total: Input should be greater than or equal to 1 (got 0)"),
])
def test_data_mix_overrides_are_one_line_naming_the_key(tmp_path, rows, override, expect):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"sources: [{rows}]\ntotal: 5\n")
    msg = one_line(invoke("data", "mix", cfg, "--out", tmp_path / "o.jsonl", override))
    assert expect in msg, msg


# ----------------------------------------------------------------------------- item 13: --out

def test_out_paths_that_cannot_be_written_are_one_line_before_any_work(tmp_path, rows):
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("keep me")
    adir.mkdir()
    (adir / "x").write_text("keep")
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"sources: [{rows}]\ndedup: false\n")
    cases = [
        (["data", "mix", cfg, "--out", adir], f"{adir}: is a folder (a file name is wanted here)"),
        (["data", "split", rows, "--out", afile], f"{afile}: exists and is not a folder"),
        (["data", "split", rows, "--out", afile / "sub"], f"{afile}: exists and is not a folder"),
        (["data", "dedup", rows, "--out", adir], f"{adir}: is a folder"),
        (["data", "derive", "mcq", rows, "--out", adir], f"{adir}: is a folder"),
        (["eval", "--model", "smollm2-135m", "--data", rows, "--out", afile],
         f"{afile}: exists and is not a folder"),
        (["export", "gguf", "--model", "smollm2-135m", "--out", afile], f"{afile}: exists and is not a folder"),
    ]
    if Path("/proc/self").is_dir():  # a place even root cannot create a file in
        cases.append((["data", "dedup", rows, "--out", "/proc/x.jsonl"],
                      "/proc/x.jsonl: cannot write there"))
    for args, expect in cases:
        msg = one_line(invoke(*args))
        assert expect in msg, (args, msg)
    assert afile.read_text() == "keep me" and sorted(p.name for p in adir.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "d.jsonl", "m.yaml"]


def test_eval_against_a_closed_port_is_one_line_naming_the_url(tmp_path, rows):
    from shoptune.serve.testing import free_port
    url = f"http://127.0.0.1:{free_port()}/v1"
    res = invoke("eval", "--model", "m", "--data", rows, "--out", tmp_path / "o", "--backend", "openai",
                 "--base-url", url, "--limit", 3)
    err = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert err == [f"error: --base-url {url}: cannot connect ([Errno 111] Connection refused)"], res.output
    assert "Traceback" not in res.output and not (tmp_path / "o" / "scores.json").exists()


# ----------------------------------------------------------------------------- minor: --limit

def test_limit_below_one_is_refused(tmp_path, rows):
    for args in (["eval", "--model", "m", "--data", rows, "--out", tmp_path / "o", "--limit", "-1"],
                 ["data", "derive", "mcq", rows, "--out", tmp_path / "m.jsonl", "--limit", "0"]):
        res = invoke(*args)
        assert res.exit_code == 2 and "Invalid value for '--limit'" in res.output, res.output
        assert "greater than or equal to 1" in " ".join(res.output.split())
    from shoptune.eval.runner import evaluate
    with pytest.raises(ValueError, match="limit -1: must be at least 1"):
        evaluate(model="m", data=[str(rows)], out=tmp_path / "o", limit=-1)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.jsonl").exists()


# ----------------------------------------------------------------------------- item 14: derive mcq

def test_derive_mcq_without_generation_rows_writes_nothing(tmp_path, rows):
    out = tmp_path / "m.jsonl"
    msg = one_line(invoke("data", "derive", "mcq", rows, "--out", out))
    assert "no generation rows to make multiple-choice questions from (30 rows; task types: " \
           "multiple-choice=30)" in msg
    assert not out.exists() and not (tmp_path / "cards").exists() and not out.with_suffix(".report.json").exists()


# ----------------------------------------------------------------------------- minor: config errors

@pytest.mark.parametrize("override, expect", [
    ("lora.target_modules=[q_proj", "error: override 'lora.target_modules=[q_proj': lora.target_modules: "
                                    "not a YAML value (expected ',' or ']', but got '<stream end>')"),
    ("=5", "error: override '=5': the key is empty (expected key=value, e.g. lora.r=32)"),
    ("lora.target_modules=5", "error: override 'lora.target_modules=5': lora.target_modules: Input should be 'attention' or "
                              "'attention+mlp'; or Input should be a valid list (got 5)"),
    ("lora.r.x=1", "error: override 'lora.r.x=1': lora.r is not a section"),
])
def test_train_override_errors_are_one_line_naming_the_key(tmp_path, override, expect):
    res = invoke("train", SMOKE, f"output_dir={tmp_path / 'run'}", override)
    assert one_line(res) == expect
    assert not (tmp_path / "run").exists()


def test_config_file_errors_name_file_line_and_key(tmp_path):
    from shoptune.train.config import ConfigError, load_config
    p = tmp_path / "t.yaml"
    p.write_text("max_steps: 3\nlora:\n  r: 0\n  alpha: -1\nmixture:\n  sources: [a]\n  bogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).splitlines() == [
        f"{p}:7: mixture.bogus: Extra inputs are not permitted (got 1)",
        f"{p}:3: lora.r: Input should be greater than or equal to 1 (got 0)",
        f"{p}:4: lora.alpha: Input should be greater than 0 (got -1)"]
    with pytest.raises(ConfigError, match=r"^override 'lora.r=0': lora.r: .* \(got 0\)$"):  # not the file's
        load_config(p, ["lora.r=0", "lora.alpha=1", "mixture={sources: [a]}"])


def test_validate_lists_every_problem_of_a_row(tmp_path):
    p = write_jsonl(tmp_path / "v.jsonl", [{"input_field": 5}])
    res = invoke("data", "validate", p)
    assert res.exit_code == 1
    assert res.output.splitlines()[:2] == [f"{p}:1: input_field: must be a string, got int",
                                           f"{p}:1: output_field: missing"], res.output


# ----------------------------------------------------------------------------- the central handler

def test_a_bug_keeps_its_traceback_and_expected_errors_become_one_line(tmp_path, rows, monkeypatch):
    import shoptune.data.splits as splits
    from shoptune.serve.gguf import ExportError as ProjectError  # (not a ValueError)

    def boom(*a, **k):
        raise KeyError("boom")
    monkeypatch.setattr(splits, "split_records", boom)
    res = invoke("data", "split", rows, "--out", tmp_path / "s")
    assert isinstance(res.exception, KeyError)  # not turned into a tidy line: a bug stays visible

    def expected(*a, **k):  # the project's own error classes, raised anywhere, are one line
        raise ProjectError("a reason the user can act on")
    monkeypatch.setattr(splits, "split_records", expected)
    assert one_line(invoke("data", "split", rows, "--out", tmp_path / "s")) == \
        "error: a reason the user can act on"
    monkeypatch.setenv("SHOPTUNE_TRACEBACK", "1")
    assert isinstance(invoke("data", "split", rows, "--out", tmp_path / "s").exception, ProjectError)


def test_error_lines_are_not_read_as_markup():
    from shoptune.console import error_message
    from shoptune.train.mixture import MixtureError
    res = CliRunner().invoke(app, ["tasks", "show", "[bold]x[/]"])
    assert "[bold]x[/]" in res.output and res.exit_code == 1
    assert error_message(MixtureError("a [b] c")) == "a [b] c"
    assert error_message(ValueError("a bug")) is None and error_message(KeyError("k")) is None
    e = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert error_message(e) == "/x/y: No such file or directory"


# ----------------------------------------------------------------------------- minor: file modes

@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_written_files_and_folders_honour_the_umask(tmp_path, rows, mask, file_mode, dir_mode):
    from shoptune._io import atomic_open, make_temp_dir, write_json
    old = os.umask(mask)
    try:
        write_json(tmp_path / "a" / "x.json", {"a": 1})
        made = make_temp_dir(tmp_path, ".t-")
        res = invoke("data", "split", rows, "--out", tmp_path / "split")
        keep = tmp_path / "private.txt"
        keep.write_text("x")
        keep.chmod(0o600)
        with atomic_open(keep) as fh:  # a replaced file keeps its mode, as with open()
            fh.write("y")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "a" / "x.json") == file_mode and mode(tmp_path / "a") == dir_mode
    assert mode(made) == dir_mode
    assert {mode(p) for p in (tmp_path / "split").iterdir()} == {file_mode}
    assert mode(tmp_path / "split") == dir_mode
    assert mode(keep) == 0o600 and keep.read_text() == "y"


def test_an_unwritable_target_is_named_not_its_temp_file():
    from shoptune._io import write_jsonl
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    with pytest.raises(OSError) as e:
        write_jsonl("/proc/x.jsonl", [{"a": 1}])
    assert e.value.filename == "/proc/x.jsonl" and "cannot write" in e.value.strerror
    with pytest.raises(IsADirectoryError) as e:
        write_jsonl("/proc", [])
    assert e.value.filename == "/proc"

