"""`shoptune export experts` and `export merge` never delete a user's file (#31 items 1, 2): real
folders holding a user's files, `--out .`, the folder of the inputs, an input. The builders and
case tables here also drive the corrupt-input cases (items 5-9, 21-23) replayed, with their
report, by tests/test_outputs_adversarial.py. Tiny models only (milliseconds to load)."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from shoptune.cli import app
from tests.test_experts import _poly


def snapshot(root):
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def shoptune(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(r, pattern: str) -> str:
    """Exit 1, one `error:` line matching ``pattern``, no traceback."""
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert pattern in lines[0], lines[0]
    return lines[0]


def make_poly_run(base, run):
    """A Poly run (3 routes: two concept-understanding tasks and one of user-behavior alignment)."""
    from shoptune.tasks import all_cards
    cards = all_cards()
    tasks = ([n for n, c in cards.items() if c.capability == "concept_understanding"][:2]
             + [n for n, c in cards.items() if c.capability == "user_behavior_alignment"][:1])
    _poly(base, run / "adapter")
    routing = {"route_by": "task", "routes": tasks, "task_route": {t: i for i, t in enumerate(tasks)},
               "task_capability": {t: cards[t].capability for t in tasks}}
    (run / "adapter" / "routing.json").write_text(json.dumps(routing))
    return run


def make_merge_inputs(tiny, root):
    """LoRA adapters the merge must refuse: rank 8, a NaN, pickled weights, IA3, only a config."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    from shoptune.serve.testing import make_tiny_lora
    out = {"r8": make_tiny_lora(tiny["base"], root / "r8", seed=7, r=8)}
    out["nan"] = shutil.copytree(tiny["good"], root / "nan")
    w = load_file(out["nan"] / "adapter_model.safetensors")
    k = next(iter(w))
    w[k][0, 0] = float("nan")
    save_file(w, str(out["nan"] / "adapter_model.safetensors"))
    out["pickled"] = shutil.copytree(tiny["good"], root / "pickled")
    torch.save(load_file(out["pickled"] / "adapter_model.safetensors"), out["pickled"] / "adapter_model.bin")
    (out["pickled"] / "adapter_model.safetensors").unlink()
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny["base"]), dtype=torch.float32),
                        IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "down_proj"],
                                  feedforward_modules=["down_proj"]))
    pm.save_pretrained(root / "ia3")
    out["ia3"] = root / "ia3"
    (root / "config_only").mkdir()
    shutil.copy(tiny["good"] / "adapter_config.json", root / "config_only")
    out["config_only"] = root / "config_only"
    return out


@pytest.fixture(scope="module")
def poly_run(tiny, tmp_path_factory):
    return make_poly_run(tiny["base"], tmp_path_factory.mktemp("poly") / "run")


def test_merge_never_deletes_a_users_files(tiny, tmp_path, monkeypatch):
    """#31 item 1: `--out .`, the folder holding the inputs, one input, an unrelated folder."""
    work = tmp_path / "work"
    a, b = (shutil.copytree(tiny[n], work / n) for n in ("good", "good2"))
    (work / "README.md").write_text("my adapters\n")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "paper.tex").write_text("\\documentclass{article}\n")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "notes.txt").write_text("mine\n")
    monkeypatch.chdir(tmp_path / "here")
    before = snapshot(tmp_path)
    base = ["export", "merge", f"a={a}", f"b={b}", "--model", tiny["base"], "--method", "cat"]
    for out, why in ((".", "is the current folder"), (work, "holds an input"), (a, "is an input"),
                     (tmp_path / "thesis", "holds files shoptune did not write (paper.tex)"),
                     (a / "sub", "is inside the input folder")):
        for extra in ([], ["--overwrite"]):
            refused(shoptune(*base, "--out", out, *extra), why)
    assert snapshot(tmp_path) == before

    r = shoptune(*base, "--out", tmp_path / "ab")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ab" / "merge.json").read_text())["method"] == "cat"
    refused(shoptune(*base, "--out", tmp_path / "ab"), "earlier `shoptune export merge` output; --overwrite")
    assert shoptune(*base, "--out", tmp_path / "ab", "--overwrite", "--method", "linear").exit_code == 0
    assert json.loads((tmp_path / "ab" / "merge.json").read_text())["method"] == "linear"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_experts_never_delete_a_users_sub_folder(poly_run, tmp_path):
    """#31 item 2: an existing sub-folder named like an expert (a task, a capability, all-tasks)."""
    routes = json.loads((poly_run / "adapter" / "routing.json").read_text())["routes"]
    out = tmp_path / "experts"
    for name in (routes[0], "concept_understanding", "all-tasks"):
        (out / name).mkdir(parents=True)
        (out / name / "my_notes.txt").write_text("keep\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"], ["--fallback", "mean", "--overwrite"]):
        refused(shoptune("export", "experts", poly_run, "--out", out, *extra),
                "holds files shoptune did not write")
    refused(shoptune("export", "experts", poly_run, "--out", poly_run), "holds an input")
    assert snapshot(tmp_path) == before


