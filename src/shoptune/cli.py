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
from typing import Annotated, Literal, Optional

import typer

from shoptune.console import OnInvalid, OneLineErrors, console, err, fail, piped, print_rows, table
from shoptune.data.cli import register as register_data
from shoptune.eval.cli import register as register_eval
from shoptune.experiment.cli import register as register_experiment
from shoptune.records import CAPABILITIES
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

app = typer.Typer(help="shoptune: one LLM for every e-commerce task: data, training, evaluation, serving.",
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
                                                 "$SHOPTUNE_DATA_DIR, else ./data, else the data/ "
                                                 "folder of the shoptune checkout).")]
Paths = Annotated[Optional[list[str]], typer.Argument(
    help="Files or folders (relative to the data dir when not found as given); with --task of an "
         "own task, default: the files its card names.", show_default=False)]


def _paths(paths: list[str] | None, task: str | None) -> list[str]:
    """The files to read: as given, else (``--task`` of a card naming its own files) the task."""
    if paths:
        return paths
    if task:
        from shoptune.tasks import find_card
        card = find_card(task)
        if card is not None and card.source.files:
            return [task]
        if card is None:
            fail(f"--task {task}: unknown task (`shoptune tasks ls` lists them)")
        fail(f"--task {task}: its card names no files of its own (source.files); give the files")
    fail("give the files or folders to read (or --task of an own task, whose card names them)")
MapOpt = Annotated[Optional[list[str]], typer.Option(
    "--map", help="Column mapping for your own files: FIELD=COLUMN (e.g. input_field=question).")]
TaskOpt = Annotated[Optional[str], typer.Option("--task", help="Task card to tag your own rows "
                                                "with (gives type, metric, capability).")]
OverwriteFile = Annotated[bool, typer.Option(help="Replace output files that exist (never an input).")]


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
def tasks_ls(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects "
                                                                "instead of the table.")] = False,
             capability: Annotated[Optional[Literal[CAPABILITIES]], typer.Option(
                 help="Only this capability's tasks.")] = None,
             count_rows: Annotated[bool, typer.Option(help="Count each task's rows in the data dir "
                                                      "(--no-count-rows: faster, rows '-').")] = True,
             rows_old: Annotated[Optional[bool], typer.Option(
                 "--rows/--no-rows", hidden=True, help="The former name of --count-rows.")] = None,
             data_dir: DataDir = None) -> None:
    """List every task card: capability, task, type, metric, rows. Piped: tab-separated lines."""
    from shoptune.data.loaders import iter_raw
    from shoptune.paths import data_dir as ddir
    from shoptune.tasks import all_cards

    _set_data_dir(data_dir)
    cards = [c for c in all_cards().values() if capability in (None, c.capability)]
    counts: dict[str, int | None] = {c.name: None for c in cards}
    if rows_old is not None:  # (--rows / --no-rows, the former spelling)
        count_rows = rows_old
    if count_rows:
        root = ddir()
        cache: dict[Path, list[dict]] = {}
        for c in cards:
            if c.source.files:  # an own task: the rows of its own files
                counts[c.name] = sum(1 for f in c.source_files() if f.is_file()
                                     for _, r, _ in iter_raw(f) if r is not None)
                continue
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
    cols = ("capability", "task", "type", "metric", "rows")
    if piped():
        print_rows(list(cols), [[r[c] for c in cols] for r in out])
        return
    # the capability heads its tasks (a column of its own would not fit 80 columns with the names whole)
    t = table(*cols[1:], title=f"{len(out)} tasks by capability", keep=("task",), right=("rows",))
    for cap in dict.fromkeys(r["capability"] for r in out):
        t.add_row(f"[bold]{cap}[/]")
        mine = [r for r in out if r["capability"] == cap]
        for i, r in enumerate(mine, 1):
            t.add_row(r["task"], r["type"], r["metric"], "-" if r["rows"] is None else str(r["rows"]),
                      end_section=i == len(mine))
    console.print(t)


