"""Read task data in every layout shoptune meets, into :class:`~shoptune.records.Record` objects.

Layouts (detected from the path):

* ShopBench JSON lines or JSON array (``development.json``): rows carry ``task_name``/``track``.
* The EC-Guide folder (``Generation/``, ``MCQ/``, ``NER/``, ``Retrieval/``): the file, and for
  mixed files the row's type/metric, pick the task card.
* The Shopping MMLU release layout ``<task_type>/<task>_dataset.{csv,json}``.
* A user's own JSON lines / JSON / CSV, with a column mapping and a task card (``task=``).

JSON lines and CSV stream row by row (fine for millions of rows); a JSON array is parsed whole.
Problems are :class:`DataIssue` objects naming the file, line (or array index) and field.
"""
from __future__ import annotations

import ast
import codecs
import csv
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from shoptune import tasks
from shoptune._io import (ROW_CAP, InputError, JsonBoundsError, bounds_problem, byte_cap, iter_lines,
                          json_decode, json_loads, json_value_end, open_input, over_cap)
from shoptune.records import (CAPABILITIES, METRICS, TASK_TYPES, TRACK_TO_CAPABILITY, Record)
from shoptune.tasks.outputs import GoldError, output_for

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
EC_GUIDE_FOLDERS = ("Generation", "MCQ", "NER", "Retrieval")
MAX_ISSUES_SHOWN = 20



@dataclass(frozen=True, slots=True)
class DataIssue:
    """One problem with the data. ``str()`` is the editors' ``path:LINE: field: reason`` (no
    ``LINE`` for a whole-file problem, no ``field`` for an unreadable row), so an editor or a CI
    annotation jumps to the line; a JSON-array element is named by the line it starts on."""
    file: str
    loc: str  # "line 3", "index 5", or "" for the whole file
    field: str | None
    message: str
    line: int | None = None  # 1-based line; derived from ``loc`` or looked up for array elements

    @property
    def lineno(self) -> int | None:
        if self.line is not None:
            return self.line
        if self.loc.startswith("line "):
            return int(self.loc.split()[1])
        if self.loc.startswith("index "):
            return array_element_line(self.file, int(self.loc.split()[1]))
        return None

    def __str__(self) -> str:
        n = self.lineno
        where = f"{self.file}:{n}" if n is not None else self.file
        if self.loc.startswith("row "):  # (a Parquet row: no line to jump to)
            where = f"{self.file} ({self.loc})"
        msg = self.message if len(self.message) <= 300 else self.message[:297] + "..."  # (a value quoted)
        return f"{where}: {self.field}: {msg}" if self.field else f"{where}: {msg}"


@lru_cache(maxsize=8)
def _array_element_lines(file: str, mtime_ns: int) -> tuple[int, ...]:
    """The 1-based line on which each element of a JSON-array file starts (one bounded pass)."""
    with open_input(file, "data file") as fh:
        if fh.read(3) != b"\xef\xbb\xbf":
            fh.seek(0)
        return tuple(line for i, line, _, _ in _ArrayElements(fh, file, lines=True) if i is not None)


def array_element_line(file: str, index: int) -> int | None:
    """Line where element ``index`` of the JSON array in ``file`` starts (None if unknown)."""
    try:
        lines = _array_element_lines(file, os.stat(file).st_mtime_ns)
    except (OSError, ValueError):
        return None
    return lines[index] if 0 <= index < len(lines) else None


class DataValidationError(ValueError):
    """Raised with every issue found; ``str()`` shows the first 20 and a count of the rest."""

    def __init__(self, issues: list[DataIssue]):
        self.issues = issues
        shown = "\n".join(f"  {i}" for i in issues[:MAX_ISSUES_SHOWN])
        more = len(issues) - MAX_ISSUES_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(issues)} data error(s):\n{shown}{tail}")


def issue_at(source: str, field: str | None, message: str) -> DataIssue:
    """A DataIssue for a record's ``source`` ("file:line N" or "file#i")."""
    if ":line " in source:
        file, _, n = source.rpartition(":line ")
        return DataIssue(file, f"line {n}", field, message)
    if ":row " in source:
        file, _, n = source.rpartition(":row ")
        return DataIssue(file, f"row {n}", field, message)
    file, _, i = source.rpartition("#")
    return DataIssue(file, f"index {i}", field, message)


