"""#31 part B (items 3, 4, 13-18, 29-33), replayed as a user would type them: every hostile
input reaches the real command line (typer app, all of its error handling) in a scratch folder,
inside ONE child process whose address space is capped at 3 GiB (RLIMIT_AS) and whose every case
has a 60 s alarm, so an unbounded read is a MemoryError or a timeout here, not the machine's
OOM killer. Each case must end as expected (a clean one-line error, exit 1 or 2; or exit 0 where
the bad rows are skipped), with no traceback and nothing but the expected files written.

One process for all cases: the commands' imports (torch, transformers) are paid once (~15 s in
all, not ~2 s per case). With SHOPTUNE_HARDENING_REPORT set, the table is written to the
``inputs`` region of that file::

    SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\
        .venv/bin/python -m pytest -q tests/test_cli_hostile_inputs.py
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import BOMB, REPO, mc, write_jsonl
from tests.hardening_report import machine_line, table, write_section

REGENERATE = ("SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md "
              ".venv/bin/python -m pytest -q tests/test_cli_hostile_inputs.py")
MEMORY_CAP = 3 * 1024 ** 3


def make_scratch(root: Path) -> None:
    """The hostile files, in ``root``."""
    from tests.eval.test_paired import make_rows
    from tests.eval.test_suite import fake_run

    good = [mc(f"Which colour is item {i}?") for i in range(12)]
    base = json.dumps(mc("odd"))[:-1]
    hostile = {"deep": base + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}",
               "surrogate": json.dumps(mc("lone \ud800 surrogate")),
               "bigint": base + ', "n": ' + "9" * 5000 + "}"}
    for name, row in hostile.items():
        write_jsonl(root / f"{name}.jsonl", [row, *good])
    (root / "blank.jsonl").write_text("\n" * 5000 + "".join(json.dumps(r) + "\n" for r in good))
    with open(root / "huge.jsonl", "w") as fh:  # one valid row with a 100 MB input_field
        fh.write(json.dumps(mc("word " * (20 * 1024 * 1024))) + "\n")
        fh.write("".join(json.dumps(r) + "\n" for r in good))
    os.mkfifo(root / "fifo.jsonl")
    (root / "loop.jsonl").symlink_to("loop2.jsonl")
    (root / "loop2.jsonl").symlink_to("loop.jsonl")
    (root / "loop.yaml").symlink_to("loop.yaml")
    (root / "bomb.yaml").write_text(BOMB)
    smoke = (REPO / "configs/train/smoke.yaml").read_text()
    (root / "smoke.yaml").write_text(smoke)
    (root / "train_bomb.yaml").write_text(smoke + BOMB)
    for name in ("deep", "surrogate", "bigint"):
        (root / f"mix_{name}.yaml").write_text(f"sources: [{name}.jsonl]\ndedup: false\n")
    accelerate = {"ds_list": "distributed_type: DEEPSPEED\nnum_processes: 2\ndeepspeed_config: [1, 2]\n",
                  "procs": "distributed_type: FSDP\nnum_processes: -3\n",
                  "kind": "distributed_type: BOGUS\n"}
    for name, text in accelerate.items():
        (root / f"acc_{name}.yaml").write_text(text)
    (root / "negmodel").mkdir()
    (root / "negmodel" / "config.json").write_text(json.dumps(
        {"num_attention_heads": 9, "hidden_size": -576, "intermediate_size": 1536,
         "num_hidden_layers": 30, "vocab_size": 49152}))
    exp = {"name": "e", "base": "smoke.yaml", "suite": "tiny", "baseline": "a",
           "cells": [{"name": "a", "per_task": True}, {"name": "m", "merge_of": "a", "merge": {"method": "bogus"}}]}
    (root / "exp_merge.yaml").write_text(yaml.safe_dump(exp))
    (root / "exp.yaml").write_text(yaml.safe_dump({**exp, "cells": [{"name": "a"}]}))
    fake_run(root / "run_a", make_rows(1))
    bad_preds = {"preds_not_json": "nope\n", "preds_lists": "[1, 2]\n" * 18,
                 "preds_no_score": "".join(json.dumps({k: v for k, v in r.items() if k != "score"}) + "\n"
                                           for r in make_rows(2)),
                 "preds_short": "".join(json.dumps(r) + "\n" for r in make_rows(2)[:-1]),
                 "preds_str_score": "".join(json.dumps(dict(r, score="0.5")) + "\n" for r in make_rows(2)),
                 "preds_nan": "".join(json.dumps(dict(r, score=float("nan"))) + "\n" for r in make_rows(2))}
    for name, text in bad_preds.items():
        (fake_run(root / name, make_rows(2)) / "predictions.jsonl").write_text(text)
    (fake_run(root / "scores_not_json", make_rows(2)) / "scores.json").write_text("{oops")
    (root / "fakead").mkdir()
    (root / "fakead" / "adapter_config.json").write_text("{}")


# (item, case, arguments, exit code wanted, text the message holds, files the run may write)
CASES = [
    ("3", "train: alias bomb in the config", "train train_bomb.yaml", 1, "alias bomb", ()),
    ("3", "data mix: alias bomb", "data mix bomb.yaml --out mix.jsonl", 1, "alias bomb", ()),
    ("3", "experiment: alias bomb", "experiment run bomb.yaml --out ex --dry-run", 1, "alias bomb", ()),
    ("3", "data synth: alias bomb", "data synth bomb.yaml --out syn.jsonl", 1, "alias bomb", ()),
    ("3", "eval --suite: alias bomb", "eval --model smollm2-135m --suite bomb.yaml --out ev", 1, "alias bomb", ()),
    ("3", "train --plan --accelerate: alias bomb", "train smoke.yaml --plan --accelerate bomb.yaml", 1,
     "alias bomb", ()),
    ("3", "train: alias bomb in an override",
     "train smoke.yaml 'lora.target_modules={" + BOMB.replace("\n", ", ") + "}'", 1, "alias bomb", ()),
    ("4", "train /dev/zero", "train /dev/zero", 1, "/dev/zero: a character device, not a regular file", ()),
    ("4", "data validate /dev/zero", "data validate /dev/zero", 1, "/dev/zero: a character device", ()),
    ("4", "data stats: a 100 MB input_field", "data stats huge.jsonl", 1,
     "huge.jsonl:1: the row is larger than 4 MiB", ()),
    ("4", "data split: a 100 MB input_field (skipped)", "data split huge.jsonl --out split_huge", 0,
     "train: ", ("split_huge", "split_huge/train.jsonl", "split_huge/validation.jsonl", "split_huge/test.jsonl")),
    *[("13", f"data {cmd}: 100,000-deep JSON in a row", args, code, msg, files) for cmd, args, code, msg, files in (
        ("validate", "data validate deep.jsonl", 1, "deep.jsonl:1: extra: nested deeper than 64 levels", ()),
        ("split", "data split deep.jsonl --out split_deep", 0, "train: ",
         ("split_deep", "split_deep/train.jsonl", "split_deep/validation.jsonl", "split_deep/test.jsonl")),
        ("dedup", "data dedup deep.jsonl --out dd.jsonl", 0, "kept 12 of 12", ("dd.jsonl", "dd.removed.jsonl")),
        ("stats", "data stats deep.jsonl --no-tokens", 1, "deep.jsonl:1: extra: nested deeper than 64 levels", ()),
        ("mix", "data mix mix_deep.yaml --out md.jsonl", 0, "invalid rows skipped: 1 (first: deep.jsonl:1: extra",
         ("md.jsonl", "md.jsonl.manifest.json")))],
    ("14", "data validate: a lone surrogate", "data validate surrogate.jsonl", 1,
     "surrogate.jsonl:1: input_field: a lone surrogate", ()),
    ("14", "data split: a lone surrogate (skipped)", "data split surrogate.jsonl --out split_sur", 0, "train: ",
     ("split_sur", "split_sur/train.jsonl", "split_sur/validation.jsonl", "split_sur/test.jsonl")),
    ("14", "data mix: a lone surrogate (skipped)", "data mix mix_surrogate.yaml --out ms.jsonl", 0,
     "invalid rows skipped: 1", ("ms.jsonl", "ms.jsonl.manifest.json")),
    ("15", "data validate: a 5,000-digit integer", "data validate bigint.jsonl", 1,
     "bigint.jsonl:1: n: an integer of 5000 digits (at most 100)", ()),
    ("15", "data split: a 5,000-digit integer (skipped)", "data split bigint.jsonl --out split_big", 0, "train: ",
     ("split_big", "split_big/train.jsonl", "split_big/validation.jsonl", "split_big/test.jsonl")),
    ("16", "data validate: 5,000 blank lines first", "data validate blank.jsonl", 0, "ok: 12 valid rows", ()),
    *[("17", f"eval compare: {why}", f"eval compare run_a {d} --n-boot 20 --n-perm 20", 2, msg, ())
      for why, d, msg in (
          ("predictions not JSON", "preds_not_json", "predictions.jsonl:1: invalid JSON"),
          ("a JSON list per line", "preds_lists", "predictions.jsonl:1: expected a JSON object, got list"),
          ("rows without score", "preds_no_score", "predictions.jsonl:1: score: missing"),
          ("one row fewer", "preds_short", "17 rows, but scores.json lists 18 questions"),
          ("a string score", "preds_str_score", "score: must be a number, got str '0.5'"),
          ("scores.json not JSON", "scores_not_json", "scores.json:1: not valid JSON"))],
    ("17", "eval compare --n-boot -5", "eval compare run_a run_a --n-boot -5", 2, "--n-boot -5: at least 1", ()),
    ("18", "train --plan --accelerate: deepspeed_config a list", "train smoke.yaml --plan --accelerate acc_ds_list.yaml",
     1, "acc_ds_list.yaml:3: deepspeed_config: must be a mapping", ()),
    ("29", "train --plan: num_processes -3", "train smoke.yaml --plan --accelerate acc_procs.yaml", 1,
     "acc_procs.yaml:2: num_processes: must be a whole number >= 1 (got -3)", ()),
    ("29", "train --plan: unknown distributed_type", "train smoke.yaml --plan --accelerate acc_kind.yaml", 1,
     "distributed_type: 'BOGUS' is not one of accelerate's", ()),
    ("29", "train --plan: a negative model size", "train smoke.yaml --plan model=negmodel", 1,
     "hidden_size must be a whole number >= 1 (got -576)", ()),
    ("29", "train --plan peft=poly", "train smoke.yaml --plan peft=poly", 1, "peft: poly is not modelled", ()),
    ("30", "train --resume: no such folder", "train smoke.yaml --out nothing --resume", 1,
     "--resume: nothing holds no training run to continue (no such folder)", ()),
    ("31", "experiment: merge method bogus (--dry-run)", "experiment run exp_merge.yaml --out ex --dry-run", 1,
     "merge.method: 'bogus' is not a combination type", ()),
    ("31", "experiment --eval-engine bogus", "experiment run exp.yaml --out ex --dry-run --eval-engine bogus", 2,
     "'bogus' is not one of 'builtin', 'llama.cpp', 'vllm'", ()),
    ("32", "eval --task-adapter for no task", "eval --model smollm2-135m --data blank.jsonl --out ev "
     "--task-adapter tsak2=fakead", 1, "--task-adapter tsak2=fakead: 'tsak2' is not a task", ()),
    ("32", "eval compare: NaN scores", "eval compare run_a preds_nan --n-boot 20 --n-perm 20", 2,
     "score: must be a finite number, got nan", ()),
    ("32", "eval compare --n-boot 0", "eval compare run_a run_a --n-boot 0", 2, "--n-boot 0: at least 1", ()),
    ("33", "data validate: a FIFO", "data validate fifo.jsonl", 1, "fifo.jsonl: a named pipe (FIFO)", ()),
    ("33", "data validate: a symlink loop", "data validate loop.jsonl", 1, "loop.jsonl: a symlink loop", ()),
    ("33", "train: a config that is a symlink loop", "train loop.yaml", 1, "loop.yaml: a symlink loop", ()),
]


def drive(root: str) -> None:
    """In the child: run every case of stdin's JSON list through the CLI, print JSON results."""
    import gc
    import shlex
    import signal
    import time
    import traceback

    from typer.testing import CliRunner

    from shoptune.cli import app

    class Alarm(Exception):
        pass

    limit = int(os.environ.get("HOSTILE_CASE_SECONDS", "60"))

    def ring(*_):
        raise Alarm(f"{limit} s")
    signal.signal(signal.SIGALRM, ring)
    os.chdir(root)

    def files() -> set[str]:
        return {str(p.relative_to(root)) for p in Path(root).rglob("*")}
    out = []
    for args in json.load(sys.stdin):
        before = files()
        t0 = time.monotonic()
        signal.alarm(limit)
        try:
            res = CliRunner().invoke(app, shlex.split(args))
            exc = res.exception
            tb = "".join(traceback.format_exception(exc)) if exc and not isinstance(exc, SystemExit) else ""
            code, text = res.exit_code, res.output
        except (Alarm, MemoryError) as e:
            code, text, tb = -1, "", f"{type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        res = exc = None  # (a failed case's frames may hold GBs: free them before the next)
        gc.collect()
        out.append({"exit": code, "output": text, "traceback": tb, "seconds": round(time.monotonic() - t0, 2),
                    "added": sorted(files() - before)})
    print(json.dumps(out))


