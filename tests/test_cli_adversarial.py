"""#20 items 13-16 and the CLI minor items, replayed as a user would type them: each bad
invocation runs as its own process (``python -m shoptune.cli ...``) in a scratch folder and must
exit non-zero with at most two lines on stderr (``data validate``: one per bad row, then the
count), no traceback, and leave the folder as it was (nothing half-written). Then one good run
checks the modes of what it writes. No model is loaded (~1 minute).

With SHOPTUNE_HARDENING_REPORT set, the table is written to the ``cli`` section of that file::

    SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\
        .venv/bin/python -m pytest -q tests/test_cli_adversarial.py
"""
from __future__ import annotations

import hashlib
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, mc, write_jsonl
from tests.hardening_report import machine_line, table, write_section

REGENERATE = ("SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md "
              ".venv/bin/python -m pytest -q tests/test_cli_adversarial.py")


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with a hash of its content (folders: "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def message(stderr: str) -> tuple[str, int]:
    """(the error message, how many lines it took). A click usage error (exit 2) is a usage
    line, a hint and a box: its message is the text in the box."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    if lines and lines[0].startswith("Usage:"):
        box = [ln.strip("│ ").strip() for ln in lines if ln.startswith("│")]
        return " ".join(box), len(box)
    return (lines[0] if lines else ""), len(lines)


def make_scratch(root: Path, port: int) -> dict:
    """The files the cases use, in ``root``."""
    from shoptune.serve.testing import make_tiny_fixtures
    from tests.data.test_synth import pool_rows

    write_jsonl(root / "d.jsonl", [mc(f"Q{i}?") for i in range(30)])
    write_jsonl(root / "v.jsonl", [{"input_field": 5}])
    write_jsonl(root / "pool.jsonl", pool_rows())
    (root / "junk.jsonl").write_text("this is not JSON\n")
    (root / "afile").write_text("keep me\n")
    (root / "adir").mkdir()
    (root / "adir" / "mine.txt").write_text("keep\n")
    files = {
        "broken.yaml": "sources: [d.jsonl\ntotal: 3\n",
        "list.yaml": "- d.jsonl\n- total: 3\n",
        "empty.yaml": "",
        "ok.yaml": "sources: [d.jsonl]\ndedup: false\n",
        "junk.yaml": "sources: [junk.jsonl]\n",
        "unknown_task.yaml": "sources: [d.jsonl]\ninclude_tasks: [no_such_task]\n",
        "no_sources.yaml": "sources: []\n",
        "negative_weight.yaml": "sources: [d.jsonl]\ntotal: 10\nweights: {shopbench_task2: -1}\n",
        "exp.yaml": "name: e\nbase: smoke.yaml\nbaseline: a\nseeds: [0, 0]\ncells: [{name: a}]\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "smoke.yaml").write_text((REPO / "configs/train/smoke.yaml").read_text())
    base = {"task": "ecguide_qprp", "pool": ["pool.jsonl"], "rows": 3, "shots": 2, "concurrency": 2,
            "retries": 1, "backoff_s": 0.01, "max_requests": 3}
    (root / "synth.yaml").write_text(yaml.safe_dump(base))
    (root / "negative.yaml").write_text(yaml.safe_dump(
        {**base, "characteristics": {"difficulty": {"hard": -1, "easy": 1}}}))
    fx = make_tiny_fixtures(root / "fx")  # a tiny base and an adapter of another base
    return {"base": fx["base"].relative_to(root), "good": fx["good"].relative_to(root),
            "mismatch": fx["mismatch"].relative_to(root), "url": f"http://127.0.0.1:{port}/v1"}


def cases(f: dict) -> list[tuple]:
    """(item, case, arguments, lines allowed on stderr, files the run may add)."""
    url, base = f["url"], f["base"]
    return [
        ("13", "data mix: broken YAML", "data mix broken.yaml --out mix.jsonl", 2, ()),
        ("13", "data mix: a YAML list", "data mix list.yaml --out mix.jsonl", 2, ()),
        ("13", "data mix --out an existing folder", "data mix ok.yaml --out adir", 2, ()),
        ("13", "data split --out an existing file", "data split d.jsonl --out afile", 2, ()),
        ("13", "eval --out an existing file", "eval --model smollm2-135m --data d.jsonl --out afile", 2, ()),
        ("13", "export gguf --out an existing file", "export gguf --model smollm2-135m --out afile", 2, ()),
        ("13", "data dedup --out where no file can be made", "data dedup d.jsonl --out /proc/clean.jsonl", 2, ()),
        ("13", "eval --backend openai, nothing listening",
         f"eval --model m --data d.jsonl --out ev --backend openai --base-url {url}", 2, ()),
        ("14", "data mix: sources with no valid row", "data mix junk.yaml --out mix.jsonl", 2, ()),
        ("14", "data mix: include_tasks names an unknown task", "data mix unknown_task.yaml --out mix.jsonl", 2, ()),
        ("14", "data mix: sources: []", "data mix no_sources.yaml --out mix.jsonl", 2, ()),
        ("14", "data mix: empty mixture file", "data mix empty.yaml --out mix.jsonl", 2, ()),
        ("14", "data derive mcq: no generation rows", "data derive mcq d.jsonl --out mcq.jsonl", 2, ()),
        ("15", "data synth: teacher unreachable",
         f"data synth synth.yaml --out syn/rows.jsonl --teacher-url {url} --quiet", 2,
         ("syn", "syn/rows.report.json")),
        ("16", "export gguf --adapter ../../evil=DIR",
         f"export gguf --model {base} --adapter ../../evil={f['good']} --out gguf", 2, ()),
        ("16", "export gguf --adapter =DIR", f"export gguf --model {base} --adapter ={f['good']} --out gguf", 2, ()),
        ("16", "export gguf: adapter of another base",
         f"export gguf --model {base} --adapter m={f['mismatch']} --out gguf", 2, ()),
        ("minor", "eval --limit -1", "eval --model smollm2-135m --data d.jsonl --out ev --limit -1", 2, ()),
        ("minor", "train override: unclosed list",
         "train smoke.yaml output_dir=run lora.target_modules=[q_proj", 2, ()),
        ("minor", "train override: empty key", "train smoke.yaml output_dir=run =5", 2, ()),
        ("minor", "data validate: input_field 5, no output_field", "data validate v.jsonl", 3, ()),
        ("minor", "data synth: spec with hard: -1",
         f"data synth negative.yaml --out syn2/rows.jsonl --teacher-url {url}", 2, ()),
        ("minor", "data mix: a negative weight", "data mix negative_weight.yaml --out mix.jsonl", 2, ()),
        ("minor", "experiment: seeds [0, 0]", "experiment run exp.yaml --out exp --dry-run", 2, ()),
    ]


def test_cli_adversarial_run(tmp_path):
    from shoptune.serve.testing import free_port

    root = tmp_path / "work"
    root.mkdir()
    f = make_scratch(root, free_port())  # nothing listens on that port
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("SHOPTUNE_TRACEBACK", None)

    def shoptune(args: str, umask: int | None = None):
        return subprocess.run([sys.executable, "-m", "shoptune.cli", *shlex.split(args)], cwd=root,
                              env=env, capture_output=True, text=True, timeout=120,
                              preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)

    rows, problems = [], []
    for item, case, args, max_lines, may_add in cases(f):
        before = snapshot(root)
        r = shoptune(args)
        after = snapshot(root)
        msg, n_lines = message(r.stderr)
        rows.append((item, case, f"shoptune {args}", f"exit {r.returncode}", msg))
        added = sorted(set(after) - set(before))
        changed = sorted(k for k in before if after.get(k) != before[k])
        why = [w for w, bad in (
            (f"exit {r.returncode}", r.returncode == 0),
            ("traceback", "Traceback" in r.stdout + r.stderr),
            (f"{n_lines} lines of error", not 1 <= n_lines <= max_lines),
            (f"wrote {[a for a in added if a not in may_add]}", any(a not in may_add for a in added)),
            (f"changed {changed}", bool(changed))) if bad]
        if why:
            problems.append(f"{case}: {', '.join(why)}\n{r.stderr[-2000:]}")

    # a good run: what it writes has the modes a plain open()/mkdir() gives (umask 022)
    r = shoptune("data split d.jsonl --out split", umask=0o022)
    modes = sorted({oct(stat.S_IMODE(p.stat().st_mode)) for p in (root / "split").iterdir()})
    dir_mode = oct(stat.S_IMODE((root / "split").stat().st_mode))
    rows.append(("minor", "files written (umask 022)", "shoptune data split d.jsonl --out split",
                 f"exit {r.returncode}", f"files {', '.join(modes)}, folder {dir_mode}"))
    if r.returncode != 0 or modes != ["0o644"] or dir_mode != "0o755":
        problems.append(f"file modes: {modes}, folder {dir_mode}\n{r.stderr[-2000:]}")

    write_section("cli", [
        "## The CLI run (second pass, items 13-16, minor)", "",
        "Each bad invocation as its own process in a scratch folder: exit non-zero, at most two "
        "lines on stderr (`data validate`: one per bad row, then the count), no traceback, the "
        "folder unchanged (`data synth` may write its report only).", "",
        "```bash", REGENERATE, "```", "", machine_line(), "",
        *table(["item", "case", "request", "status", "message"], rows), "",
        f"{len(rows) - 1} bad invocations, {len(problems)} problem(s)."])
    assert not problems, "\n\n".join(problems)