# --------------------------------------------------------------------------- gold checks

def check_fields(row: dict, card=None) -> list[tuple[str, str]]:
    """(field, message) for every way ``row`` breaks the record rules of its task type: a
    question text, a known type and a metric that fits it, and a gold answer the type takes (an
    own task's type checks against its card: ``card``, or the card the row's ``task`` names)."""
    out: list[tuple[str, str]] = []
    inp = row.get("input_field")
    if not isinstance(inp, str):
        out.append(("input_field", f"must be a string, got {type(inp).__name__}"))
    elif not inp.strip():
        out.append(("input_field", "is empty"))
    tt, metric = row.get("task_type"), row.get("metric")
    if tt not in TASK_TYPES:
        out.append(("task_type", f"unknown task type {tt!r}; one of {', '.join(TASK_TYPES)}"))
        return out
    if metric not in METRICS:
        out.append(("metric", f"unknown metric {metric!r}; one of {', '.join(METRICS)}"))
        return out
    kind = output_for(tt, metric)
    if metric not in kind.metrics and not (metric == "bool" and tt == "multiple-choice"):
        out.append(("metric", f"metric {metric!r} does not apply to task type {tt!r}"))
        return out
    imc = row.get("is_multiple_choice")
    if imc is not None and (not isinstance(imc, bool) or imc != (tt == "multiple-choice")):
        out.append(("is_multiple_choice", f"is {imc!r} but task_type is {tt!r}"))
    return out + tasks.check_gold(row, card)


# --------------------------------------------------------------------------- raw rows
#
# Every data file is read bounded (shoptune._io): a regular file only (a FIFO, a device, a socket,
# a symlink loop: one issue naming it), row by row with each row (a JSON line, an array element,
# a CSV row) at most SHOPTUNE_MAX_ROW_BYTES (4 MiB), each row's JSON at most 64 levels deep with
# integers of at most 100 digits and no lone surrogate. A row past a bound is an issue naming
# file:line:field; the rows around it are read as usual.

_ARRAY_CHUNK = 1 << 20
_WS = re.compile(r"[ \t\r\n]*")


