"""#31 part A replayed as a user meets it, with its report (the "outputs" region of
docs/results/hardening.md):

* the commands that write (export merge / experts / gguf, data split / mix / dedup, eval, train),
  each bad invocation in a scratch folder holding a user's files: exit 1, one `error:` line, no
  traceback, the folder unchanged (items 1, 2, 5-10, 21-26 and the output rule);
* the built-in server (uvicorn on a loopback port) on a tiny model: large prompts and /health (item 12), an expert
  unloaded (11), logit_bias spellings (19), a number list's line end (20), abandoned requests
  (27), unparseable bodies (28).

The commands and the server run in this process (typer's runner: an exception that escapes is
a traceback a user would see; the server's log records are caught). About 30 s, tiny models only.

    SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\
        .venv/bin/python -m pytest -q tests/test_outputs_adversarial.py
"""
from __future__ import annotations

import json
import shlex
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from tests.conftest import mc, write_jsonl
from tests.hardening_report import machine_line, table, write_section
from tests.test_export_hardening import EXPERT_CASES, corrupt, make_merge_inputs, make_poly_run, snapshot

COMMAND = ["SHOPTUNE_HARDENING_REPORT=docs/results/hardening.md \\",
           "    .venv/bin/python -m pytest -q tests/test_outputs_adversarial.py"]


