"""#31 item 32: what `shoptune eval` is told is checked before any model load: a --task-adapter
naming no task is refused (it was ignored: those questions went to the base model), an engine's
error names the --task-adapter the user typed (not the engine's own `--adapter task0=`), and
questions of tasks without a card are named. No model is loaded."""
import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from shoptune.data.loaders import load_records
from tests.conftest import mc, write_jsonl


def test_a_task_adapter_for_no_task_is_refused_before_any_load(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [mc(f"Q{i}?") for i in range(3)])
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    res = CliRunner().invoke(app, ["eval", "--model", "smollm2-135m", "--data", str(data), "--out",
                                   str(tmp_path / "o"), "--task-adapter", f"tsak2={ad}"])
    assert res.exit_code == 1 and " ".join(res.output.split()) == (
        f"error: --task-adapter tsak2={ad}: 'tsak2' is not a task (the questions' tasks: task2; "
        "`shoptune tasks ls` lists all)"), res.output
    assert not (tmp_path / "o").exists()


def test_an_engine_error_names_the_task_adapter_as_typed(monkeypatch, tmp_path):
    from shoptune.eval import engines
    from shoptune.serve.gguf import ExportError

    def refuse(kind, base, adapters, **kw):
        name = next(iter(adapters))
        raise ExportError(f"--adapter {name}={adapters[name]}: trained for another base model")
    monkeypatch.setattr(engines, "start_engine", refuse)
    server = engines.EngineServer("llama.cpp", "smollm2-135m", task_adapters={"ecguide_sa": str(tmp_path)})
    with pytest.raises(ExportError) as e:
        server.__enter__()
    assert str(e.value) == f"--task-adapter ecguide_sa={tmp_path}: trained for another base model"


def test_questions_of_tasks_without_a_card_are_named(tmp_path, capsys):
    from shoptune.eval.runner import _warn_uncarded
    odd = write_jsonl(tmp_path / "d.jsonl", [mc("A?"), mc("B?", task_name="task99"), mc("C?", task_name="task99")])
    _warn_uncarded(load_records(odd), quiet=False)
    assert " ".join(capsys.readouterr().err.split()) == (
        "warning: 2 question(s) of tasks without a task card: task99 (2); scored by their rows' "
        "task_type and metric with the generic parser (`shoptune tasks ls` lists the known tasks)")
    _warn_uncarded(load_records(odd), quiet=True)
    _warn_uncarded(load_records(odd)[:1], quiet=False)
    assert capsys.readouterr().err == ""