def _decode(raw: bytes, file: str, loc: str) -> tuple[str | None, DataIssue | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, DataIssue(file, loc, None, f"invalid UTF-8 at byte {e.start}")


def _row_issue(file: str, loc: str, e: Exception, line: int | None = None) -> DataIssue:
    """A DataIssue for a row that does not parse (``json.JSONDecodeError``) or breaks a bound."""
    if isinstance(e, JsonBoundsError):
        return DataIssue(file, loc, e.field, e.reason, line)
    return DataIssue(file, loc, None, f"invalid JSON: {e.msg} (column {e.colno})", line)


def _too_long(file: str, loc: str, line: int | None = None, rest: str = "") -> DataIssue:
    return DataIssue(file, loc, None, f"the row is {over_cap('one data row', ROW_CAP)}{rest}", line)


def _first_char(fh) -> bytes:
    """The first byte that is not blank (after a BOM), read in blocks (a file may start with
    any number of blank lines); b"" for a blank file. Leaves ``fh`` where it was."""
    at = fh.tell()
    while block := fh.read(_ARRAY_CHUNK):
        block = block.lstrip(b" \t\r\n")
        if block:
            fh.seek(at)
            return block[:1]
    fh.seek(at)
    return b""


def iter_raw(path: Path) -> Iterator[tuple[str, dict | None, DataIssue | None]]:
    """Yield (loc, row, issue) for each row of a JSON lines, JSON array or CSV file."""
    file = str(path)
    if path.suffix.lower() == ".parquet":
        yield from _iter_parquet(path)
        return
    try:
        fh = open_input(path, "data file")
    except InputError as e:
        yield "", None, DataIssue(file, "", None, e.reason)
        return
    except OSError as e:
        yield "", None, DataIssue(file, "", None, f"cannot open: {e.strerror}")
        return
    with fh:
        if fh.read(3) != b"\xef\xbb\xbf":
            fh.seek(0)
        first = _first_char(fh)
        if not first:
            yield "", None, DataIssue(file, "", None, "file is empty")
            return
        if path.suffix.lower() == ".csv":
            yield from _iter_csv(fh, file)
        elif first == b"[":
            for i, line, row, issue in _ArrayElements(fh, file):
                yield f"index {i}" if i is not None else "", row, issue
        else:
            yield from _iter_jsonl(fh, file)


def _iter_jsonl(fh, file: str):
    for n, raw in iter_lines(fh, ROW_CAP):
        loc = f"line {n}"
        if raw is None:
            yield loc, None, _too_long(file, loc)
            continue
        text, issue = _decode(raw, file, loc)
        if issue:
            yield loc, None, issue
            continue
        if not text.strip():
            continue
        try:
            row = json_loads(text)
        except (json.JSONDecodeError, JsonBoundsError) as e:
            yield loc, None, _row_issue(file, loc, e)
            continue
        if not isinstance(row, dict):
            yield loc, None, DataIssue(file, loc, None,
                                       f"expected a JSON object, got {type(row).__name__}")
            continue
        yield loc, row, None


class _Stop(Exception):
    """The array cannot be read on from here (one issue at ``line`` ends the file)."""

    def __init__(self, line: int, message: str):
        self.line, self.message = line, message


class _ArrayElements:
    """(index, line, row, issue) for each element of the JSON array in the binary file ``fh``
    (positioned at its first byte), parsed one element at a time from a buffer holding about
    one element, filled in 1 MiB blocks: a file of any size, never held whole. An element past a
    bound is an issue and is stepped over; a problem that leaves the array unreadable from there
    on (invalid JSON, an element longer than may be held) ends the file with one issue (index
    None). ``lines``: give each element's line (else only an issue's: counting costs)."""

    def __init__(self, fh, file: str, lines: bool = False):
        self.fh, self.file, self.limit, self.lines = fh, file, byte_cap(ROW_CAP), lines
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof, self.bytes_read = "", 0, False, 0
        self.line_at, self.line_pos = 1, 0  # the line number at buffer offset line_pos

    def line_of(self, p: int) -> int:
        """The line of buffer offset ``p`` (at or after every offset asked before)."""
        self.line_at += self.buf.count("\n", self.line_pos, p)
        self.line_pos = p
        return self.line_at

    def more(self) -> None:
        """The next block onto the buffer (what was parsed dropped); at the end: ``eof``."""
        if self.eof:
            return
        block = self.fh.read(_ARRAY_CHUNK)
        self.eof = not block
        try:
            text = self.decoder.decode(block, final=self.eof)
        except UnicodeDecodeError as e:
            raise _Stop(self.line_of(len(self.buf)) + block[:e.start].count(b"\n"),
                        f"invalid UTF-8 at byte {self.bytes_read + e.start}") from None
        self.bytes_read += len(block)
        self.line_of(self.pos)
        self.buf, self.pos, self.line_pos = self.buf[self.pos:] + text, 0, 0

    def skip_blanks(self) -> str:
        """Past blanks (reading on); the next character, "" at the end."""
        while True:
            if self.pos < len(self.buf) and self.buf[self.pos] not in " \t\r\n":
                return self.buf[self.pos]
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.more()

    def element(self, i: int) -> tuple[Any, DataIssue | None, int]:
        """(row, issue or None, end) of the element at ``pos``, reading on until it parses with
        text after it (or the file ends)."""
        at = f"index {i}"
        while True:
            try:
                row, end = json_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    if end - self.pos > self.limit:  # whole in the buffer, still too long
                        return None, _too_long(self.file, at, self.line_of(self.pos)), end
                    return row, None, end
            except JsonBoundsError as e:  # (too deep to parse: stepped over by its brackets)
                end = json_value_end(self.buf, self.pos)
                if end is not None:
                    return None, DataIssue(self.file, at, e.field, e.reason, self.line_of(self.pos)), end
                if self.eof:
                    raise _Stop(self.line_of(self.pos), "invalid JSON: the array is not closed") from None
            except json.JSONDecodeError as e:
                if self.eof:
                    raise _Stop(self.line_of(e.pos), f"invalid JSON: {e.msg} (column {e.colno})") from None
            if len(self.buf) - self.pos > self.limit:
                raise _Stop(self.line_of(self.pos), f"element {i}: {over_cap('one data row', ROW_CAP)}; "
                                                    "the rest of the file is not read")
            self.more()

    def __iter__(self):
        try:
            self.skip_blanks()
            self.pos += 1  # the "["
            i, nxt = 0, self.skip_blanks()
            while nxt != "]":
                start = self.line_of(self.pos) if self.lines else None
                row, issue, end = self.element(i)
                if issue is None and not isinstance(row, dict):
                    issue = DataIssue(self.file, f"index {i}", None,
                                      f"expected a JSON object, got {type(row).__name__}",
                                      self.line_of(self.pos))
                yield i, start, (None if issue else row), issue
                self.pos, i = end, i + 1
                nxt = self.skip_blanks()
                if nxt == ",":
                    self.pos += 1
                    nxt = self.skip_blanks()
                    if nxt == "]":
                        raise _Stop(self.line_of(self.pos), "invalid JSON: a trailing ',' before ']'")
                elif nxt != "]":
                    raise _Stop(self.line_of(self.pos), "invalid JSON: expected ',' or ']' after an "
                                "element" if nxt else "invalid JSON: the array is not closed")
            self.pos += 1
            if self.skip_blanks():
                raise _Stop(self.line_of(self.pos), "invalid JSON: extra data after the array")
        except _Stop as e:
            yield None, e.line, None, DataIssue(self.file, f"line {e.line}", None, e.message)


def _iter_parquet(path: Path):
    """Rows of a Parquet file (pyarrow), a record batch at a time; rows are named ``row N``
    (1-based)."""
    file = str(path)
    try:
        open_input(path, "data file").close()  # (a regular file: never a FIFO or a device)
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
    except InputError as e:
        yield "", None, DataIssue(file, "", None, e.reason)
        return
    except ImportError:
        yield "", None, DataIssue(file, "", None, "reading Parquet needs pyarrow (`pip install pyarrow`)")
        return
    except Exception as e:  # pyarrow raises its own error types for a broken file
        yield "", None, DataIssue(file, "", None, f"not a readable Parquet file: {e}")
        return
    n, limit = 0, byte_cap(ROW_CAP)
    try:
        for batch in pf.iter_batches(batch_size=64):
            for row in batch.to_pylist():
                n += 1
                size = sum(len(v) for v in row.values() if isinstance(v, (str, bytes)))
                if size > limit:
                    yield f"row {n}", None, DataIssue(file, f"row {n}", None,
                                                      f"the row is {over_cap('one data row', ROW_CAP)}")
                else:
                    yield f"row {n}", row, None
    except Exception as e:  # noqa: BLE001 - pyarrow's own errors for a damaged file
        yield f"row {n + 1}", None, DataIssue(file, f"row {n + 1}", None, f"not a readable Parquet row: {e}")


def _csv_value(key: str, value: str) -> Any:
    """A CSV cell as the value it stands for (``output_field``: JSON or a Python literal when it
    looks like one; ``is_multiple_choice``: a bool). :class:`JsonBoundsError` for a value past
    the bounds of a JSON row (depth, integer digits, lone surrogates)."""
    if key == "output_field":
        v = value.strip()
        if v[:1] in "[{\"" or re.fullmatch(r"-?\d+", v):
            try:
                return json_loads(v)
            except json.JSONDecodeError:
                try:
                    parsed = ast.literal_eval(v)
                except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                    return value
                problem = bounds_problem(parsed)
                if problem is not None:
                    raise problem
                return parsed
        return value
    if key == "is_multiple_choice":
        return {"true": True, "false": False, "1": True, "0": False}.get(value.strip().lower(), value)
    return value


class _CsvRowTooLong(Exception):
    pass


def _csv_lines(fh, file: str, taken: list[int], limit: int):
    """The CSV file's lines, decoded, for :mod:`csv`; ``taken[0]`` counts the bytes of the row
    being read (the caller resets it per row). A row past ``limit`` (one long line or a quoted
    field over many): :class:`_CsvRowTooLong`; bad UTF-8: ``UnicodeDecodeError``."""
    for _, raw in iter_lines(fh, ROW_CAP):
        if raw is None:
            raise _CsvRowTooLong
        taken[0] += len(raw)
        if taken[0] > limit:
            raise _CsvRowTooLong
        yield raw.decode("utf-8")


def _iter_csv(fh, file: str):
    limit = byte_cap(ROW_CAP)
    if csv.field_size_limit() < limit:  # a field may be as long as a row (csv's default: 128 KiB)
        csv.field_size_limit(limit)
    taken = [0]
    reader = csv.DictReader(_csv_lines(fh, file, taken, limit))
    try:
        for row in reader:
            taken[0] = 0
            loc = f"line {reader.line_num}"
            if None in row:
                yield loc, None, DataIssue(file, loc, None, "more values than header columns")
                continue
            yield loc, {k: v or "" for k, v in row.items()}, None
    except UnicodeDecodeError as e:
        loc = f"line {reader.line_num + 1}"
        yield loc, None, DataIssue(file, loc, None, f"invalid UTF-8 at byte {e.start} of the line")
    except _CsvRowTooLong:
        loc = f"line {reader.line_num + 1}"
        yield loc, None, _too_long(file, loc, rest="; the rest of the file is not read")
    except csv.Error as e:
        yield f"line {reader.line_num}", None, DataIssue(file, f"line {reader.line_num}", None,
                                                         f"bad CSV: {e}")


# --------------------------------------------------------------------------- layouts

def _ec_guide_rel(path: Path) -> str | None:
    if path.parent.name in EC_GUIDE_FOLDERS:
        rel = f"{path.parent.name}/{path.name}"
        if tasks.cards_for_file("ec-guide", rel):
            return rel
    return None


_CAPABILITY_WORDS = (("concept", "concept_understanding"), ("reasoning", "knowledge_reasoning"),
                     ("behavior", "user_behavior_alignment"), ("behaviour", "user_behavior_alignment"),
                     ("lingual", "multilingual"))


def _capability_from_path(path: Path) -> str | None:
    for part in reversed(path.parts[:-1]):
        low = part.lower()
        for word, cap in _CAPABILITY_WORDS:
            if word in low:
                return cap
    return None


def _source(file: str, loc: str) -> str:
    return f"{file}:{loc}" if loc.startswith(("line", "row")) else f"{file}#{loc.split()[-1]}"


def _card_of(row: dict, path: Path, loc: str, task: str | None):
    """(the row's task card or None, or a DataIssue): ``--task``, then the card of an EC-Guide
    file, then an own card whose ``source.files`` name this file, then the row's own
    ``task_name`` (ShopBench's, or a card's name) or ``task`` column."""
    file = str(path)
    if task:
        return tasks.get_card(task), None
    if (rel := _ec_guide_rel(path)) is not None:
        cands = tasks.cards_for_file("ec-guide", rel)
        if len(cands) == 1:
            return cands[0], None
        for c in cands:
            if ((c.source.task_type is None or c.source.task_type == row.get("task_type"))
                    and (c.source.metric is None or c.source.metric == row.get("metric"))):
                return c, None
        return None, DataIssue(file, loc, "task_type/metric", f"{row.get('task_type')!r}/"
                               f"{row.get('metric')!r} matches no task card of {rel}")
    named = next((k for k in ("task", "task_name") if isinstance(row.get(k), str) and row[k]), None)
    own = tasks.cards_for_own_file(path)
    if len(own) == 1 or (own and named is None):
        return own[0], None
    if named == "task_name":
        card = tasks.card_for_shopbench_task(row["task_name"]) or tasks.find_card(row["task_name"])
    elif named == "task":
        card = tasks.find_card(row["task"])
    else:
        return None, None
    if card is None and own:
        return None, DataIssue(file, loc, named, f"{row[named]!r} is none of the tasks reading this "
                               f"file ({', '.join(c.name for c in own)})")
    return card, None


def _own_row(card, row: dict, path: Path, loc: str,
             mapping: dict[str, str] | None) -> tuple[Record | None, list[DataIssue]]:
    """A row of an own task's file, read through its card: each input from its column (the
    card's ``source.columns``, ``--map`` over them), the gold from the ``output`` column, coerced
    and checked by the output type. Rows shoptune wrote (``inputs`` + ``output_field``) read back
    as they are."""
    file, out = str(path), card.output_type
    if isinstance(row.get("inputs"), dict) and "output_field" in row:
        inputs, gold_col = row["inputs"], "output_field"
        cols = {i.name: i.name for i in card.input_fields}
        values = inputs
    else:
        cols = {i.name: (mapping or {}).get(i.name) or card.column(i.name) for i in card.input_fields}
        gold_col = (mapping or {}).get("output") or card.column("output")
        values = row
    issues = [DataIssue(file, loc, col, "missing column" if col not in values else "is empty")
              for name, col in cols.items()
              if col not in values or values[col] is None or (isinstance(values[col], str) and not values[col].strip())]
    gold_src = row if gold_col == "output_field" else values
    if gold_col not in gold_src:
        issues.append(DataIssue(file, loc, gold_col, "missing column (the answer)"))
    if issues:
        return None, issues
    inputs = {}
    for f in card.input_fields:
        v = values[cols[f.name]]
        try:
            inputs[f.name] = _input_value(v, f.type, path.suffix.lower() == ".csv")
        except ValueError as e:
            issues.append(DataIssue(file, loc, cols[f.name], str(e)))
    try:
        gold = out.coerce(gold_src[gold_col], card)
    except GoldError as e:
        issues.append(DataIssue(file, loc, gold_col, str(e)))
    if issues:
        return None, issues
    rid = row.get("id")
    rec = card.record(inputs, gold, source=_source(file, loc), id=str(rid) if rid not in (None, "") else "")
    if rid not in (None, ""):
        rec.extra["id_given"] = True
    found = [DataIssue(file, loc, gold_col if f == "output_field" else f, m)
             for f, m in check_fields(rec.to_dict(), card)]
    return rec, found


def _input_value(v: Any, kind: str, csv_text: bool) -> Any:
    """A cell as an input of ``kind`` (CSV cells are text: numbers and lists are read from it)."""
    if kind == "string":
        if isinstance(v, (dict, list)):
            raise ValueError(f"expected text, got {type(v).__name__}")
        return v if isinstance(v, str) else json.dumps(v)
    if kind == "array":
        if isinstance(v, str) and csv_text:
            v = json.loads(v) if v.strip().startswith("[") else [x.strip() for x in v.split("|") if x.strip()]
        if not isinstance(v, list):
            raise ValueError(f"expected a list, got {type(v).__name__}")
        return v
    if kind == "boolean":
        if isinstance(v, str):
            b = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}.get(v.strip().lower())
            if b is None:
                raise ValueError(f"expected true/false, got {v[:40]!r}")
            return b
        if not isinstance(v, bool):
            raise ValueError(f"expected true/false, got {v!r}")
        return v
    try:  # number, integer
        x = v if isinstance(v, (int, float)) and not isinstance(v, bool) else (
            int(v) if kind == "integer" else float(v))
    except (TypeError, ValueError):
        raise ValueError(f"expected {'an integer' if kind == 'integer' else 'a number'}, "
                         f"got {str(v)[:40]!r}") from None
    if kind == "integer" and not float(x).is_integer():
        raise ValueError(f"expected an integer, got {x!r}")
    return int(x) if kind == "integer" else x


