"""#20 item 16: `export gguf` checks adapter names and adapter-vs-base fit before converting,
and writes OUT atomically (a failed export leaves OUT as it was). None of these needs the
llama.cpp converters: the converter step is replaced where a conversion would run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import shoptune.serve.gguf as gguf
from shoptune._io import OUTPUT_MARKER, OutputError
from shoptune.serve.gguf import ExportError, _adapter_name, export_gguf


@pytest.fixture(scope="module")
def fx(tiny):
    return tiny


@pytest.fixture()
def no_converter(monkeypatch):
    """Fail the test if a conversion is attempted (the checks must come first)."""
    def refuse(*a, **k):
        raise AssertionError("the llama.cpp converter was reached")
    monkeypatch.setattr(gguf, "llama_cpp_dir", refuse)


@pytest.mark.parametrize("spec", ["../../evil=DIR", "=DIR", ".hidden=DIR", "a/b=DIR", "a b=DIR",
                                  "-x=DIR", "x" * 129 + "=DIR"])
def test_adapter_names_follow_the_servers_rule(spec):
    with pytest.raises(ExportError, match="cannot be an adapter name"):
        _adapter_name(spec)


def test_good_adapter_names_and_folders():
    assert _adapter_name("shop.v2=runs/x") == ("shop.v2", Path("runs/x"))
    assert _adapter_name("runs/quality/adapter") == ("quality", Path("runs/quality/adapter"))
    with pytest.raises(ExportError, match="no adapter folder"):
        _adapter_name("name=")


def test_bad_names_and_foreign_adapters_are_refused_before_converting(fx, tmp_path, no_converter):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"'\.\./\.\./evil' cannot be an adapter name"):
        export_gguf(str(fx["base"]), [f"../../evil={fx['good']}"], out)
    with pytest.raises(ExportError, match=r"^--adapter m=.*: adapter .* was trained for a different base "
                                          r"model \(.*tiny-32\), not .*: model\.layers\.0\."):
        export_gguf(str(fx["base"]), [f"good={fx['good']}", f"m={fx['mismatch']}"], out)
    with pytest.raises(ExportError, match="is the base model's file"):
        export_gguf(str(fx["base"]), [f"{fx['base'].name}={fx['good']}"], out)
    with pytest.raises(ExportError, match="a PROMPT_TUNING adapter"):
        export_gguf(str(fx["base"]), [f"p={fx['prompt_tuning']}"], out)
    assert not out.exists()


def test_the_cli_says_the_mismatch_in_one_line(fx, tmp_path):
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", "export", "gguf", "--model", str(fx["base"]),
                        "--adapter", f"m={fx['mismatch']}", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "was trained for a different base model" in lines[0], r.stderr
    assert "is invalid" not in r.stderr and not (tmp_path / "o").exists()


def _fake_converter(monkeypatch, tmp_path, fail_on: str | None):
    """Converters that write their --outfile (half of it, then fail, for ``fail_on``)."""
    monkeypatch.setattr(gguf, "llama_cpp_dir", lambda: tmp_path)

    def run(cmd, what):
        target = Path(cmd[cmd.index("--outfile") + 1])
        target.write_bytes(b"GGUF" + what.encode())
        if fail_on and fail_on in what:
            raise ExportError(f"{what}: llama.cpp's converter failed: boom")
    monkeypatch.setattr(gguf, "_run", run)


def test_a_failed_export_leaves_out_as_it_was(fx, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fake_converter(monkeypatch, tmp_path, fail_on="adapter b")
    with pytest.raises(ExportError, match="adapter b"):  # the base and adapter a were converted
        export_gguf(str(fx["base"]), [f"a={fx['good']}", f"b={fx['good2']}"], out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no partial .gguf, no temp
    _fake_converter(monkeypatch, tmp_path, fail_on=None)
    m = export_gguf(str(fx["base"]), [f"a={fx['good']}"], out)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a.gguf", "manifest.json", "tiny-64.gguf"]
    assert json.loads((out / "manifest.json").read_text()) == m and m["adapters"] == {"a": "a.gguf"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputError, match="--overwrite replaces it"):
        export_gguf(str(fx["base"]), [f"a={fx['good2']}"], out)
    _fake_converter(monkeypatch, tmp_path, fail_on="base model")
    with pytest.raises(ExportError):
        export_gguf(str(fx["base"]), [f"a={fx['good2']}"], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export intact
    _fake_converter(monkeypatch, tmp_path, fail_on=None)
    m = export_gguf(str(fx["base"]), [f"b={fx['good2']}"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b.gguf", "manifest.json", "tiny-64.gguf"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        export_gguf(str(fx["base"]), [f"b={fx['good2']}"], out, overwrite=True)
