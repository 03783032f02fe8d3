"""The training config schema refuses bad values before any work, with one line per bad field,
and ``shoptune train`` reports them (and a bad output folder) without a traceback or leftovers."""
import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from shoptune.train.config import ConfigError, load_config
from tests.conftest import REPO

SMOKE = REPO / "configs/train/smoke.yaml"


@pytest.mark.parametrize("override, field", [
    ("learning_rate=-1", "learning_rate"),
    ("learning_rate=0", "learning_rate"),
    ("learning_rate=.nan", "learning_rate"),
    ("max_steps=0", "max_steps"),
    ("lora.r=0", "lora.r"),
    ("lora.alpha=-2", "lora.alpha"),
    ("lora.dropout=1.5", "lora.dropout"),
    ("batch_size=0", "batch_size"),
    ("save_steps=0", "save_steps"),
    ("logging_steps=0", "logging_steps"),
    ("weight_decay=-0.1", "weight_decay"),
    ("three_stage.eval_every=0", "three_stage.eval_every"),
    ("mixture.total=0", "mixture.total"),
    ("mixture.temperature=-1", "mixture.temperature"),
])
def test_out_of_range_values_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    msg = str(e.value)
    assert msg.startswith(f"override {override!r}: {field}: "), msg  # (#34: not the file's fault)
    assert "\n" not in msg  # one bad field, one line


def test_several_bad_fields_give_one_line_each():
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, ["learning_rate=-1", "max_steps=0"])
    lines = str(e.value).splitlines()
    assert [ln.split(": ")[1] for ln in lines] == ["max_steps", "learning_rate"]


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir: .*taken exists and is not a folder"):
        load_config(SMOKE, [f"output_dir={f}"])
    with pytest.raises(ConfigError, match="is not a folder"):  # a file as a parent, too
        load_config(SMOKE, [f"output_dir={f}/run"])


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("max_steps: 3\nlora: {r: 8\n")
    with pytest.raises(ConfigError, match=rf"^{p}:\d+: not valid YAML"):
        load_config(p)


@pytest.mark.parametrize("override", ["learning_rate=-1", "OUTFILE"])
def test_train_cli_fails_cleanly_and_leaves_nothing(tmp_path, override):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    out = tmp_path / "run"
    args = [f"output_dir={taken}"] if override == "OUTFILE" else [f"output_dir={out}", override]
    res = CliRunner().invoke(app, ["train", str(SMOKE), *args])
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # typer.Exit, not an exception escaping
    assert "error:" in res.output and "Traceback" not in res.output
    assert not out.exists()
    assert taken.read_text() == "keep me"


def test_failed_run_removes_the_folder_it_created(tmp_path, monkeypatch):
    """A run that fails before any checkpoint (here: the mixture selects nothing) leaves no
    output folder behind; a folder that existed before is kept."""
    from shoptune.train import recipe
    out = tmp_path / "new"
    cfg = load_config(SMOKE, [f"output_dir={out}"])
    monkeypatch.setattr(recipe, "build_mixture", lambda m, **kw: ([], {}))
    with pytest.raises(ValueError, match="selected no training rows"):
        recipe.main(cfg)
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(ValueError):
        recipe.main(cfg)
    assert (out / "mine.txt").exists()


@pytest.mark.parametrize("overrides, message", [
    (["peft=poly", "packing=true"], "packing: true puts several examples in one row"),
    (["peft=poly", "quantization=nf4"], "not quantization: nf4")])
def test_poly_refuses_packing_and_quantization(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