def _tag_row(row: dict, path: Path, loc: str, *, task: str | None,
             mapping: dict[str, str] | None) -> tuple[Record | None, list[DataIssue]]:
    """Turn a raw row into a tagged Record (task, capability, source), or issues."""
    file = str(path)
    card, problem = _card_of(row, path, loc, task)
    if problem:
        return None, [problem]
    if card is not None and card.own:
        return _own_row(card, row, path, loc, mapping)
    if mapping:
        row = {**row, **{dst: row[src] for dst, src in mapping.items() if src in row}}
        missing = [src for src in mapping.values() if src not in row]
        if missing:
            return None, [DataIssue(file, loc, m, "mapped column is missing") for m in missing]
    if path.suffix.lower() == ".csv":  # CSV cells are text: decode gold and flags after mapping
        try:
            row = {k: _csv_value(k, v) if isinstance(v, str) else v for k, v in row.items()}
        except JsonBoundsError as e:
            return None, [DataIssue(file, loc, "output_field", e.reason)]
    missing = [key for key in ("input_field", "output_field") if key not in row]
    if missing:  # every problem of the row, not only the first missing key
        found = [DataIssue(file, loc, key, "missing") for key in missing]
        if "input_field" in row and not isinstance(row["input_field"], str):
            found.insert(0, DataIssue(file, loc, "input_field",
                                      f"must be a string, got {type(row['input_field']).__name__}"))
        return None, found
    if card is not None and not task and isinstance(row.get("task"), str) and row["task"] == card.name:
        # rows written by shoptune (split, mix, derive, synth) name their card
        for key in ("task_type", "metric"):
            if row.get(key) not in (None, getattr(card, key)):
                return None, [DataIssue(file, loc, key, f"{row[key]!r} but task card {card.name!r} "
                                        f"says {getattr(card, key)!r}")]
    row.setdefault("task_type", card.task_type if card else None)
    row.setdefault("metric", card.metric if card else None)
    if card:
        name, capability = card.name, card.capability
    else:
        stem = path.stem.removesuffix("_dataset")
        raw_name = row.get("task_name") or row.get("task") or stem
        name = re.sub(r"[^a-z0-9_]+", "_", str(raw_name).lower()).strip("_")
        capability = (TRACK_TO_CAPABILITY.get(row.get("track") or "") or row.get("capability")
                      or _capability_from_path(path))
        if capability not in CAPABILITIES:
            named = next((k for k in ("task", "task_name") if isinstance(row.get(k), str) and row[k]), None)
            if named:
                return None, [DataIssue(file, loc, named, f"{row[named]!r} names no task card "
                                        "(`shoptune tasks ls` lists them; `shoptune tasks new` makes "
                                        "one), and the row has no track or capability column")]
            return None, [DataIssue(file, loc, "track", "cannot tell the capability: give a ShopBench "
                                    "track, a capability column, or a task card (--task)")]
    issues = [DataIssue(file, loc, f, m) for f, m in check_fields(row, card)]
    try:
        rec = Record(
            input_field=row["input_field"], output_field=row["output_field"],
            task_type=row["task_type"], metric=row["metric"], task=name, capability=capability,
            source=_source(file, loc),
            id=str(row["id"]) if row.get("id") not in (None, "") else "",
            is_multiple_choice=row["task_type"] == "multiple-choice",
            task_name=row.get("task_name"), track=row.get("track"),
            extra={"id_given": True} if row.get("id") not in (None, "") else {},
        )
    except TypeError as e:  # unhashable/odd types: already reported by check_fields
        return None, issues or [DataIssue(file, loc, None, str(e))]
    return rec, issues


