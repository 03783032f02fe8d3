"""The command line's consoles and its one way to fail: shared by ``shoptune.cli`` and every
sub-command module (``eval/cli.py``, ``train/cli.py``, ...), which therefore never import the
top-level CLI module (no import cycle)."""
from __future__ import annotations

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def fail(msg: str, code: int = 1) -> None:
    """Print ``error: msg`` on stderr and exit with ``code`` (one line, no traceback)."""
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