@tasks_app.command("show")
def tasks_show(name: Annotated[str, typer.Argument(help="A task card's name (or ShopBench's, e.g. "
                                                 "task2); `shoptune tasks ls` lists them.")]) -> None:
    """Print one task card as YAML."""
    import yaml

    from shoptune.tasks import get_card

    try:
        card = get_card(name)
    except KeyError as e:
        fail(str(e).strip("'\""))
    data = card.model_dump(exclude_defaults=True, by_alias=True)
    data.setdefault("metric", list(card.metrics) if len(card.metrics) > 1 else card.metric)
    if card.path is not None:
        print(f"# {card.path}")
    print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))


@tasks_app.command("new")
def tasks_new(
        name: Annotated[str, typer.Argument(help="The new task's name (lower case, digits, _).")],
        from_: Annotated[Path, typer.Option("--from", help="Your data: CSV, JSON lines, JSON or Parquet, "
                                            "with your own column names.")],
        input_: Annotated[list[str], typer.Option("--input", help="A column the model reads "
                                                  "(repeatable; each becomes a named input).")],
        label: Annotated[Optional[str], typer.Option(help="The column holding one label per row "
                                                     "(output: label; the labels are the values seen).")] = None,
        labels: Annotated[Optional[str], typer.Option(help="The column holding several labels per row: a "
                                                      "JSON list, or text split at | ; or , (output: labels).")] = None,
        json_: Annotated[Optional[str], typer.Option("--json", help="The column holding a JSON object per "
                                                     "row (output: json; the schema is inferred).")] = None,
        target: Annotated[Optional[str], typer.Option(help="The column holding a free-text answer (output: "
                                                      "text), or a number (output: number).")] = None,
        output: Annotated[Optional[str], typer.Option(help="With --target: text or number (default: number "
                                                      "when every value is one).")] = None,
        capability: Annotated[Optional[str], typer.Option(help="concept_understanding (default), "
                                                          "knowledge_reasoning, user_behavior_alignment or "
                                                          "multilingual.")] = None,
        metric: Annotated[Optional[list[str]], typer.Option(help="Metric(s) instead of the output's defaults "
                                                            "(repeatable; the first is the task's score).")] = None,
        description: Annotated[Optional[str], typer.Option(help="One line saying what the task is.")] = None,
        tasks_dir: Annotated[Path, typer.Option(help="Where the card is written (./tasks is read by "
                                                "every command; else add the folder to SHOPTUNE_TASKS_PATH).")] = Path("tasks"),
        overwrite: Annotated[bool, typer.Option(help="Replace a card of this name that `tasks new` wrote.")] = False,
) -> None:
    """Make a task card from your own file: infer the labels or the JSON schema, read every row
    through the card, write TASKS_DIR/NAME.yaml, and print the label distribution, the invalid
    rows and the commands that come next."""
    from shoptune.tasks import own_dirs
    from shoptune.tasks.new import make

    made = make(name, from_, inputs=input_, label=label, labels=labels, json_col=json_, target=target,
                output=output, capability=capability, metrics=metric, description=description,
                tasks_dir=tasks_dir, overwrite=overwrite)
    card = made.card
    _say(f"task card -> {made.path}  (output: {card.output}; metric: {', '.join(card.metrics)}; "
         f"capability: {card.capability})")
    _say(f"rows: {made.rows} valid, {len(made.invalid)} invalid")
    for issue in made.invalid[:10]:
        _say(f"  {issue}")
    if len(made.invalid) > 10:
        _say(f"  ... and {len(made.invalid) - 10} more (`shoptune data validate --task {name} {from_}`)")
    if made.distribution:
        what = {"label": "label", "labels": "label", "json": "key (rows with a value)"}.get(card.output, "value")
        shown = [[str(k), str(n), f"{n / made.rows:.0%}"] for k, n in made.distribution.most_common(40)]
        if piped():
            print_rows([what, "rows", "share"], shown)
        else:
            t = table(what, "rows", "share", title=f"{card.output}: {len(made.distribution)} distinct",
                      keep=(what,), right=("rows", "share"))
            for row in shown:
                t.add_row(*row)
            console.print(t)
    for note in made.notes:
        _say(f"note: {note}")
    found = made.path.parent.resolve() in {d.resolve() for d in own_dirs() if d.exists()}
    env = "" if found else f"SHOPTUNE_TASKS_PATH={made.path.parent} "
    if not found:
        _say(f"note: {made.path.parent} is not read by other commands: run them from its parent "
             f"folder (as ./tasks), or export SHOPTUNE_TASKS_PATH={made.path.parent}")
    _say("next:")
    for line in (f"{env}shoptune data split --task {name} --out data/{name}      # train/validation/test rows",
                 f"{env}shoptune eval --data data/{name}/test.jsonl --model smollm2-135m --out runs/{name}/base",
                 f"{env}shoptune train smoke --out runs/{name}/train mixture.sources=[{name}]",
                 f"{env}shoptune serve --model smollm2-135m --adapter {name}=runs/{name}/train/adapter"
                 f"   # POST /v1/tasks/{name}"):
        _say(f"  {line}")