def data_files(path: Path) -> list[Path]:
    """The data files under ``path`` (itself unless a folder: a FIFO, a device, a symlink loop
    is then refused by its reader, not taken for an empty folder), sorted; skips licences and
    READMEs. In a folder, every entry with a data suffix that is not a folder counts (the reader
    names one that is not a regular file)."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in DATA_SUFFIXES
                  and not p.name.startswith(".") and not p.is_dir())


def source_files(source: str | os.PathLike) -> tuple[list[Path], str | None]:
    """The data files a source names, and the task they are read as: a file or folder (its data
    files; task None), else a task whose card names its own ``source.files`` (those files, read
    through the card). FileNotFoundError names the source."""
    from shoptune.paths import resolve_data_path
    try:
        return data_files(resolve_data_path(source)), None
    except FileNotFoundError:
        card = tasks.find_card(str(source))
        if card is None or not card.source.files:
            raise
        return card.source_files(), card.name


def source_digest(source: str | os.PathLike) -> str:
    """A data source's content digest (16 hex): a file's or a folder's files' names and bytes;
    for an own task's name, those of the files its card names."""
    import hashlib

    from shoptune._io import hash_file
    from shoptune.paths import resolve_data_path
    try:
        root = resolve_data_path(source)
        files = sorted(x for x in root.rglob("*") if x.is_file()) if root.is_dir() else [root]
    except FileNotFoundError:
        files, _ = source_files(source)
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        hash_file(h, f, "data file")
    return h.hexdigest()[:16]