def message(lines: list[str], r: dict) -> str:
    """What the report shows of a case's output: the skipped-rows line of a run that went on,
    else every line (a `data validate` issue and its count), its middle cut when long."""
    if r["traceback"]:
        return r["traceback"].strip().splitlines()[-1]
    if r["exit"] == 0:
        return next((ln for ln in lines if ln.startswith("invalid rows skipped")), lines[-1] if lines else "")
    text = " ".join(" ".join(lines).split())
    return text if len(text) <= 250 else text[:110] + " ... " + text[-135:]


def test_hostile_inputs_end_in_one_clean_line_under_a_memory_cap(tmp_path):
    root = tmp_path / "work"
    root.mkdir()
    make_scratch(root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("SHOPTUNE_TRACEBACK", None)
    p = subprocess.run([sys.executable, "-c", f"from tests.test_cli_hostile_inputs import drive; drive({str(root)!r})"],
                       input=json.dumps([c[2] for c in CASES]), capture_output=True, text=True, env=env,
                       timeout=1200, cwd=root,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP)))
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    rows, problems = [], []
    for (item, case, args, want, holds, may_add), r in zip(CASES, results):
        lines = [ln for ln in r["output"].splitlines() if ln.strip()]
        said = " ".join(" ".join(lines).split())
        shown = args if len(args) < 90 else args[:87] + "..."
        rows.append((item, case, f"shoptune {shown}", f"exit {r['exit']}, {r['seconds']} s", message(lines, r)))
        extra = [a for a in r["added"] if a not in may_add  # (an output folder's marker is its own)
                 and not a.endswith("/.shoptune-output.json")]
        errors = [ln for ln in lines if ln.startswith("error:")]
        why = [w for w, bad in (
            (f"exit {r['exit']}, not {want}", r["exit"] != want),
            (f"traceback: {r['traceback'][-1500:]}", bool(r["traceback"]) or "Traceback" in r["output"]),
            (f"message lacks {holds!r}", holds not in said),
            (f"{len(errors)} error lines", want != 0 and len(errors) != 1
             and "Usage:" not in r["output"]),  # (a usage error: click's box names the option)
            (f"wrote {extra}", bool(extra))) if bad]
        if why:
            problems.append(f"{case}: {'; '.join(why)}\n{r['output'][-1500:]}")
    write_section("inputs", [
        "## Hostile inputs under a memory cap (third pass, part B: items 3, 4, 13-18, 29-33)", "",
        "Every case through the real command line in a scratch folder, all in one child process "
        "capped at 3 GiB of address space (RLIMIT_AS) with a 60 s alarm per case: an unbounded "
        "read would end as a MemoryError or a timeout here. Each must end as wanted (one `error:` "
        "line, exit 1 or 2; exit 0 where the bad rows are skipped), with no traceback and no file "
        "but its outputs. Times include each command's first imports.", "",
        "```bash", REGENERATE, "```", "", machine_line(), "",
        *table(["item", "case", "request", "status", "message"], rows), "",
        f"{len(rows)} cases, {len(problems)} problem(s)."])
    assert not problems, "\n\n".join(problems)