def corrupt(run, case: str):
    """Break one thing in a copy of a Poly run; returns the file the message must name."""
    ad = run / "adapter"
    routing = json.loads((ad / "routing.json").read_text())
    cfg = json.loads((ad / "adapter_config.json").read_text())
    t0 = routing["routes"][0]
    edits = {
        "routing not JSON": ("routing.json", "{routes: nope"),
        "routing a list": ("routing.json", [1, 2]),
        "routing without routes": ("routing.json", {k: v for k, v in routing.items() if k != "routes"}),
        "route_by bogus": ("routing.json", {**routing, "route_by": "bogus"}),
        "empty routes": ("routing.json", {**routing, "routes": []}),
        "out-of-range task id": ("routing.json", {**routing, "task_route": {**routing["task_route"], t0: 7}}),
        "string task ids": ("routing.json", {**routing, "task_route": {t: str(i) for t, i in routing["task_route"].items()}}),
        "capability named a/b": ("routing.json", {**routing, "task_capability": {**routing["task_capability"], t0: "a/b"}}),
        "config not JSON": ("adapter_config.json", "{"),
        "n_tasks not a number": ("adapter_config.json", {**cfg, "n_tasks": "three"}),
        "n_tasks smaller than the routes": ("adapter_config.json", {**cfg, "n_tasks": 1}),
        "n_splits not matching the weights": ("adapter_config.json", {**cfg, "n_splits": 4}),
    }
    if case in edits:
        name, value = edits[case]
        (ad / name).write_text(value if isinstance(value, str) else json.dumps(value))
        return ad / name
    weights = ad / "adapter_model.safetensors"
    if case == "routing a symlink to a non-JSON file":
        (ad / "routing.json").unlink()
        (ad / "routing.json").symlink_to(weights)
        return ad / "routing.json"
    if case == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[:1000])
        return weights
    w = load_file(weights)
    if case == "a missing tensor":
        del w[next(k for k in w if k.endswith("poly_lora_B"))]
    elif case == "NaN weights":
        k = next(k for k in w if k.endswith("poly_lora_A"))
        w[k].view(-1)[0] = float("nan")
    save_file(w, str(weights))
    return weights


EXPERT_CASES = {  # case -> what the one-line message says (it also names the file)
    "routing not JSON": "is not JSON", "routing a list": "a routing table is a JSON object",
    "routing without routes": "routes must be a non-empty list", "route_by bogus": "route_by 'bogus'",
    "empty routes": "routes must be a non-empty list", "out-of-range task id": "a route id from 0 to 2",
    "string task ids": "a route id from 0 to 2", "capability named a/b": "'a/b' cannot name an expert",
    "config not JSON": "is not JSON", "n_tasks not a number": "n_tasks must be a positive whole number",
    "n_tasks smaller than the routes": "config and weights do not belong together",
    "n_splits not matching the weights": "config and weights do not belong together",
    "routing a symlink to a non-JSON file": "routing table", "truncated safetensors": "not a readable safetensors file",
    "a missing tensor": "is missing", "NaN weights": "has NaN or infinite values",
}


def test_a_routing_json_with_a_bom_is_read(poly_run, tmp_path):
    run = shutil.copytree(poly_run, tmp_path / "run")
    text = (run / "adapter" / "routing.json").read_text()
    (run / "adapter" / "routing.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    r = shoptune("export", "experts", run, "--out", tmp_path / "x")
    assert r.exit_code == 0, r.output
