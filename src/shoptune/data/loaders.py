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

DATA_SUFFIXES = (".json", ".jsonl", ".csv")
EC_GUIDE_FOLDERS = ("Generation", "MCQ", "NER", "Retrieval")
MAX_ISSUES_SHOWN = 20

# Which metrics belong to which task type.
METRIC_TASK_TYPE = {
    "accuracy": "multiple-choice", "bool": "multiple-choice", "hit rate@3": "retrieval",
    "ndcg": "ranking", "micro f1": "named_entity_recognition", "rougel": "generation",
    "sent-transformer": "generation", "multilingual-sent-transformer": "generation",
    "bleu": "generation", "jp-bleu": "generation",
}
_OPTION_RE = re.compile(r"^\s*(\d+)\.\s", re.MULTILINE)


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
    file, _, i = source.rpartition("#")
    return DataIssue(file, f"index {i}", field, message)


# --------------------------------------------------------------------------- gold checks

def option_numbers(input_field: str) -> list[int]:
    """Option numbers of a multiple-choice prompt ("0. foo" lines), in order.

    ShopBench options are numbered from 0; numbered lines that do not start at 0 (a review
    quoting "1. ... 2. ...") are not options.
    """
    nums = [int(m) for m in _OPTION_RE.findall(input_field)]
    return nums if nums and 0 in nums else []


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_fields(row: dict) -> list[tuple[str, str]]:
    """(field, message) for every way ``row`` breaks the record rules of its task type."""
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
    if METRIC_TASK_TYPE[metric] != tt:
        out.append(("metric", f"metric {metric!r} does not apply to task type {tt!r}"))
        return out
    imc = row.get("is_multiple_choice")
    if imc is not None and (not isinstance(imc, bool) or imc != (tt == "multiple-choice")):
        out.append(("is_multiple_choice", f"is {imc!r} but task_type is {tt!r}"))
    gold = row.get("output_field")
    if tt == "multiple-choice" and metric == "bool":
        if not (isinstance(gold, str) and gold.strip().lower() in ("yes", "no")):
            out.append(("output_field", f"bool metric needs 'yes' or 'no', got {gold!r}"))
    elif tt == "multiple-choice":
        if not _is_int(gold):
            out.append(("output_field", f"multiple choice needs an int option, got "
                                        f"{type(gold).__name__} {gold!r}"))
        elif isinstance(inp, str):
            opts = option_numbers(inp)
            if opts and gold not in opts:
                listed = sorted(set(opts))
                if listed == list(range(listed[0], listed[-1] + 1)):
                    out.append(("output_field", f"option index {gold} out of range "
                                                f"(options {listed[0]}-{listed[-1]})"))
                else:  # labelled with a gap (0, 1, 3): say which labels exist
                    out.append(("output_field", f"option index {gold} is not one of the listed "
                                                f"options ({', '.join(map(str, listed))})"))
            elif not opts and not 0 <= gold <= 9:
                out.append(("output_field", f"answer {gold} is not a single digit"))
    elif tt == "retrieval":
        if not (isinstance(gold, list) and gold and all(_is_int(g) and g >= 0 for g in gold)):
            out.append(("output_field", f"retrieval needs a non-empty list of ints >= 0, got {gold!r}"))
        elif len(set(gold)) != len(gold):
            out.append(("output_field", f"retrieval gold has duplicates: {gold!r}"))
    elif tt == "ranking":
        if not (isinstance(gold, list) and gold and all(
                isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0 for g in gold)):
            out.append(("output_field", f"ranking needs a non-empty list of relevance weights "
                                        f">= 0, got {gold!r}"))
    elif tt == "named_entity_recognition":
        if not (isinstance(gold, list) and all(isinstance(g, str) for g in gold)):
            out.append(("output_field", f"NER needs a list of strings, got {gold!r}"))
    elif tt == "generation":
        if not isinstance(gold, str):
            out.append(("output_field", f"generation needs a string, got {type(gold).__name__}"))
        elif not gold.strip():
            out.append(("output_field", "is empty"))
    return out


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


def _tag_row(row: dict, path: Path, loc: str, *, task: str | None,
             mapping: dict[str, str] | None) -> tuple[Record | None, list[DataIssue]]:
    """Turn a raw row into a tagged Record (task, capability, source), or issues."""
    file = str(path)
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
    card = None
    if task:
        card = tasks.get_card(task)
    elif (rel := _ec_guide_rel(path)) is not None:
        cands = tasks.cards_for_file("ec-guide", rel)
        if len(cands) == 1:
            card = cands[0]
        else:
            for c in cands:
                if ((c.source.task_type is None or c.source.task_type == row.get("task_type"))
                        and (c.source.metric is None or c.source.metric == row.get("metric"))):
                    card = c
                    break
            if card is None:
                return None, [DataIssue(file, loc, "task_type/metric",
                                        f"{row.get('task_type')!r}/{row.get('metric')!r} matches "
                                        f"no task card of {rel}")]
    elif isinstance(row.get("task_name"), str):
        card = tasks.card_for_shopbench_task(row["task_name"])
    elif isinstance(row.get("task"), str) and (card := tasks.find_card(row["task"])) is not None:
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
            return None, [DataIssue(file, loc, "track", "cannot tell the capability: give a ShopBench "
                                    "track, a capability column, or a task card (--task)")]
    issues = [DataIssue(file, loc, f, m) for f, m in check_fields(row)]
    try:
        rec = Record(
            input_field=row["input_field"], output_field=row["output_field"],
            task_type=row["task_type"], metric=row["metric"], task=name, capability=capability,
            source=f"{file}:{loc}" if loc.startswith("line") else f"{file}#{loc.split()[-1]}",
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


def iter_records(paths: str | os.PathLike | Iterable[str | os.PathLike], *,
                 task: str | None = None, mapping: dict[str, str] | None = None,
                 check: bool = True, issues: list[DataIssue] | None = None) -> Iterator[Record]:
    """Stream records from files or folders.

    ``check``: drop rows that break the record rules (gold shape, metric...). Issues go to the
    ``issues`` list when given; otherwise the first one raises :class:`DataValidationError`.
    With ``check=False`` only unreadable rows are dropped (for statistics over raw files).
    """
    from shoptune.paths import resolve_data_path

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]

    def report(found: list[DataIssue]) -> None:
        if issues is None:
            raise DataValidationError(found)
        issues.extend(found)

    for p in paths:
        root = resolve_data_path(p)
        files = data_files(root)
        if not files:
            report([DataIssue(str(root), "", None, "no .json/.jsonl/.csv data files here")])
        for f in files:
            for loc, row, issue in iter_raw(f):
                if issue:
                    report([issue])
                    continue
                rec, found = _tag_row(row, f, loc, task=task, mapping=mapping)
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
