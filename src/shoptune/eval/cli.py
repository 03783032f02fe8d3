"""``shoptune eval`` and ``shoptune eval compare``."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    from shoptune.cli import console, fail

    eval_app = typer.Typer(help="Evaluate with the exact KDD Cup 2024 ShopBench rules.")
    app.add_typer(eval_app, name="eval")

    @eval_app.callback(invoke_without_command=True)
    def eval_main(
        ctx: typer.Context,
        model: Annotated[Optional[str], typer.Option(help="Embedded name or local HF folder "
                                                     "(openai backend: the served model name).")] = None,
        adapter: Annotated[Optional[str], typer.Option(help="PEFT adapter folder (openai backend: "
                                                       "the adapter's served name).")] = None,
        data: Annotated[Optional[list[str]], typer.Option(help="Data file or folder (repeatable).")] = None,
        out: Annotated[Optional[Path], typer.Option(help="Output folder.")] = None,
        limit: Annotated[Optional[int], typer.Option(help="First N questions only.")] = None,
        backend: Annotated[str, typer.Option(help="local | openai")] = "local",
        base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible base URL.")] = None,
        api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY")] = "EMPTY",
        protocol: Annotated[str, typer.Option(help="starter-kit | chat | fewshot")] = "starter-kit",
        batch_size: int = 16,
        concurrency: Annotated[int, typer.Option(help="Parallel requests (openai backend).")] = 16,
        dtype: Annotated[str, typer.Option(help="auto | bf16 | fp32")] = "auto",
        multilingual_st_model: Annotated[Optional[Path], typer.Option(
            help="Local paraphrase-multilingual-MiniLM-L12-v2 folder.")] = None,
    ) -> None:
        """shoptune eval --model M --data FILE --out DIR [--adapter DIR] [--backend openai ...]"""
        if ctx.invoked_subcommand is not None:
            return
        if not (model and data and out):
            fail("shoptune eval needs --model, --data and --out (or: shoptune eval compare DIR...)", 2)
        import os

        from shoptune.data.loaders import DataValidationError
        from shoptune.eval.runner import evaluate
        from shoptune.models import ModelNotFoundError

        if multilingual_st_model:
            os.environ["SHOPTUNE_MULTILINGUAL_ST_MODEL"] = str(multilingual_st_model)
        try:
            s = evaluate(model=model, adapter=adapter, data=data, out=out, limit=limit,
                         backend=backend, base_url=base_url, api_key=api_key, protocol=protocol,
                         batch_size=batch_size, concurrency=concurrency, dtype=dtype)
        except (DataValidationError, ModelNotFoundError, FileNotFoundError, ValueError,
                RuntimeError) as e:
            fail(str(e))
        from shoptune.eval.report import report_markdown
        console.print(report_markdown(s), markup=False, highlight=False)
        console.print(f"wrote {out}/predictions.jsonl, scores.json, report.md, tracks.png")

    @eval_app.command("compare")
    def eval_compare(dirs: list[Path],
                     plot: Annotated[Optional[Path], typer.Option(help="PNG to write.")] = None) -> None:
        """Side-by-side table (and plot) of several eval output folders."""
        from shoptune.eval.report import compare, plot_tracks

        try:
            table, runs = compare(dirs)
        except FileNotFoundError as e:
            fail(str(e))
        console.print(table, markup=False, highlight=False)
        if plot:
            plot_tracks(runs, plot)
            console.print(f"plot: {plot}")
