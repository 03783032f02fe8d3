"""No command deletes or overwrites what it did not write (#31): the one mechanism every command
that writes a folder uses (``_io.output_dir``), and the single-file rule (``check_new_file``)."""
import json
import os
import stat

import pytest

from shoptune._io import (OUTPUT_MARKER, OutputError, check_new_file, check_output_dir, output_dir,
                          read_marker)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _write(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)


def test_a_new_folder_appears_whole_marked_and_nothing_else_is_left(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_dir(out, command="export merge") as tmp:
        assert tmp.parent == out.parent and not out.exists()
        _write(tmp, **{"x.json": "{}"})
    assert sorted(os.listdir(out)) == [OUTPUT_MARKER, "x.json"]
    assert read_marker(out)["command"] == "export merge" and read_marker(out)["files"] == ["x.json"]
    assert sorted(os.listdir(out.parent)) == ["out"]  # no hidden temp folder


def test_a_failure_leaves_nothing_behind_and_the_earlier_output_intact(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError):
        with output_dir(out, command="export merge") as tmp:
            _write(tmp, **{"half.bin": "x"})
            raise RuntimeError("converter died")
    assert not (tmp_path / "new").exists()  # not even the parents it made
    old = tmp_path / "old"
    with output_dir(old, command="export merge") as tmp:
        _write(tmp, **{"w.bin": "v1"})
    with pytest.raises(KeyboardInterrupt):
        with output_dir(old, command="export merge", overwrite=True) as tmp:
            _write(tmp, **{"w.bin": "v2"})
            raise KeyboardInterrupt
    assert (old / "w.bin").read_text() == "v1" and sorted(os.listdir(tmp_path)) == ["old"]


def test_a_users_folder_is_never_replaced_even_with_overwrite(tmp_path):
    paper = tmp_path / "thesis"
    paper.mkdir()
    _write(paper, **{"paper.tex": "my work"})
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="holds files shoptune did not write .paper.tex."):
            with output_dir(paper, command="export merge", overwrite=overwrite):
                pytest.fail("the body must not run")
    assert _tree(paper) == ["paper.tex"] and (paper / "paper.tex").read_text() == "my work"
    assert sorted(os.listdir(tmp_path)) == ["thesis"]


def test_an_earlier_output_is_replaced_only_with_overwrite_and_only_if_nothing_was_added(tmp_path):
    out = tmp_path / "merged"
    with output_dir(out, command="export merge") as tmp:
        _write(tmp, **{"w.bin": "v1"})
    with pytest.raises(OutputError, match="earlier `shoptune export merge` output; --overwrite replaces it"):
        check_output_dir(out, command="export merge")
    with pytest.raises(OutputError, match="output of `shoptune data split`, not of `shoptune export merge`"):
        write_marker_as(out, "data split")
        check_output_dir(out, command="export merge", overwrite=True)
    write_marker_as(out, "export merge")
    with output_dir(out, command="export merge", overwrite=True) as tmp:
        _write(tmp, **{"w.bin": "v2", "new.json": "{}"})
    assert (out / "w.bin").read_text() == "v2" and read_marker(out)["files"] == ["new.json", "w.bin"]
    _write(out, **{"notes.txt": "mine"})  # the user adds a file to the output: it is theirs now
    with pytest.raises(OutputError, match=r"did not write \(notes.txt\)"):
        check_output_dir(out, command="export merge", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def write_marker_as(folder, command):
    meta = json.loads((folder / OUTPUT_MARKER).read_text())
    (folder / OUTPUT_MARKER).write_text(json.dumps({**meta, "command": command}))


def test_out_as_an_input_its_parent_or_inside_it_is_always_refused(tmp_path, monkeypatch):
    inputs = tmp_path / "adapters"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    _write(inputs, **{"README": "keep"})
    for out, why in ((inputs / "a", "is an input"), (inputs, "holds an input"), (tmp_path, "holds an input"),
                     (inputs / "a" / "merged", "is inside the input folder")):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match=why):
                check_output_dir(out, command="export merge", inputs=[inputs / "a", inputs / "b"],
                                 overwrite=overwrite)
    monkeypatch.chdir(inputs / "b")  # `--out .`, `--out ..`: the current folder or one holding it
    for out in (".", ".."):
        with pytest.raises(OutputError, match="is the current folder"):
            check_output_dir(out, command="export merge", overwrite=True)
    assert _tree(inputs) == ["README", "a", "b"]


def test_an_existing_empty_folder_is_used_and_a_file_in_the_way_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with output_dir(tmp_path / "empty", command="data split") as tmp:
        _write(tmp, **{"train.jsonl": ""})
    assert sorted(os.listdir(tmp_path / "empty")) == [OUTPUT_MARKER, "train.jsonl"]
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "afile", command="data split")


def test_outputs_are_readable_by_other_users_even_what_safetensors_writes(tmp_path):
    """#31 item 34: safetensors 0.8 writes 0600; every output gets the mode a plain open gives."""
    import torch
    from safetensors.torch import save_file
    old = os.umask(0o022)
    try:
        with output_dir(tmp_path / "out", command="export experts") as tmp:
            (tmp / "e").mkdir()
            save_file({"w": torch.zeros(2)}, str(tmp / "e" / "adapter_model.safetensors"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "e" / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out" / "e").stat().st_mode) == 0o755


def test_a_single_file_output_replaces_an_existing_file_only_with_overwrite_and_never_an_input(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("rows")
    mine = tmp_path / "mix.jsonl"
    mine.write_text("someone's file")
    with pytest.raises(OutputError, match="exists; --overwrite replaces it"):
        check_new_file(mine)
    assert check_new_file(mine, overwrite=True) == mine
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="is an input"):
            check_new_file(data, inputs=[data], overwrite=overwrite)
    assert check_new_file(tmp_path / "new.jsonl") == tmp_path / "new.jsonl"


def test_data_fetch_replaces_data_only_with_overwrite_and_keeps_a_users_readme(tmp_path):
    """`data fetch` wrote over existing data files and over the data dir's README.md."""
    from shoptune.data.fetch import fetch
    src = tmp_path / "dev.json"
    src.write_text(json.dumps([{"input_field": "Q?\n0. a\n1. b\nAnswer: ", "output_field": 1,
                                "task_type": "multiple-choice", "metric": "accuracy"}]))
    dest = tmp_path / "data"
    (dest / "shopbench-dev").mkdir(parents=True)
    (dest / "shopbench-dev" / "development.json").write_text("[]")
    (dest / "README.md").write_text("# my data notes\n")
    with pytest.raises(OutputError, match="development.json: already in the data dir; --overwrite"):
        fetch(dest, shopbench_url=src.as_uri(), ec_guide=False)
    assert (dest / "shopbench-dev" / "development.json").read_text() == "[]"
    fetch(dest, shopbench_url=src.as_uri(), ec_guide=False, overwrite=True)
    assert (dest / "shopbench-dev" / "development.json").read_text() == src.read_text()
    assert (dest / "README.md").read_text() == "# my data notes\n"  # someone's: kept
    assert json.loads((dest / "fetched.json").read_text())["fetched"] == [str(dest / "shopbench-dev" / "development.json")]
