"""The command line's consoles and its one way to fail: shared by ``shoptune.cli`` and every
sub-command module (``eval/cli.py``, ``train/cli.py``, ...), which therefore never import the
top-level CLI module (no import cycle).

:class:`OneLineErrors` is the CLI's single place where an *expected* error that reached the top
(a file that cannot be read or written, a config that does not validate, a server that cannot
be reached, any of shoptune's own error classes) becomes ``error: ...`` on one line and exit 1.
Anything else is a bug and keeps its traceback (``SHOPTUNE_TRACEBACK=1`` shows it for expected
errors too).
"""
from __future__ import annotations

import os
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

console = Console()
err = Console(stderr=True)

# One invalid-row policy for every command that reads training data (data split/dedup/mix, train)
OnInvalid = Annotated[Literal["skip", "fail"], typer.Option(
    "--on-invalid",
    help="Rows that break the record rules: skip them (the count and the first one are printed) "
         "or fail, listing them.")]


def fail(msg: str, code: int = 1) -> None:
    """Print ``error: msg`` on stderr and exit with ``code`` (one line, no traceback)."""
    err.print(f"[bold red]error:[/] {escape(str(msg))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_message(e: BaseException) -> str | None:
    """What to tell the user about ``e`` if it is an expected error, else None (a bug)."""
    mod = type(e).__module__ or ""
    if isinstance(e, OSError) and mod == "builtins":
        if e.filename is not None:  # a file that cannot be read or written
            where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
            return f"{where}: {e.strerror or e}"
        if len(e.args) == 1 and isinstance(e.args[0], str):  # raised with a message, on purpose
            return e.args[0]
    if any((c.__module__ or "").startswith("shoptune.") for c in type(e).__mro__):
        return str(e) or type(e).__name__  # the project's own errors carry their message
    if mod.startswith(("openai", "httpx")):  # a server that cannot be reached or refuses
        request = getattr(e, "request", None)
        url = getattr(request, "url", None) if request is not None else None
        cause = e.__cause__ or e.__context__
        why = _one_line(str(e) or type(e).__name__)
        if cause is not None and why.rstrip(".").lower() in ("connection error", "request timed out"):
            why = f"{why.rstrip('.')} ({_one_line(cause) or type(cause).__name__})"
        return f"{url}: {why}" if url else why
    if mod.startswith("pydantic") and hasattr(e, "errors"):
        from shoptune.configfile import format_errors
        return format_errors(getattr(e, "title", "config"), e)
    if mod.startswith("yaml"):
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        return f"{where}not valid YAML: {_one_line(getattr(e, 'problem', None) or e)}"
    return None


class OneLineErrors(TyperGroup):
    """The root command group: expected errors from any sub-command end as one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - sorted by error_message; bugs re-raised
            msg = error_message(e)
            if msg is None or os.environ.get("SHOPTUNE_TRACEBACK"):
                raise
            fail(msg)
