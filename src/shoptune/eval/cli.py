"""``shoptune eval`` and ``shoptune eval compare``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from shoptune.console import (DTYPE_HELP, DTYPE_METAVAR, PROTOCOL_HELP, Dtype, Protocol, console, fail,
                              print_markdown)

# shoptune.eval.runner.ENGINES (importing it would import torch before any command runs)
Engine = Literal["builtin", "llama.cpp", "vllm", "openai"]


# Draw options of `eval compare` and `experiment report` (shoptune.eval.paired; 512_000 is its MAX_DRAWS)
# (below 1 is refused with one line by shoptune.eval.runs.check_compare_args, before any work)
NBoot = Annotated[int, typer.Option(help="Bootstrap resamples to start with.")]
NPerm = Annotated[int, typer.Option(help="Permutations to start with.")]
MaxBoot = Annotated[int, typer.Option(min=100, help=(
    "Cap: resamples are doubled until every CI bound is clear of 0 by its Monte Carlo error; "
    "still not at the cap = borderline."))]
MaxPerm = Annotated[int, typer.Option(min=100, help="Cap on permutations (likewise, p against 0.05).")]


def _suite_names() -> str:
    """The shipped suites, for help texts (configs/eval/*.yaml)."""
    from shoptune import REPO_CONFIGS
    return ", ".join(sorted(p.stem for p in (REPO_CONFIGS / "eval").glob("*.yaml")))


def _drawn_from(name: str, overlap: list[str]) -> list[str]:
    """Parts of suite ``name`` whose questions come from the ``overlap`` data itself."""
    from shoptune.eval.suite import load_suite_config
    from shoptune.paths import resolve_data_path

    def where(p):
        try:
            return resolve_data_path(p).resolve()
        except FileNotFoundError:
            return None
    given = [w for w in map(where, overlap) if w is not None]
    notes = []
    for part in load_suite_config(name).parts:
        for src in part.sources:
            w = where(src)
            if w is not None and any(w == g or g in w.parents or w in g.parents for g in given):
                notes.append(f"part {part.name} is drawn from {src}"
                             + (f" (its {part.split} split)" if part.split else "")
                             + ": those questions are in that data by construction"
                             + ("; training mixtures take the train split and are decontaminated "
                                f"against suite:{name} in experiments" if part.split == "test" else ""))
                break
    return notes


def register(app: typer.Typer) -> None:

    eval_app = typer.Typer(help="Evaluate with the exact KDD Cup 2024 ShopBench rules.")
    app.add_typer(eval_app, name="eval")

    @eval_app.callback(invoke_without_command=True)
    def eval_main(
        ctx: typer.Context,
        model: Annotated[Optional[str], typer.Option(help="Embedded name or local HF folder "
                                                     "(--engine openai: the served model name).")] = None,
        adapter: Annotated[Optional[str], typer.Option(help="PEFT adapter folder (--engine openai: "
                                                       "the adapter's served name).")] = None,
        data: Annotated[Optional[list[str]], typer.Option(help="Data file or folder (repeatable).")] = None,
        suite: Annotated[Optional[str], typer.Option(help="Evaluation suite: a name under configs/eval "
                                                     f"({_suite_names()}) or a suite YAML; instead of --data.")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Output folder: predictions.jsonl, "
                                                    "scores.json, report.md, tracks.png.")] = None,
        limit: Annotated[Optional[int], typer.Option(min=1, help="First N questions only.")] = None,
        engine: Annotated[Engine, typer.Option(help=(
            "builtin (this process) | llama.cpp | vllm (started for this evaluation, asked through "
            "shoptune's task endpoint: the same constrained decoding; `make llama-server` / "
            "`make vllm`) | openai (a server already running at --base-url)"))] = "builtin",
        backend: Annotated[Optional[str], typer.Option(hidden=True, help="Former name: local = "
                                                       "--engine builtin, openai = --engine openai.")] = None,
        base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL (--engine openai).")] = None,
        limit_per_task: Annotated[Optional[int], typer.Option(min=1, help="First N questions of each task.")] = None,
        api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY", help=(
            "The key the --engine openai server wants (sent as `Authorization: Bearer KEY`; a "
            "`shoptune serve --api-key KEY`).") )] = "EMPTY",
        protocol: Annotated[Protocol, typer.Option(help=PROTOCOL_HELP)] = "starter-kit",
        batch_size: Annotated[int, typer.Option(min=1, help="Questions generated together in one "
                                                "batch (builtin engine).")] = 16,
        concurrency: Annotated[int, typer.Option(min=1, help="Parallel requests (llama.cpp, vllm, openai).")] = 16,
        dtype: Annotated[Dtype, typer.Option(metavar=DTYPE_METAVAR, help=DTYPE_HELP)] = "auto",
        merge: Annotated[bool, typer.Option(help="Merge a single adapter into the weights (builtin, "
                                            "vllm; same outputs within rounding, no per-token LoRA "
                                            "cost). On by default, unlike `shoptune serve`'s: an "
                                            "evaluation runs one adapter, a server many. llama.cpp "
                                            "applies it per request.")] = True,
        prefix_cache: Annotated[bool, typer.Option(help="Run the prompts' shared prefix once and "
                                                   "reuse its KV (local backend; answers equal "
                                                   "within rounding).")] = False,
        compile_: Annotated[Literal["auto", "on", "off"], typer.Option("--compile", help=(
            "Compile the built-in engine's decoder layers with torch.compile "
            "(the first batches of each shape pay the compile; inductor's cache under the cache "
            "folder makes later runs warm); auto = on where it was measured to pay on this kind "
            "of machine (docs/results/train_speed.md)"))] = "auto",
        task_adapter: Annotated[Optional[list[str]], typer.Option(
            help="TASK=DIR (repeatable): a per-task deployment; TASK's questions (a task card's "
                 "name, or ShopBench's: task2) are answered by adapter DIR, the others by --adapter "
                 "or the base model.")] = None,
        multilingual_st_model: Annotated[Optional[Path], typer.Option(
            help="Local paraphrase-multilingual-MiniLM-L12-v2 folder.")] = None,
        overwrite: Annotated[bool, typer.Option(
            help="Replace --out if it holds an earlier evaluation (and nothing else).")] = False,
    ) -> None:
        """shoptune eval --model M --data FILE --out DIR [--adapter DIR] [--engine vllm ...]"""
        if ctx.invoked_subcommand is not None:
            return
        if not (model and (data or suite) and out) or (data and suite):
            fail("shoptune eval needs --model, --out and one of --data / --suite "
                 "(or: shoptune eval compare DIR...)", 2)
        import os

        from shoptune.data.loaders import DataValidationError
        from shoptune.eval.runner import evaluate
        from shoptune.models import ModelNotFoundError

        from shoptune.tasks import card_name
        task_adapters = {}
        for item in task_adapter or []:
            name, sep, folder = item.partition("=")
            if not (sep and name.strip() and folder.strip()):
                fail(f"--task-adapter {item!r}: expected TASK=DIR (e.g. ecguide_sap=runs/sap/adapter)", 2)
            task = card_name(name.strip())  # (task2 is shopbench_task2)
            if task in task_adapters:
                fail(f"--task-adapter: task {task!r} given twice", 2)
            task_adapters[task] = folder.strip()
        if multilingual_st_model:
            os.environ["SHOPTUNE_MULTILINGUAL_ST_MODEL"] = str(multilingual_st_model)
        try:
            s = evaluate(model=model, adapter=adapter, data=data or (), suite=suite, out=out, limit=limit,
                         engine=engine, backend=backend, base_url=base_url, api_key=api_key, protocol=protocol,
                         limit_per_task=limit_per_task,
                         batch_size=batch_size, concurrency=concurrency, dtype=dtype, merge=merge,
                         task_adapters=task_adapters or None, prefix_cache=prefix_cache,
                         overwrite=overwrite, compile=compile_)
        except (DataValidationError, ModelNotFoundError, FileNotFoundError, ValueError,
                RuntimeError) as e:
            fail(str(e))
        from shoptune.eval.report import report_markdown
        print_markdown(report_markdown(s))
        console.print(f"wrote {out}/predictions.jsonl, scores.json, report.md, tracks.png")

    @eval_app.command("compare")
    def eval_compare(dirs: Annotated[list[Path], typer.Argument(
                         help="Evaluation folders (`shoptune eval --out`) of the same questions; "
                              "each is compared with the first.")],
                     plot: Annotated[Optional[Path], typer.Option(help="PNG to write: the tracks of "
                                                                  "every run side by side.")] = None,
                     n_boot: NBoot = 2000, n_perm: NPerm = 2000,
                     max_boot: MaxBoot = 512_000, max_perm: MaxPerm = 512_000,
                     seed: Annotated[int, typer.Option(help="Seed of the bootstrap and permutation "
                                                       "draws.")] = 0,
                     json_out: Annotated[Optional[Path], typer.Option(
                         help="Also write the paired statistics to this JSON file.")] = None,
                     json_old: Annotated[Optional[Path], typer.Option(
                         "--json", hidden=True, help="The former name of --json-out (elsewhere "
                                                     "--json prints JSON instead of a table).")] = None,
                     overwrite: Annotated[bool, typer.Option(
                         help="Replace an existing --plot / --json-out file.")] = False) -> None:
        """Side-by-side table of eval folders run on the same questions, then each run minus the
        first: paired bootstrap 95% CI and paired permutation p-value per task, track, all-around."""
        from shoptune.eval.paired import format_paired, paired_compare
        from shoptune.eval.report import compare, plot_tracks
        from shoptune.eval.runs import RunFolderError, check_compare_args, read_run
        from shoptune.eval.suite import ManifestMismatch, check_same_questions, manifest_of
        from shoptune._io import check_new_file
        from shoptune.eval.runner import EVAL_FILES

        json_out = json_out or json_old
        inputs = [*dirs, *(Path(d) / f for d in dirs for f in EVAL_FILES)]
        for flag, path in (("--plot", plot), ("--json-out", json_out)):
            if path is not None:  # (before the work: an input or someone's file is never replaced)
                check_new_file(path, inputs=inputs, overwrite=overwrite, flag=flag)
        bad_args = check_compare_args(n_boot, n_perm)
        if bad_args:
            fail(bad_args, 2)
        try:  # every folder read and checked before any statistic (one line for a malformed one)
            read = {str(d): read_run(d) for d in dirs}
        except (FileNotFoundError, RunFolderError) as e:
            fail(str(e), 2)
        try:
            check_same_questions({str(d): manifest_of(d) for d in dirs})
            table, runs = compare(dirs)
        except (FileNotFoundError, ManifestMismatch) as e:
            fail(str(e), 2)
        print_markdown(table)
        results = {}
        for d in dirs[1:]:
            rows = [read[str(r)].predictions for r in (dirs[0], d)]
            res = paired_compare([rows[0]], [rows[1]], n_boot=n_boot, n_perm=n_perm, seed=seed,
                                 max_boot=max(max_boot, n_boot), max_perm=max(max_perm, n_perm))
            results[str(d)] = res
            print_markdown(format_paired(res, Path(dirs[0]).name or str(dirs[0]), Path(d).name or str(d)))
        if json_out:
            from shoptune._io import write_json
            import sys

            from shoptune import machine
            write_json(json_out, {"a": str(dirs[0]), "paired": results, "machine": machine.describe(),
                                  "argv": sys.argv})
        if plot:
            plot_tracks(runs, plot)
            console.print(f"plot: {plot}")

    @eval_app.command("suite")
    def eval_suite(name: Annotated[str, typer.Argument(help="Suite name (configs/eval) or YAML path.")],
                   as_json: Annotated[bool, typer.Option("--json", help="The manifest as JSON.")] = False,
                   overlap: Annotated[Optional[list[str]], typer.Option(
                       help="Training data to check the suite against (13-gram overlap, repeatable).")] = None) -> None:
        """What a suite holds: questions per part, capability and task type; its fingerprint."""
        import json

        from shoptune.data.loaders import DataValidationError
        from shoptune.eval.suite import build_suite

        try:
            recs, m = build_suite(name)
        except (FileNotFoundError, ValueError, DataValidationError) as e:
            fail(str(e))
        if overlap:
            from shoptune.data.dedup import ngram_overlap
            from shoptune.data.loaders import iter_records
            train = list(iter_records(overlap, issues=[]))
            rep = ngram_overlap(train, {m["suite"]: recs})
            m["overlap"] = {"training_data": overlap, **rep.summary(), "notes": _drawn_from(name, overlap)}
        if as_json:
            print(json.dumps({k: v for k, v in m.items()}, indent=1))
            return
        console.print(f"suite {m['suite']} v{m['version']}: {m['n_questions']} questions, "
                      f"fingerprint {m['fingerprint']}")
        for part in m["parts"]:
            console.print(f"  {part['name']}: {part['n']} questions over {len(part['tasks'])} tasks")
        console.print("  capabilities: " + ", ".join(f"{k}={v}" for k, v in m["capabilities"].items()))
        console.print("  task types: " + ", ".join(f"{k}={v}" for k, v in m["task_types"].items()))
        if overlap:
            for es, v in m["overlap"]["eval_sets"].items():
                console.print(f"  13-gram overlap with {', '.join(overlap)}: {v['overlapping']} of "
                              f"{v['questions']} questions")
            for note in m["overlap"]["notes"]:
                console.print(f"  note: {note}", highlight=False)