# ----------------------------------------------------------------------------- data

@data_app.command("validate")
def data_validate(paths: Paths = None, task: TaskOpt = None, map_: MapOpt = None) -> None:
    """Check every row against its task type; exit 0, or list the errors and exit 1."""
    from shoptune.data.loaders import MAX_ISSUES_SHOWN
    from shoptune.data.validate import validate_records

    try:
        n_ok, issues = validate_records(_paths(paths, task), task=task, mapping=_mapping(map_))
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
def data_stats(paths: Annotated[Optional[list[str]], typer.Argument(
                   help="Files or folders (default: ec-guide and shopbench-dev in the data dir).")] = None,
               as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON "
                                                                  "instead of the table.")] = False,
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
    rows = [[r["capability"], r["task"], r["task_type"], r["metric"], r["rows"]] for r in st["by_task"]]
    if piped():
        print_rows(["capability", "task", "type", "metric", "rows"], rows)
    else:
        t = table("capability", "task", "type", "metric", "rows", keep=("task",), right=("rows",),
                  title=f"{st['total_rows']} rows ({st['invalid_rows']} break the record rules; "
                        f"`shoptune data validate` lists them)")
        for r in rows:
            t.add_row(*map(str, r))
        console.print(t)
    for key in ("by_capability", "by_task_type", "by_source", "duplicates"):
        console.print(f"[bold]{key}[/]: " + ", ".join(f"{k}={v}" for k, v in st[key].items()))
    if "tokens" in st:
        for k in ("input", "output"):
            console.print(f"[bold]{k} tokens[/]: " +
                          ", ".join(f"{p}={v}" for p, v in st["tokens"][k].items()))


@data_app.command("split")
def data_split(paths: Paths = None, *, out: Annotated[Path, typer.Option(help="Folder for train/validation/"
                                                                "test .jsonl")],
               seed: Annotated[int, typer.Option(help="Seed of the split (each row's part is a "
                                                  "hash of its id and the seed).")] = 0,
               validation: Annotated[float, typer.Option(help="Share of each task's rows in "
                                                         "validation.jsonl.")] = 0.02,
               test: Annotated[float, typer.Option(help="Share of each task's rows in test.jsonl.")] = 0.05,
               task: TaskOpt = None, map_: MapOpt = None, on_invalid: OnInvalid = "skip",
               overwrite: Annotated[bool, typer.Option(help="Replace --out if it holds an earlier split "
                                                       "(and nothing else).")] = False) -> None:
    """Deterministic per-task splits (stable when files grow) -> OUT/{train,validation,test}.jsonl."""
    from shoptune._io import check_output_dir, existing_inputs, output_dir, write_jsonl
    from shoptune.data.loaders import own_task_files
    from shoptune.data.splits import split_records

    paths = _paths(paths, task)
    inputs = existing_inputs(paths, own_task_files(paths))
    check_output_dir(out, command="data split", inputs=inputs, overwrite=overwrite)  # before the work
    recs, skipped = _load_valid(paths, on_invalid=on_invalid, task=task, mapping=_mapping(map_))
    try:
        parts = split_records(recs, seed=seed, validation=validation, test=test)
    except ValueError as e:
        fail(str(e))
    with output_dir(out, command="data split", inputs=inputs, overwrite=overwrite) as tmp:
        for name, rows in parts.items():
            write_jsonl(tmp / f"{name}.jsonl", (r.to_dict() for r in rows))
    for name, rows in parts.items():
        console.print(f"{name}: {len(rows)} rows -> {out / (name + '.jsonl')}")
    _say(skipped)


