"""``shoptune experiment run`` and ``shoptune experiment report``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from shoptune.console import console, fail, print_markdown
from shoptune.eval.cli import MaxBoot, MaxPerm, NBoot, NPerm


def register(app: typer.Typer) -> None:

    exp_app = typer.Typer(help="Experiments: cells x seeds, trained and scored on a suite; "
                               "paired statistics.", no_args_is_help=True)
    app.add_typer(exp_app, name="experiment")

    @exp_app.command("run")
    def run_cmd(spec: Annotated[Path, typer.Argument(help="Experiment YAML (configs/experiments/*.yaml).")],
                out: Annotated[Path, typer.Option(help="Working folder (checkpoints, adapters, logs).")],
                results: Annotated[Optional[Path], typer.Option(
                    help="Small result files (commit these), e.g. docs/results/experiments/NAME; "
                         "default: OUT.")] = None,
                workers: Annotated[int, typer.Option(min=1, help="Runs side by side.")] = 1,
                launcher: Annotated[Optional[str], typer.Option(
                    help="Start each run's training under this command prefix, e.g. \"accelerate "
                         "launch --config_file configs/accelerate/ddp_gpu.yaml\" (GPU machines); "
                         "default: in the run's process.")] = None,
                only: Annotated[Optional[list[str]], typer.Option(
                    help="Run only the runs matching this pattern (repeatable; shell-style, "
                         "against CELL or CELL.sSEED: --only diverse-r32 --only '*.s1'); the "
                         "others stay for a later run.")] = None,
                reuse: Annotated[bool, typer.Option(
                    help="Copy in a run another experiment (results folder beside this one) already "
                         "finished with the same key, instead of training it again.")] = True,
                eval_engine: Annotated[Optional[Literal["builtin", "llama.cpp", "vllm"]], typer.Option(help=(
                    "The engine every run is scored on, as `shoptune eval --engine` (overrides the "
                    "file's eval.engine; part of each run's key, so engines are never mixed)."))] = None,
                eval_dtype: Annotated[Optional[Literal["auto", "bf16", "fp32"]], typer.Option(
                    help="The dtype every run is scored in, as `shoptune eval --dtype` (overrides "
                         "the file's eval.dtype; part of each run's key).")] = None,
                dry_run: Annotated[bool, typer.Option(help="Plan only: runs, keys, steps, what is done "
                                                      "(writes nothing).")] = False,
                report: Annotated[bool, typer.Option(help="Write the report at the end.")] = True) -> None:
        """Train and score every cell x seed; finished runs are skipped, killed ones resumed."""
        from pydantic import ValidationError

        from shoptune.data.loaders import DataValidationError
        from shoptune.experiment.runner import (check_only, is_done, plan, reusable, run_experiment,
                                                selected)

        from shoptune.configfile import resolve_config
        spec = resolve_config(spec, "experiments")  # a shipped experiment from any folder
        try:
            if dry_run:  # (nothing written)
                with console.status("planning") as st:
                    exp = plan(spec, out, results, launcher=launcher, eval_engine=eval_engine,
                               eval_dtype=eval_dtype, write=False,
                               progress=lambda m: st.update(f"planning: {m}"))
                check_only(exp, only)
                found = reusable(results or out, exp, exp["runs"]) if reuse else {}
                for r in exp["runs"]:
                    state = ("done" if is_done(results or out, r) else "not selected" if not selected(r, only)
                             else f"reuse {found[r['id']][0].parents[2].name}/{found[r['id']][0].parent.name}"
                             if r["id"] in found else "to run")
                    tokens = f", ~{r['planned_tokens']} tokens" if r["planned_tokens"] else ""
                    console.print(f"{r['id']}: {r['max_steps']} steps{tokens} \\[{state}]")
                return
            res = run_experiment(spec, out, results=results, workers=workers, console=console,
                                 launcher=launcher, only=only, reuse=reuse, eval_engine=eval_engine,
                                 eval_dtype=eval_dtype)
        except (FileNotFoundError, ValueError, ValidationError, DataValidationError) as e:
            fail(str(e))
        for rid, source in res["reused"].items():
            console.print(f"{rid}: the same run (key) was finished as {source}: result copied "
                          "(--no-reuse trains it again)")
        console.print(f"{res['runs']} runs: {len(res['skipped'])} already done, {len(res['done'])} "
                      f"finished now, {len(res['failed'])} failed"
                      + (f", {len(res['not_selected'])} not selected" if res["not_selected"] else "")
                      + f" ({res['wall_time_s']} s); "
                      f"results in {res['results_dir']}")
        for rid in res["failed"]:
            console.print(f"[red]failed[/]: {rid} (log: {out / 'cells' / rid / 'cell.log'})")
        if report and (res["done"] or res["skipped"]):
            from shoptune.experiment.report import write_report
            write_report(res["results_dir"])
            console.print(f"report: {Path(res['results_dir']) / 'report.md'}")
        if res["failed"]:
            raise typer.Exit(1)

    @exp_app.command("report")
    def report_cmd(results: Annotated[Path, typer.Argument(help="An experiment's results folder.")],
                   n_boot: NBoot = 2000, n_perm: NPerm = 2000,
                   max_boot: MaxBoot = 512_000, max_perm: MaxPerm = 512_000,
                   seed: Annotated[int, typer.Option(help="Random seed of the draws (verdicts do not "
                                                     "depend on it).")] = 0) -> None:
        """report.md, results.json, scores.png, diff.png: cells x (tracks, all-around, mean over
        tasks) with CIs; paired difference to the baseline with CI, p-value and verdict; the draws
        used and their Monte Carlo error."""
        from shoptune.experiment.report import report_markdown, write_report

        try:
            rep = write_report(results, n_boot=n_boot, n_perm=n_perm, seed=seed, max_boot=max(max_boot, n_boot),
                               max_perm=max(max_perm, n_perm))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        print_markdown(report_markdown(rep))
        console.print(f"wrote {results}/report.md, results.json, scores.png, diff.png")