def cli_cases(f: dict) -> list[tuple[str, str, str, str]]:
    """(item, case, arguments, what the one error line says)."""
    good, good2, m, base = f["good"], f["good2"], f["m"], f["base"]
    merge = f"export merge a={good} b={good2} --model {base} --method cat"
    return [
        ("1", "export merge --out . (the folder holding everything)", f"{merge} --out .", "--out .: holds an input"),
        ("1", "export merge --out . from inside a folder of notes", f"{merge} --out .", "is the current folder"),
        ("1", "export merge --out the folder holding both inputs", f"{merge} --out adapters", "holds an input"),
        ("1", "export merge --out one input", f"{merge} --out {good}", "is an input"),
        ("1", "export merge --out an unrelated folder with paper.tex", f"{merge} --out thesis",
         "holds files shoptune did not write (paper.tex)"),
        ("1", "export merge --out thesis --overwrite", f"{merge} --out thesis --overwrite",
         "holds files shoptune did not write (paper.tex)"),
        ("1", "export merge --out its own earlier merge, no --overwrite", f"{merge} --out merged",
         "--overwrite replaces it"),
        ("1", "export merge --out its earlier merge + a user's notes.txt, --overwrite",
         f"{merge} --out merged-notes --overwrite", "did not write (notes.txt)"),
        ("2", "export experts --out DIR with DIR/<task>/my_notes.txt", f"export experts run --out notes-experts",
         "holds files shoptune did not write"),
        ("2", "the same with --overwrite --fallback mean", "export experts run --out notes-experts --overwrite "
         "--fallback mean", "holds files shoptune did not write"),
        ("2", "export experts --out the run folder", "export experts run --out run", "holds an input"),
        *[(item, f"export experts: {case}", f"export experts runs/{key} --out experts --overwrite", says)
          for case, (item, key, says) in f["expert_cases"].items()],
        ("21", "export experts: a missing RUN", "export experts no-such-run --out x", "no such folder"),
        ("8", "export merge: ranks 4 and 8 (ties)", f"export merge a={good} b={m['r8']} --model {base} --out x",
         "needs adapters of one rank (a r=4, b r=8)"),
        ("8", "export merge: another base model", f"export merge a={good} b={f['mismatch']} --model {base} --out x",
         "trained for a different base model"),
        ("8", "export merge: an IA3 input", f"export merge a={good} b={m['ia3']} --model {base} --out x",
         "only LORA adapters can be merged"),
        ("8", "export merge: a folder with only the config",
         f"export merge a={good} b={m['config_only']} --model {base} --out x", "no adapter_model.safetensors"),
        ("8", "export merge: a missing folder", f"export merge a={good} b=nope --model {base} --out x",
         "nope: not a directory"),
        ("8", "export merge --density -1", f"{merge.replace('cat', 'ties')} --density -1 --out x", "--density -1.0"),
        ("8", "export merge --density nan", f"{merge.replace('cat', 'ties')} --density nan --out x", "--density nan"),
        ("8", "export merge --method bogus", f"{merge.replace('cat', 'bogus')} --out x", "--method 'bogus': one of"),
        ("9", "export merge: a NaN input", f"export merge a={good} b={m['nan']} --model {base} --out x",
         "has NaN or infinite values"),
        ("9", "export merge --density 0", f"{merge.replace('cat', 'ties')} --density 0 --out x", "--density 0.0"),
        ("9", "export merge: a DoRA input", f"export merge a={good} b={f['dora']} --model {base} --out x",
         "its use_dora (True) would be lost in the merge"),
        ("22", "export merge: the same adapter twice", f"export merge {good} {good} --model {base} --out x",
         "two adapters would both be named 'good'"),
        ("22", "export merge: one folder under two names", f"export merge a={good} b={good} --model {base} --out x",
         "given twice (as a and b)"),
        ("22", "export merge: a bad name", f"export merge ../x={good} b={good2} --model {base} --out x",
         "(it names the adapter in the merge)"),
        ("22", "export merge --out a file", f"{merge} --out afile", "afile: exists and is not a folder"),
        ("23", "export merge: pickled .bin weights", f"export merge a={good} b={m['pickled']} --model {base} --out x",
         "no adapter_model.safetensors (only safetensors weights are loaded)"),
        ("10", "serve --experts: experts.json not JSON", f"serve --model {base} --experts bad-experts",
         "is not JSON"),
        ("24", "serve --experts --merge --adapter", f"serve --model {base} --experts experts-ok --merge "
         f"--adapter m={good}", "--experts serves several"),
        ("25", "serve --task-adapter TASK=ghost", f"serve --model {base} --adapter good={good} "
         "--task-adapter shopbench_task2=ghost", "no adapter 'ghost' is served"),
        ("26", "serve --engine llama.cpp without the binary", f"serve --model {base} --engine llama.cpp",
         "no llama-server binary"),
        ("rule", "export gguf --out a user's folder", f"export gguf --model {base} --out thesis",
         "holds files shoptune did not write (paper.tex)"),
        ("rule", "data split --out a user's folder, --overwrite", "data split d.jsonl --out thesis --overwrite",
         "holds files shoptune did not write (paper.tex)"),
        ("rule", "data split --out the data's own folder", "data split data --out data/split", "is inside the input folder"),
        ("rule", "data dedup --out the input file", "data dedup d.jsonl --out d.jsonl --overwrite", "is an input"),
        ("rule", "data dedup --out an existing file", "data dedup d.jsonl --out afile", "exists; --overwrite replaces it"),
        ("rule", "data mix --out an existing file", "data mix mix.yaml --out afile", "exists; --overwrite replaces it"),
        ("rule", "eval --out a user's folder", "eval --model smollm2-135m --data d.jsonl --out thesis",
         "holds files shoptune did not write (paper.tex)"),
        ("rule", "eval --out the data file's folder", "eval --model smollm2-135m --data data/e.jsonl --out data",
         "holds an input"),
        ("rule", "train --out a user's folder, --overwrite", "train smoke output_dir=thesis --overwrite",
         "holds files shoptune did not write (paper.tex)"),
    ]