def own_task_files(sources) -> list[Path]:
    """The files of the sources that are own tasks' names (their cards' ``source.files``): inputs
    an output must keep clear of, as the paths among the sources are."""
    out = []
    for s in sources or ():
        card = tasks.find_card(str(s))
        if card is not None and card.source.files and not Path(s).exists():
            out += card.source_files()
    return out


def iter_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                 task: str | None = None, mapping: dict[str, str] | None = None,
                 check: bool = True, issues: list[DataIssue] | None = None,
                 card=None) -> Iterator[Record]:
    """Stream records from files or folders, or from a task's own files (a task name whose card
    names them).

    ``check``: drop rows that break the record rules (gold shape, metric...). Issues go to the
    ``issues`` list when given; otherwise the first one raises :class:`DataValidationError`.
    With ``check=False`` only unreadable rows are dropped (for statistics over raw files).
    ``card``: read every row through this card (one not registered yet: ``tasks new``).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]

    def report(found: list[DataIssue]) -> None:
        if issues is None:
            raise DataValidationError(found)
        issues.extend(found)

    for p in paths:
        files, own_task = source_files(p)
        if not files:
            report([DataIssue(str(p), "", None, "no .json/.jsonl/.csv/.parquet data files here")])
        for f in files:
            if own_task is not None and not os.path.lexists(f):
                report([DataIssue(str(f), "", None, f"no such file (named by task {own_task}'s card)")])
                continue
            for loc, row, issue in iter_raw(f):
                if issue:
                    report([issue])
                    continue
                if card is not None and card.own:
                    rec, found = _own_row(card, row, f, loc, mapping)
                else:
                    rec, found = _tag_row(row, f, loc, task=task or own_task, mapping=mapping)
                if rec is None:
                    report(found)
                    continue
                if found and check:
                    report(found)
                    continue
                yield rec


ON_INVALID = ("skip", "fail")


def load_valid(paths, *, on_invalid: str = "skip", task: str | None = None,
               mapping: dict[str, str] | None = None) -> tuple[list[Record], list[DataIssue]]:
    """Every valid record and the issues of the rows left out. ``on_invalid``: ``skip`` (the
    default of every data command and of training) or ``fail`` (:class:`DataValidationError`
    listing every problem)."""
    if on_invalid not in ON_INVALID:
        raise ValueError(f"on_invalid {on_invalid!r}: one of {', '.join(ON_INVALID)}")
    issues: list[DataIssue] = []
    recs = list(iter_records(paths, task=task, mapping=mapping, issues=issues))
    if issues and on_invalid == "fail":
        raise DataValidationError(issues)
    return recs, issues


def skipped_line(issues: list[DataIssue]) -> str:
    """The one line every command prints about the rows it skipped (also when none)."""
    if not issues:
        return "invalid rows skipped: 0"
    rows = len({(i.file, i.loc) for i in issues})  # (a row may break several rules)
    return (f"invalid rows skipped: {rows} (first: {issues[0]}; `shoptune data validate` "
            f"lists them, --on-invalid fail stops on them)")


def load_records(paths, *, task: str | None = None, mapping: dict[str, str] | None = None,
                 check: bool = True) -> list[Record]:
    """Load every record; raise :class:`DataValidationError` listing all problems, if any."""
    issues: list[DataIssue] = []
    recs = list(iter_records(paths, task=task, mapping=mapping, check=check, issues=issues))
    if issues:
        raise DataValidationError(issues)
    return recs
