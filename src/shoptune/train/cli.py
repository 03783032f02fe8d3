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
                                                       "checkpoint in output_dir.")] = False) -> None:
        """LoRA fine-tune on a task mixture (optionally three-stage); adapter -> OUT/adapter/."""
        from pydantic import ValidationError

        from shoptune.data.loaders import DataValidationError
        from shoptune.train.config import load_config
        from shoptune.train.recipe import main

        try:
            cfg = load_config(config, overrides or [])
        except (FileNotFoundError, ValueError, ValidationError) as e:
            fail(str(e))
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