def scratch(root, tiny):
    """The scratch folder: a user's files, inputs, and earlier outputs of the commands."""
    (root / "thesis").mkdir()
    (root / "thesis" / "paper.tex").write_text("\\documentclass{article}\n")
    (root / "afile").write_text("keep me\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine\n")
    write_jsonl(root / "d.jsonl", [mc(f"Q{i}?") for i in range(30)])
    (root / "data").mkdir()
    write_jsonl(root / "data" / "e.jsonl", [mc(f"E{i}?") for i in range(5)])
    (root / "mix.yaml").write_text("sources: [d.jsonl]\ndedup: false\n")
    ads = root / "adapters"
    good, good2 = (shutil.copytree(tiny[n], ads / n) for n in ("good", "good2"))
    (ads / "README.md").write_text("my adapters\n")
    m = make_merge_inputs(tiny, root / "inputs")
    run = make_poly_run(tiny["base"], root / "run")
    routes = json.loads((run / "adapter" / "routing.json").read_text())["routes"]
    (root / "notes-experts" / routes[0]).mkdir(parents=True)
    (root / "notes-experts" / routes[0] / "my_notes.txt").write_text("keep\n")
    shoptune = CliRunner()
    for out in ("merged", "merged-notes"):
        r = shoptune.invoke(app, shlex.split(f"export merge a={good} b={good2} --model {tiny['base']} "
                                             f"--method cat --out {out}"))
        assert r.exit_code == 0, r.output
    (root / "merged-notes" / "notes.txt").write_text("mine\n")
    assert shoptune.invoke(app, ["export", "experts", "run", "--out", "experts"]).exit_code == 0
    shutil.copytree(root / "experts", root / "experts-ok")
    (root / "bad-experts").mkdir()
    (root / "bad-experts" / "experts.json").write_text("{not json")
    cases = {}
    for case, says in EXPERT_CASES.items():
        key = case.replace(" ", "_").replace("/", "_")
        corrupt(shutil.copytree(run, root / "runs" / key, symlinks=True), case)
        item = ("7" if case in ("routing not JSON", "routing a list", "routing without routes",
                                "routing a symlink to a non-JSON file", "config not JSON",
                                "n_tasks not a number", "n_splits not matching the weights",
                                "a missing tensor", "truncated safetensors", "string task ids")
                else "21" if case in ("route_by bogus", "empty routes", "NaN weights") else "5")
        cases[case] = (item, key, says)
    return {"good": good.relative_to(root), "good2": good2.relative_to(root), "base": tiny["base"],
            "mismatch": tiny["mismatch"], "dora": tiny["dora"],
            "m": {k: v.relative_to(root) for k, v in m.items()}, "expert_cases": cases}


def run_cli(root, f, rows, problems, monkeypatch) -> None:
    monkeypatch.chdir(root)
    monkeypatch.setenv("SHOPTUNE_LLAMA_SERVER", str(root / "no-llama-server"))
    monkeypatch.setenv("COLUMNS", "200")
    for item, case, args, says in cli_cases(f):
        before = snapshot(root)
        monkeypatch.chdir(root / "notes" if "inside a folder of notes" in case else root)
        r = CliRunner().invoke(app, shlex.split(args.replace("a=adapters", f"a={root}/adapters")
                                                .replace("b=adapters", f"b={root}/adapters")))
        lines = [ln for ln in r.output.splitlines() if ln.strip() and "Loading weights" not in ln]
        msg = lines[0] if lines else ""
        rows.append((item, case, f"shoptune {args}".replace(str(f["base"]), "tiny-64"), f"exit {r.exit_code}", msg))
        why = [w for w, bad in (
            (f"exit {r.exit_code}", r.exit_code != 1),
            ("traceback", not isinstance(r.exception, SystemExit)),
            (f"{len(lines)} lines", len(lines) != 1),
            (f"no {says!r}", says not in msg),
            ("the folder changed", snapshot(root) != before)) if bad]
        if why:
            problems.append(f"{case}: {', '.join(why)}\n{r.output[-1500:]}")
    monkeypatch.chdir(root)
    # the good paths: a new merge, its replacement with --overwrite, modes readable by others
    from shoptune._io import umask
    for args in (f"export merge a={f['good']} b={f['good2']} --model {f['base']} --method cat --out fresh",
                 f"export merge a={f['good']} b={f['good2']} --model {f['base']} --method linear --out fresh --overwrite"):
        r = CliRunner().invoke(app, shlex.split(args))
        modes = sorted({oct(stat.S_IMODE(p.stat().st_mode)) for p in (root / "fresh").iterdir()}) \
            if (root / "fresh").is_dir() else []
        rows.append(("1, 34", "export merge into a new folder, then --overwrite its own",
                     f"shoptune {args}".replace(str(f["base"]), "tiny-64"), f"exit {r.exit_code}",
                     f"files {', '.join(modes)} (umask {oct(umask())})"))
        if r.exit_code != 0 or modes != [oct(0o666 & ~umask())]:
            problems.append(f"good merge: exit {r.exit_code}, modes {modes}\n{r.output[-1500:]}")
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    if leftovers:
        problems.append(f"hidden temp folders left: {leftovers}")


