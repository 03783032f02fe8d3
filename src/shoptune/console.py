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
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

console = Console()
err = Console(stderr=True)

# Choices shared by the commands that take them (one meaning under one name): the prompt
# protocols of shoptune.decoding.PROTOCOLS and the dtype names shoptune.models.torch_dtype takes
# (tests/test_second_hour.py checks both; here so that the command line starts without torch)
Protocol = Literal["starter-kit", "chat", "fewshot"]
Dtype = Literal["auto", "bf16", "fp32", "fp16", "bfloat16", "float32", "float16"]
DTYPE_METAVAR = "<auto|bf16|fp32|fp16>"  # (the long spellings are accepted, not listed)
DTYPE_HELP = ("The model's dtype: auto (bf16 where the CPU has native bf16, else fp32), bf16, fp32 or "
              "fp16 (bfloat16, float32, float16: the same); llama.cpp takes no fp16.")
PROTOCOL_HELP = ("How a question becomes a prompt: starter-kit (the KDD Cup starter kit's fixed "
                 "prefix), chat (the model's chat template), fewshot (starter-kit with one solved "
                 "question of the same task).")

# One invalid-row policy for every command that reads training data (data split/dedup/mix, train)
OnInvalid = Annotated[Literal["skip", "fail"], typer.Option(
    "--on-invalid",
    help="Rows that break the record rules: skip them (the count and the first one are printed) "
         "or fail, listing them.")]


def piped() -> bool:
    """Whether stdout goes to a file or a pipe rather than a terminal: tables are then printed as
    tab-separated lines (:func:`print_rows`), whole, for ``cut``, ``awk`` and ``sort``."""
    return not console.is_terminal


def print_rows(columns: list[str], rows: list[list]) -> None:
    """A table as tab-separated values: the header line, then one line per row, nothing cut."""
    import csv
    import sys
    w = csv.writer(sys.stdout, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    w.writerow(columns)
    w.writerows(["" if v is None else v for v in r] for r in rows)


def table(*columns: str, title: str | None = None, keep: tuple[str, ...] = (),
          right: tuple[str, ...] = ()) -> Table:
    """A terminal table whose ``keep`` columns (names later commands take) are never wrapped or
    cut: the other columns wrap, at word boundaries, to fit the terminal."""
    t = Table(title=title, box=box.SIMPLE_HEAD)
    for c in columns:
        t.add_column(c, no_wrap=c in keep, justify="right" if c in right else "left")
    return t


def print_markdown(text: str) -> None:
    """Text with Markdown tables (reports, comparisons). Piped: as it is. On a terminal: each
    table as a :func:`table` fitted to the width, its first column (task, track) whole, so a
    row is never broken in the middle of a cell."""
    if piped():
        console.print(text, markup=False, highlight=False, soft_wrap=True,  # (lines whole)
                      end="" if text.endswith("\n") else "\n")
        return
    block: list[list[str]] = []

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    def flush() -> None:
        if not block:
            return
        head, *body = block
        body = [r for r in body if not all(set(c) <= set("-: ") for c in r)]  # (the |---| line)
        t = Table(box=box.SIMPLE_HEAD)
        # the first column as wide as its names (task, track; up to 40), so those stay whole; a
        # longer cell (a sentence-like label) wraps inside it instead of squeezing the numbers out
        names = [len(r[0].strip("*")) for r in body if r] + [len(head[0])]
        width = max([n for n in names if n <= 40] or [40])
        for i, c in enumerate(head):
            t.add_column(c, **({"min_width": width, "max_width": max(width, 40) if max(names) > 40 else None,
                                "overflow": "fold"} if i == 0 else {}))
        for r in body:
            t.add_row(*(Text(c[2:-2], style="bold") if c.startswith("**") and c.endswith("**") and len(c) > 4
                        else Text(c) for c in r))
        console.print(t)
        block.clear()
    for line in text.splitlines():
        if line.startswith("|"):
            block.append(cells(line))
            continue
        flush()
        console.print(line, markup=False, highlight=False)
    flush()


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


def _no_value_shown(params) -> list:
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


def _flags_take_no_value(cmd) -> None:
    """Show no value type beside a flag (typer prints ``<bool>`` beside every one, --help too):
    an empty metavar on each flag of ``cmd`` and its sub-commands, the help option included."""
    _no_value_shown(cmd.get_params(cmd.context_class(cmd)))  # (creates and keeps the help option)
    for sub in getattr(cmd, "commands", {}).values():
        _flags_take_no_value(sub)


class OneLineErrors(TyperGroup):
    """The root command group: expected errors from any sub-command end as one line; flags show
    no ``<bool>`` in any command's help."""

    def __init__(self, **kw):
        super().__init__(**kw)
        _flags_take_no_value(self)

    def get_params(self, ctx):  # (typer adds --install-completion / --show-completion after __init__)
        return _no_value_shown(super().get_params(ctx))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - sorted by error_message; bugs re-raised
            msg = error_message(e)
            if msg is None or os.environ.get("SHOPTUNE_TRACEBACK"):
                raise
            fail(msg)
