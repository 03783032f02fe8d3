"""``shoptune train`` and ``shoptune data mix``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from shoptune.console import OnInvalid, console, fail


def _loss_line(m: dict, logging_steps: int) -> str:
    """``loss 3.4712 -> 2.4911``; for a run that logged one step, that loss and the mean over every
    step (``3.86 -> 3.86`` read as "nothing learned"); for a run too short to log a step, its mean."""
    if m.get("loss_logs") == 1 and m.get("final_loss") is not None:
        mean = f"; mean loss {m['mean_loss']:.4f} over all steps" if m.get("mean_loss") is not None else ""
        return (f"loss {m['final_loss']:.4f} at the one logged step (logging_steps={logging_steps}: "
                f"too few logs to show a change{mean})")
    if m.get("first_loss") is not None and m.get("final_loss") is not None:
        return f"loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}"
    if m.get("mean_loss") is not None:
        return (f"mean loss {m['mean_loss']:.4f} (no step logged: logging_steps={logging_steps} "
                f"> steps)")
    return "loss not logged"


def register(app: typer.Typer, data_app: typer.Typer) -> None:

    @app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train_cmd(config: Annotated[Path, typer.Argument(help="Training YAML: a path, or a shipped "
                                                         "config (configs/train/smoke.yaml, smoke); "
                                                         "`shoptune configs ls`.")],
                  overrides: Annotated[Optional[list[str]], typer.Argument(
                      help="key=value overrides, e.g. lora.r=32 max_steps=40")] = None,
                  out: Annotated[Optional[Path], typer.Option(
                      help="Output folder (= the override output_dir=DIR).")] = None,
                  resume: Annotated[bool, typer.Option(help="Continue from the newest complete "
                                                       "checkpoint in the output folder.")] = False,
                  overwrite: Annotated[bool, typer.Option(help="Start over in an output folder that "
                                                          "holds an earlier run (its adapter, "
                                                          "checkpoints and logs are removed).")] = False,
                  on_invalid: OnInvalid = "skip",
                  plan: Annotated[bool, typer.Option("--plan", help="Print the memory plan (from the "
                                                     "model's config.json alone) and exit.")] = False,
                  gpu: Annotated[Optional[str], typer.Option(help="--plan: the GPU, e.g. a100-80g, "
                                                             "h100-80g, l4-24g, a10g-24g, rtx4090-24g.")] = None,
                  gpus: Annotated[Optional[int], typer.Option(min=1, help="--plan: number of GPUs "
                                                              "(processes).")] = None,
                  accelerate: Annotated[Optional[Path], typer.Option(help="--plan: the accelerate config "
                                                                     "(configs/accelerate/*.yaml).")] = None,
                  answer_fraction: Annotated[float, typer.Option(min=0.001, max=1.0, help="--plan: share "
                                                                 "of tokens that are answers.")] = 0.1) -> None:
        """LoRA fine-tune on a task mixture (optionally three-stage); adapter -> OUT/adapter/."""
        from pydantic import ValidationError

        from shoptune.configfile import resolve_config
        from shoptune.data.loaders import DataValidationError
        from shoptune.train.config import load_config
        from shoptune.train.progress import task_loss_table
        from shoptune._io import check_output_dir, existing_inputs
        from shoptune.train.recipe import clear_run, main, previous_run, run_entries

        overrides = list(overrides or [])
        if out is not None:
            given = [o.partition("=")[2] for o in overrides if o.partition("=")[0].strip() == "output_dir"]
            if given and Path(given[-1]) != out:
                fail(f"--out {out} and output_dir={given[-1]}: two output folders; give one", 2)
            overrides.append(f"output_dir={out}")
        if resume and overwrite:
            fail("--resume continues the run in the output folder, --overwrite replaces it: give one", 2)
        config = resolve_config(config, "train")  # (not found: one line, from the CLI's handler)
        try:
            cfg = load_config(config, overrides)
        except (FileNotFoundError, ValueError, ValidationError) as e:
            fail(str(e))
        if plan:
            try:
                show_plan(cfg, gpu, gpus, accelerate, answer_fraction)
            except (FileNotFoundError, ValueError) as e:
                fail(str(e))
            return
        found = previous_run(Path(cfg.output_dir))
        if found and not (resume or overwrite):
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            fail(f"{cfg.output_dir} already holds a training run ({shown}): --resume continues "
                 f"it, --overwrite starts over (removing it), or choose another --out")
        # an input, the current folder, or a folder holding other files and no earlier run: refused.
        # (In an earlier run's folder the run writes in place and removes only its own files
        # (clear_run): files someone added there stay.)
        check_output_dir(cfg.output_dir, command="train", overwrite=overwrite, resume=resume,
                         legacy=(lambda f: os.listdir(f)) if found else run_entries, flag="--out",
                         inputs=existing_inputs(cfg.mixture.sources, cfg.eval_data, [config],
                                                [cfg.model] if Path(cfg.model).exists() else []))
        if resume and not (found or (Path(cfg.output_dir) / "stage2").is_dir()):
            why = "no such folder" if not Path(cfg.output_dir).exists() else "no checkpoint, adapter or log there"
            fail(f"--resume: {cfg.output_dir} holds no training run to continue ({why}); run without "
                 "--resume to start one")
        if found and not resume:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            clear_run(Path(cfg.output_dir))
            console.print(f"{cfg.output_dir}: removed the earlier run ({shown}); starting over",
                          highlight=False)
        try:
            res = main(cfg, resume=resume, on_invalid=on_invalid)
        except (DataValidationError, FileNotFoundError, ValueError) as e:
            fail(str(e))
        if res:
            table = task_loss_table(Path(cfg.output_dir) / "log.jsonl")
            if table is not None:
                console.print(table)
            console.print(f"{_loss_line(res['metrics'], cfg.logging_steps)} in {res['metrics']['steps']} "
                          f"steps, {res['metrics']['tokens_seen']} tokens, {res['wall_time_s']} s; "
                          f"adapter: {res['adapter']}", highlight=False)

    @data_app.command("mix")
    def mix_cmd(config: Annotated[Path, typer.Argument(help="Mixture YAML: a path, or a shipped "
                                                       "one (configs/mixtures/diverse.yaml, diverse); "
                                                       "a training config's is its mixture: key.")],
                out: Annotated[Path, typer.Option(help="Training set (.jsonl); manifest beside it.")],
                overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value")] = None,
                on_invalid: OnInvalid = "skip",
                overwrite: Annotated[bool, typer.Option(help="Replace OUT and its manifest if they exist "
                                                        "(never an input).")] = False) -> None:
        """Build a training set from a mixture: FILE + FILE.manifest.json (counts, tokens, diversity, hashes)."""
        from shoptune._io import check_new_file, check_out_file, existing_inputs, write_json, write_jsonl
        from shoptune.configfile import read_yaml, resolve_config
        from shoptune.data.loaders import DataValidationError, skipped_line
        from shoptune.data.stats import token_lengths
        from shoptune.models import DEFAULT_MODEL, load_tokenizer
        from shoptune.tasks import answer_text
        from shoptune.train.mixture import MixtureConfig, MixtureError, build_mixture

        # before any work: a folder as --out, a bad config or override (one line each, exit 1)
        manifest_path = check_out_file(out.with_name(out.name + ".manifest.json"))
        check_out_file(out)
        config = resolve_config(config, "mixtures")
        cfg = MixtureConfig.from_yaml(config, overrides or [])
        inputs = existing_inputs([config], cfg.sources)
        for path in (out, manifest_path):  # an input, or a file it did not write: never replaced
            check_new_file(path, inputs=inputs, overwrite=overwrite)
        if "mixture" in read_yaml(config)[0]:
            console.print(f"{config}: a training config; building its mixture: key", highlight=False)
        issues: list = []
        try:
            with console.status("building mixture") as st:
                recs, manifest = build_mixture(cfg, on_invalid=on_invalid, issues=issues,
                                               progress=lambda m: st.update(f"building mixture: {m}"))
                st.update(f"counting tokens of {len(recs)} rows")
                tok = load_tokenizer(DEFAULT_MODEL)
                manifest["tokens"] = {  # (in batches bounded by size: rows may be long)
                    "input": sum(token_lengths(tok, [r.input_field for r in recs])),
                    "answer": sum(token_lengths(tok, [answer_text(r) for r in recs])),
                }
        except DataValidationError as e:
            fail(str(e))
        except MixtureError as e:
            fail(f"{config}: {e}")
        except ValueError as e:  # e.g. a decontamination suite that selects nothing
            fail(str(e))
        console.print(skipped_line(issues), markup=False, highlight=False, soft_wrap=True)
        write_jsonl(out, (r.to_dict() for r in recs))
        write_json(manifest_path, manifest)
        console.print(f"{len(recs)} rows over {manifest['diversity']['n_tasks']} tasks / "
                      f"{manifest['diversity']['n_capabilities']} capabilities -> {out}")
        for cap, n in manifest["capabilities"].items():
            console.print(f"  {cap}: {n}")
        if manifest["short_tasks"]:  # (the manifest has them too)
            short = manifest["short_tasks"]
            console.print(f"{len(recs)} of the {cfg.total} rows asked (total): {len(short)} task(s) have "
                          f"fewer rows than their share asks for (upsample: true repeats their rows): "
                          + ", ".join(f"{t} {v['rows']} of {v['asked']}" for t, v in short.items()),
                          highlight=False)


def show_plan(cfg, gpu_name: str | None, gpus: int | None, accelerate: Path | None,
              answer_fraction: float) -> None:
    """``shoptune train CONFIG --plan``: the memory each process needs, by part, and the verdict."""
    from rich.table import Table

    from shoptune.train.plan import GPUS, GiB, estimate, fits, load_arch, setup_from_config, total
    if gpu_name is not None and gpu_name not in GPUS:
        raise ValueError(f"--gpu: unknown GPU {gpu_name!r}; one of {', '.join(GPUS)}")
    gpu = GPUS.get(gpu_name) if gpu_name else None
    arch = load_arch(cfg.model)
    s = setup_from_config(cfg, gpu=gpu, processes=gpus, accelerate=accelerate, answer_fraction=answer_fraction)
    parts = estimate(arch, s)
    method = {"lora": "LoRA", "qlora": f"QLoRA ({s.quantization})", "full": "full"}[s.method]
    console.print(f"[bold]{cfg.model}[/bold]: {arch.params()['total'] / 1e9:.2f}B parameters, {arch.layers} layers; "
                  f"{method} r={s.r} on {len(s.targets)} modules; batch {s.batch_size} x {s.max_length} tokens; "
                  f"{'bf16' if s.bf16 else 'fp32'}; checkpointing {'on' if s.checkpointing else 'off'}; "
                  f"packing {'on' if s.packing else 'off'}; "
                  + (f"{s.processes} processes, {s.sharding}" if s.processes > 1 else "1 process"))
    table = Table("part", "GiB per process")
    for k, v in parts.items():
        table.add_row(k, f"{v / GiB:.2f}")
    table.add_row("[bold]total[/bold]", f"[bold]{total(parts) / GiB:.2f}[/bold]")
    console.print(table)
    for note in s.notes + [f"answer tokens assumed {answer_fraction:.0%} of tokens (--answer-fraction)"]:
        console.print(f"  note: {note}")
    if gpu is None:
        ok = [g.name for g in GPUS.values() if fits(parts, g)[0]]
        console.print(f"fits on: {', '.join(ok) if ok else 'none of ' + ', '.join(GPUS)}")
        return
    ok, usable = fits(parts, gpu)
    n = f"{s.processes} x " if s.processes > 1 else ""
    verdict = "fits" if ok else f"does not fit (short by {(total(parts) - usable) / GiB:.1f} GiB)"
    console.print(f"{n}{gpu.name}: {usable / GiB:.1f} GiB usable per GPU (after CUDA context and "
                  f"fragmentation) -> [bold]{verdict}[/bold]")