# ----------------------------------------------------------------------------- the server

def post(http, path, body, **kw):
    return http.post(path, content=body if isinstance(body, (bytes, str)) else json.dumps(body),
                     headers={"Content-Type": "application/json"}, **kw)


def abandon(port: int, body: dict, path: str = "/v1/completions", after: float = 0.3) -> None:
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(after)


def run_server(tiny, tmp_path, rows, problems) -> None:
    """The built-in server (uvicorn on a loopback port, in this process: its log records are
    caught as the server's log) on the tiny model."""
    import gc
    import logging

    from shoptune.models import load
    from shoptune.serve.app import build_app
    from shoptune.serve.engine import Engine
    from shoptune.serve.handlers import ServeSettings
    from shoptune.serve.testing import app_in_thread
    ads = tmp_path / "server-adapters"
    for n in ("good", "good2"):
        shutil.copytree(tiny[n], ads / n)
    model, tok = load(str(tiny["base"]), dtype="fp32")
    engine = Engine(model, tok, base_name="tiny-64", max_wait=0.005)
    engine.load_adapter("good", ads / "good")
    engine.load_adapter("expert", ads / "good2")
    settings = ServeSettings(adapters_dir=ads, max_new_tokens=64, task_adapters={"shopbench_task2": "expert"})
    caught: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record):
            caught.append(record)
    catch = Catch(level=logging.ERROR)
    logging.getLogger().addHandler(catch)

    def record(item, case, request, r, ok: bool, msg: str | None = None):
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
        shown = msg or (body.get("error", {}).get("message") if isinstance(body, dict) and "error" in body else "ok")
        rows.append((item, case, request, r.status_code, shown))
        if not ok:
            problems.append(f"{case}: {r.status_code} {r.text[:500]}")

    try:
        with app_in_thread(build_app(engine, settings)) as url, httpx.Client(base_url=url, timeout=60) as http:
            port = int(url.rsplit(":", 1)[1])
            # 12: eight ~1 MB prompts at once; /health keeps answering
            text = "word " * 200_000
            lat, stop = [], threading.Event()

            def poll():
                while not stop.is_set():
                    t = time.perf_counter()
                    httpx.get(url + "/health", timeout=30)
                    lat.append(time.perf_counter() - t)
            poller = threading.Thread(target=poll)
            poller.start()
            results = []
            threads = [threading.Thread(target=lambda: results.append(
                post(httpx, url + "/v1/completions", {"model": "tiny-64", "prompt": text, "max_tokens": 4})))
                for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.2)
            stop.set()
            poller.join()
            statuses = sorted({r.status_code for r in results})
            worst = max(lat)
            rows.append(("12", "8 concurrent ~1 MB prompts, /health polled meanwhile", "POST /v1/completions x8",
                         ", ".join(map(str, statuses)),
                         f"{results[0].json()['error']['message']}; slowest /health {worst * 1000:.0f} ms"))
            if statuses != [400] or worst > 1.0:
                problems.append(f"large prompts: {statuses}, /health {worst:.2f} s")
            # 19: one token id under two spellings
            r = post(http, "/v1/completions", {"model": "good", "prompt": "x", "max_tokens": 2,
                                               "logit_bias": {"57": 100, "057": -100}})
            record("19", 'logit_bias {"57": 100, "057": -100}', "POST /v1/completions", r,
                   r.status_code == 400 and "given twice" in r.text)
            # 20: a number list without stop_newline ends at its line end
            nl = tok.encode("\n", add_special_tokens=False)[0]
            r = post(http, "/v1/completions", {"model": "good", "prompt": "Rank: ", "max_tokens": 12, "temperature": 0,
                                               "shoptune_plan": {"numeric": True, "max_value": 5, "count": 1},
                                               "logit_bias": {str(nl): 100}})
            out = r.json()["choices"][0]["text"] if r.status_code == 200 else ""
            record("20", "shoptune_plan numeric, no stop_newline, line end pushed (+100)", "POST /v1/completions", r,
                   r.status_code == 200 and out.split("\n", 1)[1:] in ([], [""]), f"text {out!r}")
            # 28: bodies the framework cannot parse, said why
            for case, body in (("a 5,000-digit integer", '{"model": "good", "prompt": "x", "seed": ' + "7" * 5000 + "}"),
                               ("a body nested 100,000 deep", '{"model": "good", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")):
                r = post(http, "/v1/completions", body)
                record("28", case, "POST /v1/completions", r, r.status_code == 400 and "parsing the body" not in r.text)
            # 11: the task's expert unloaded: the base model answers, /v1/tasks says so
            inp = {"question": "Which is a shoe?", "options": ["apple", "sneaker", "lamp"]}
            r = post(http, "/v1/tasks/shopbench_task2", {"input": inp})
            record("11", "task with its expert loaded (no model named)", "POST /v1/tasks/shopbench_task2", r,
                   r.status_code == 200 and r.json()["model"] == "expert", f"answered by {r.json().get('model')}")
            post(http, "/v1/unload_lora_adapter", {"lora_name": "expert"})
            r = http.get("/v1/tasks/shopbench_task2")
            record("11", "GET the task after its expert is unloaded", "GET /v1/tasks/shopbench_task2", r,
                   r.status_code == 200 and r.json()["adapter"] is None, f"adapter {r.json().get('adapter')}")
            r = post(http, "/v1/tasks/shopbench_task2", {"input": inp})
            record("11", "task after its expert is unloaded (no model named)", "POST /v1/tasks/shopbench_task2", r,
                   r.status_code == 200 and r.json()["model"] == "tiny-64", f"answered by {r.json().get('model')}")
            # 27: abandoned requests, streamed or not
            for stream in (False, True):
                for _ in range(2):
                    abandon(port, {"model": "good", "prompt": "hello", "max_tokens": 60, "stream": stream})
            time.sleep(1.5)
    finally:
        engine.stop()
        gc.collect()  # (an unretrieved future logs its traceback when collected)
        logging.getLogger().removeHandler(catch)
    bad = [f"{r.name}: {r.getMessage()[:200]}" for r in caught]
    rows.append(("27", "4 requests abandoned mid-answer (2 streamed), then the server stopped", "raw sockets",
                 "stopped", f"log: {'; '.join(bad) if bad else 'no error record (no traceback, nothing never retrieved)'}"))
    if bad:
        problems.append(f"server log has errors: {bad}")


@pytest.mark.slow  # (the tiny fixtures need the real tokenizer)
def test_outputs_and_exports_adversarial_run(tiny, tmp_path, monkeypatch):
    rows, problems = [], []
    here = Path.cwd()  # (the report's path is relative to where the run was started)
    root = tmp_path / "work"
    root.mkdir()
    monkeypatch.chdir(root)  # (the commands below name their paths as a user in that folder would)
    f = scratch(root, tiny)
    run_cli(root, f, rows, problems, monkeypatch)
    monkeypatch.chdir(tmp_path)
    run_server(tiny, tmp_path, rows, problems)
    monkeypatch.chdir(here)
    n_cli = sum(1 for r in rows if str(r[2]).startswith("shoptune"))
    write_section("outputs", [
        "## Outputs, exports and the server, third pass (part A)", "",
        "The commands that write, each bad invocation in a scratch folder that holds a user's files "
        "(`thesis/paper.tex`, notes in earlier outputs), adapters and a Poly run: exit 1, one `error:` "
        "line, no traceback, the folder unchanged (every file hashed before and after); then the "
        "built-in server (uvicorn on a loopback port, tiny model, float32, adapters `good` and `expert`, "
        "`--task-adapter shopbench_task2=expert`). Each item also has its own test that failed before "
        "the fix.", "",
        "```bash", *COMMAND, "```", "", machine_line(), "",
        *table(["item", "case", "request", "status", "message"], rows), "",
        f"{n_cli} command invocations and {len(rows) - n_cli} server cases, {len(problems)} problem(s)."])
    assert not problems, "\n\n".join(problems)