@data_app.command("dedup")
def data_dedup(paths: Paths = None, *,
               out: Annotated[Path, typer.Option(help="Cleaned records (.jsonl).")],
               against: Annotated[Optional[list[str]], typer.Option(
                   help="Evaluation sets to decontaminate against (repeatable).")] = None,
               removed_out: Annotated[Optional[Path], typer.Option(
                   "--removed", help="The removed rows and why (.jsonl); default OUT.removed.jsonl.")] = None,
               report_old: Annotated[Optional[Path], typer.Option(
                   "--report", hidden=True, help="The former name of --removed (elsewhere --report "
                                                 "says whether to write a report).")] = None,
               threshold: Annotated[float, typer.Option(help="Near duplicates: rows of a task whose "
                                                        "content Jaccard similarity (MinHash) is at "
                                                        "least this.")] = 0.9,
               contamination_threshold: Annotated[float, typer.Option(
                   help="Decontamination: a row this similar (content Jaccard) to an evaluation "
                        "question, of any task, is dropped.")] = 0.8,
               near: Annotated[bool, typer.Option(help="Near-duplicate (MinHash) pass.")] = True,
               ngram: Annotated[int, typer.Option(help="Decontamination: word n-gram overlap "
                                                  "(GPT-3 / lm-eval: 13; 0 = off).")] = 13,
               task: TaskOpt = None, map_: MapOpt = None, on_invalid: OnInvalid = "skip",
               overwrite: OverwriteFile = False) -> None:
    """Drop exact and near duplicates, and anything that appears in an evaluation set
    (--against FILE or suite:NAME): exactly, nearly, or as a shared 13-gram."""
    from collections import Counter

    from shoptune._io import check_new_file, existing_inputs, write_jsonl
    from shoptune.data.loaders import own_task_files
    from shoptune.data.dedup import decontaminate, dedup

    paths = _paths(paths, task)
    inputs = existing_inputs(paths, own_task_files(paths),
                             [a for a in against or [] if not a.startswith("suite:")])
    check_new_file(out, inputs=inputs, overwrite=overwrite)
    report = check_new_file(removed_out or report_old or out.with_suffix(".removed.jsonl"), inputs=inputs,
                            overwrite=overwrite, flag="--removed")
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
               ec_guide: Annotated[bool, typer.Option(help="Download EC-Guide from Hugging Face "
                                                        "(--no-ec-guide: only the ShopBench file).")] = True,
               overwrite: OverwriteFile = False) -> None:
    """Download EC-Guide (Hugging Face) and, given its address, the ShopBench dev set."""
    from shoptune.data.fetch import fetch
    from shoptune.paths import data_dir as ddir

    dest = Path(data_dir) if data_dir else ddir()
    from shoptune._io import OutputError
    try:
        got = fetch(dest, shopbench_url=shopbench_url, ec_guide=ec_guide, overwrite=overwrite)
    except OutputError as e:
        fail(str(e))
    except Exception as e:  # network, hub, format: say what failed, no traceback
        fail(f"fetch failed: {type(e).__name__}: {e}. Without network, copy the data into {dest} "
             f"(see ../shared/data/README.md for the layout).")
    console.print(f"fetched {len(got)} file(s) into {dest}")
    if not shopbench_url:
        console.print("ShopBench development set: pass --shopbench-url, or place "
                      f"development.json in {dest / 'shopbench-dev'}")


