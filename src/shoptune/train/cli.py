"""``shoptune train`` and ``shoptune data mix``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from shoptune.console import console, fail


def register(app: typer.Typer, data_app: typer.Typer) -> None:

    @app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def train_cmd(config: Annotated[Path, typer.Argument(help="Training YAML (configs/train/*.yaml).")],
                  overrides: Annotated[Optional[list[str]], typer.Argument(
                      help="key=value overrides, e.g. output_dir=runs/x lora.r=32")] = None,
                  resume: Annotated[bool, typer.Option(help="Continue from the newest complete "
                                                       "checkpoint in output_dir.")] = False,
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

        from shoptune.data.loaders import DataValidationError
        from shoptune.train.config import load_config
        from shoptune.train.recipe import main

        try:
            cfg = load_config(config, overrides or [])
        except (FileNotFoundError, ValueError, ValidationError) as e:
            fail(str(e))
        if plan:
            try:
                show_plan(cfg, gpu, gpus, accelerate, answer_fraction)
            except (FileNotFoundError, ValueError) as e:
                fail(str(e))
            return
        try:
            res = main(cfg, resume=resume)
        except (DataValidationError, FileNotFoundError, ValueError) as e:
            fail(str(e))
        if res:
            m = res["metrics"]
            console.print(f"loss {m['first_loss']} -> {m['final_loss']} in {m['steps']} steps, "
                          f"{m['tokens_seen']} tokens, {res['wall_time_s']} s; adapter: {res['adapter']}")

    @data_app.command("mix")
    def mix_cmd(config: Annotated[Path, typer.Argument(help="Mixture YAML (configs/mixtures/*.yaml).")],
                out: Annotated[Path, typer.Option(help="Training set (.jsonl); manifest beside it.")],
                overrides: Annotated[Optional[list[str]], typer.Argument(help="key=value")] = None) -> None:
        """Build a training set from a mixture: FILE + FILE.manifest.json (counts, tokens, diversity, hashes)."""
        from shoptune._io import check_out_file, write_json, write_jsonl
        from shoptune.models import DEFAULT_MODEL, load_tokenizer
        from shoptune.train.format import answer_text
        from shoptune.train.mixture import MixtureConfig, MixtureError, build_mixture

        # before any work: a folder as --out, a bad config or override (one line each, exit 1)
        manifest_path = check_out_file(out.with_name(out.name + ".manifest.json"))
        check_out_file(out)
        cfg = MixtureConfig.from_yaml(config, overrides or [])
        try:
            with console.status("building mixture"):
                recs, manifest = build_mixture(cfg)
        except MixtureError as e:
            fail(f"{config}: {e}")
        except ValueError as e:  # e.g. a decontamination suite that selects nothing
            fail(str(e))
        tok = load_tokenizer(DEFAULT_MODEL)
        manifest["tokens"] = {
            "input": sum(len(x) for x in tok([r.input_field for r in recs], add_special_tokens=False)["input_ids"]),
            "answer": sum(len(x) for x in tok([answer_text(r) for r in recs], add_special_tokens=False)["input_ids"]),
        } if recs else {"input": 0, "answer": 0}
        write_jsonl(out, (r.to_dict() for r in recs))
        write_json(manifest_path, manifest)
        console.print(f"{len(recs)} rows over {manifest['diversity']['n_tasks']} tasks / "
                      f"{manifest['diversity']['n_capabilities']} capabilities -> {out}")
        for cap, n in manifest["capabilities"].items():
            console.print(f"  {cap}: {n}")


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