# ----------------------------------------------------------------------------- models

@models_app.command("ls")
def models_ls(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects "
                                                                 "instead of the table.")] = False) -> None:
    """Embedded models, whether their package is installed and whether they are cached."""
    from shoptune.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    cols = ("name", "available", "cached", "size", "cache_dir", "description")
    shown = [[r["name"], "yes" if r["available"] else "no (install its package)",
              "yes" if r["cached"] else "no", f"{r['cache_bytes'] / 1e6:.0f} MB", r["cache_dir"],
              r["description"]] for r in rows]
    if piped():
        print_rows(list(cols), shown)
        return
    t = table(*cols, keep=("name", "cache_dir"))
    for r in shown:
        t.add_row(*r)
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
def configs_ls(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list of objects "
                                                                  "instead of the table.")] = False) -> None:
    """Every shipped config: its name (KIND/NAME), file and first comment line. Commands take
    the name or the path (configs/train/smoke.yaml) from any folder."""
    from shoptune.configfile import describe, shipped_configs

    rows = [{"name": n, "path": str(p), "description": describe(p)} for n, p in shipped_configs()]
    if as_json:
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    if piped():
        print_rows(["name", "description"], [[r["name"], r["description"]] for r in rows])
        return
    t = table("name", "description", keep=("name",),
              title=f"{len(rows)} shipped configs (copy one to edit: shoptune configs cp NAME DEST)")
    for r in rows:
        t.add_row(r["name"], r["description"])
    console.print(t)


@configs_app.command("cp")
def configs_cp(name: Annotated[str, typer.Argument(help="A shipped config: train/smoke, "
                                                   "configs/train/smoke.yaml, ...")],
               dest: Annotated[Path, typer.Argument(help="File or existing folder to copy it to.")],
               overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
               force: Annotated[bool, typer.Option(hidden=True, help="The former name of "
                                                                     "--overwrite.")] = False) -> None:
    """Copy a shipped config to edit it (as torchtune's `tune cp`)."""
    from shoptune._io import atomic_open, check_out_file
    from shoptune.configfile import shipped_config, shipped_configs, shipped_dir

    src = shipped_config(name)
    if src is None:
        bare = Path(name).name.removesuffix(".yaml").removesuffix(".yml")  # (qwen2.5-7b: no .stem)
        matches = [p for n, p in shipped_configs() if Path(n).name == bare]
        if len(matches) == 1:
            src = matches[0]
        else:
            known = ", ".join(n for n, _ in shipped_configs())
            fail(f"{name}: no shipped config of that name" + (" (several kinds have it)" if matches else "")
                 + f"; shipped: {known}")
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not (overwrite or force):
        fail(f"{target} exists (--overwrite replaces it)")
    check_out_file(target)
    with atomic_open(target) as fh:
        fh.write(src.read_text(encoding="utf-8"))
    shown = src.relative_to(shipped_dir()).with_suffix("").as_posix()  # the name `configs ls` lists
    console.print(f"copied {shown} -> {target}", highlight=False)


# ----------------------------------------------------------------------------- demo

from shoptune.demo import DURATION as _DEMO_TIME, QUICK_DURATION as _QUICK_TIME, QUICK_WHAT as _QUICK_WHAT  # noqa: E402


@app.command("demo", help=f"Train on a small diverse mixture (60 LoRA steps), then compare base and "
                          f"tuned on the ShopBench dev set and held-out EC-Guide questions: "
                          f"{_DEMO_TIME} on 2 CPU cores.")
def demo(out: Annotated[str, typer.Option(help="Output folder: the training run, the evaluations, "
                                             "compare.png.")] = "runs/demo",
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
