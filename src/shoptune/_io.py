"""File helpers: bounded reads of inputs, atomic writes of outputs.

Reads (:func:`open_input`, :func:`read_input`): regular files only (a FIFO, a device such as
``/dev/zero`` or a socket is refused in one line instead of blocking or being read forever; a
symlink loop is named as one) and, for whole-file reads, a size cap (configs: 1 MiB,
``SHOPTUNE_MAX_CONFIG_BYTES`` raises it). Data rows are bounded one by one in
:mod:`shoptune.data.loaders` (``SHOPTUNE_MAX_ROW_BYTES``).

Writes: a file is written to a temp file beside the target, fsynced, then renamed; a folder
(:func:`output_dir`) is written into a new temporary sibling and renamed into place.

**No command deletes or overwrites what it did not write.** Every folder a command writes
carries a marker (``.shoptune-output.json``: the command and the names it wrote). An existing
non-empty ``--out`` is refused unless the command was given ``--overwrite``, and even then only
a folder the marker shows the same command wrote (nothing else in it) is replaced; an ``--out``
that is, contains or is inside an input is always refused; a failure leaves nothing behind.

Files and folders made here get the permissions a plain ``open`` / ``mkdir`` would give
(``0o666`` / ``0o777`` less the umask; a replaced file keeps its mode), not the private
``0o600`` / ``0o700`` of :mod:`tempfile`. A target that cannot be written raises an
:class:`OSError` naming the target (not the temp file)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

MiB = 1024 * 1024
CONFIG_CAP = ("SHOPTUNE_MAX_CONFIG_BYTES", 1 * MiB)  # a config is a few KB
ROW_CAP = ("SHOPTUNE_MAX_ROW_BYTES", 4 * MiB)        # one data row (a JSON line, array element, CSV row)
JSON_CAP = ("SHOPTUNE_MAX_JSON_BYTES", 64 * MiB)     # a run's own JSON file (scores.json, ...)


class InputError(ValueError):
    """An input that cannot be read as one: not a regular file, too large, a symlink loop.
    ``str()`` is one line, ``PATH: reason``."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


def byte_cap(cap: tuple[str, int]) -> int:
    """The cap ``(ENV_VAR, default)`` in bytes: the variable when set (``10000000``, ``64MiB``,
    ``2GB``), else the default."""
    env, default = cap
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    m = re.fullmatch(r"(\d+)\s*([kmg]i?b?)?", raw.lower())
    if not m:
        raise InputError(env, f"{raw!r} is not a size in bytes (e.g. 16000000 or 64MiB)")
    unit = (m.group(2) or "").rstrip("b")
    mult = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "ki": 1024, "mi": MiB, "gi": 1024 ** 3}[unit]
    return int(m.group(1)) * mult


def size_text(n: int) -> str:
    """``1 MiB``, ``64 MiB``, ``1.5 GiB``, ``500 bytes``."""
    for unit, size in (("GiB", 1024 ** 3), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def over_cap(what: str, cap: tuple[str, int]) -> str:
    """Why an input over its cap is refused, naming the variable that raises it."""
    return f"larger than {size_text(byte_cap(cap))}, the limit for {what} ({cap[0]} raises it)"


_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path, mode: int, what: str) -> OSError | InputError:
    if stat.S_ISDIR(mode):
        return IsADirectoryError(errno.EISDIR, f"is a folder (a {what} is wanted here)", str(path))
    kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
    return InputError(path, f"{kind}, not a regular file; a {what} is read from a regular file only")


def open_input(path: str | os.PathLike, what: str = "file") -> BinaryIO:
    """``path`` opened for reading (binary) if it is a regular file. A FIFO, device or socket:
    :class:`InputError` (never opened, so nothing blocks); a symlink loop or a broken symlink:
    :class:`InputError` saying so; a folder: IsADirectoryError; missing: FileNotFoundError."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(p, "a symlink loop (too many levels of symbolic links)") from None
        if e.errno == errno.ENOENT and os.path.islink(p):
            raise InputError(p, f"a broken symlink (to {os.readlink(p)}, which does not exist)") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, st.st_mode, what)
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between the stat and the open
        os.close(fd)
        raise _not_regular(p, mode, what)
    return os.fdopen(fd, "rb")


def read_input(path: str | os.PathLike, what: str = "file", cap: tuple[str, int] = CONFIG_CAP) -> bytes:
    """The bytes of the regular file ``path`` (:func:`open_input`), at most ``cap``
    (``(ENV_VAR, default)``): a larger file is :class:`InputError` before it is read whole."""
    limit = byte_cap(cap)
    with open_input(path, what) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InputError(path, over_cap(f"a {what}", cap))
    return data


def read_input_text(path: str | os.PathLike, what: str = "file", cap: tuple[str, int] = CONFIG_CAP) -> str:
    """:func:`read_input` decoded as UTF-8 (a BOM dropped); :class:`InputError` naming the byte
    that is not UTF-8."""
    data = read_input(path, what, cap)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 text (byte {e.start})") from None


def hash_file(h, path: str | os.PathLike, what: str = "file") -> None:
    """Feed the regular file ``path`` into the hash ``h`` in 1 MiB blocks (never whole)."""
    with open_input(path, what) as fh:
        while block := fh.read(MiB):
            h.update(block)


# ----------------------------------------------------------------------------- bounded JSON

MAX_JSON_DEPTH = 64   # nesting levels of one JSON value (a data row, a run's scores.json)
MAX_INT_DIGITS = 100  # digits of one JSON integer (Python refuses to convert past 4,300)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class JsonBoundsError(ValueError):
    """A JSON value that parses but breaks a bound: nested deeper than :data:`MAX_JSON_DEPTH`,
    an integer of more than :data:`MAX_INT_DIGITS` digits, a lone surrogate (``\\ud800``, not
    Unicode text: it cannot be written back as UTF-8). ``field``: the top-level key it sits
    under (None for the value itself)."""

    def __init__(self, field: str | None, reason: str):
        self.field, self.reason = field, reason
        super().__init__(f"{field}: {reason}" if field else reason)


class _LongInt:
    """Stands for an integer past :data:`MAX_INT_DIGITS` while parsing (never converted)."""

    def __init__(self, digits: int):
        self.digits = digits


_long_ints_seen = [0]  # how many _LongInt were made (tells a parse it made one; only ever grows)


def _parse_int(text: str):
    if len(text) <= MAX_INT_DIGITS or len(text.lstrip("-")) <= MAX_INT_DIGITS:
        return int(text)
    _long_ints_seen[0] += 1
    return _LongInt(len(text.lstrip("-")))


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _shown_key(key) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode("utf-8")[:80]


def _deep_key(text: str, start: int) -> str | None:
    """The top-level key under which the JSON object at ``text[start:]`` nests past the limit."""
    depth, last = 0, None
    for m in _TOKEN.finditer(text, start):
        tok = m.group()
        if tok[0] == '"':
            if depth == 1:
                last = tok
        elif tok in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH + 1:
                try:
                    return _shown_key(json.loads(last)) if last else None
                except ValueError:
                    return None
        else:
            depth -= 1
            if depth <= 0:
                return None
    return None


def json_value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array at ``text[start]`` ends (by its brackets, strings
    skipped), or None if it does not end within ``text``: how a reader steps over a value too
    deep to parse."""
    depth = 0
    for m in _TOKEN.finditer(text, start):
        tok = m.group()
        if tok[0] == '"':
            continue
        depth += 1 if tok in "[{" else -1
        if depth == 0:
            return m.end()
    return None


def bounds_problem(value) -> JsonBoundsError | None:
    """The first bound ``value`` (a parsed JSON value) breaks, walking it without recursion."""
    stack = [(value, 0, None)]
    while stack:
        v, depth, top = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return JsonBoundsError(top, f"nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(v, _LongInt):
            return JsonBoundsError(top, f"an integer of {v.digits} digits (at most {MAX_INT_DIGITS})")
        if isinstance(v, str):
            if _SURROGATE.search(v):
                return JsonBoundsError(top, "a lone surrogate (e.g. \\ud800) in a string: not "
                                            "Unicode text")
        elif isinstance(v, dict):
            for k, x in v.items():
                here = _shown_key(k) if top is None and depth == 0 else top
                if _SURROGATE.search(k):
                    return JsonBoundsError(here, "a lone surrogate (e.g. \\ud800) in a key: not "
                                                 "Unicode text")
                stack.append((x, depth + 1, here))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, top) for x in v)
    return None


def json_decode(text: str, start: int = 0) -> tuple[object, int]:
    """``json.JSONDecoder.raw_decode`` with the bounds: the value starting at ``text[start]``
    and where it ends. Raises ``json.JSONDecodeError`` as json does, :class:`JsonBoundsError`
    for a value past a bound (also one too deep for the parser's recursion)."""
    seen = _long_ints_seen[0]
    try:
        value, end = _DECODER.raw_decode(text, start)
    except RecursionError:
        raise JsonBoundsError(_deep_key(text, start), f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if (_long_ints_seen[0] != seen or _SURROGATE_ESCAPE.search(text, start, end)
            or text.count("[", start, end) + text.count("{", start, end) > MAX_JSON_DEPTH):
        problem = bounds_problem(value)
        if problem is not None:
            raise problem
    return value, end


def json_loads(text: str):
    """``json.loads`` with the bounds of :func:`json_decode` (whitespace around the value)."""
    start = len(text) - len(text.lstrip())
    value, end = json_decode(text, start)
    if text[end:].strip():
        raise json.JSONDecodeError("Extra data", text, end + len(text[end:]) - len(text[end:].lstrip()))
    return value


def read_json(path: str | os.PathLike, what: str = "JSON file", cap: tuple[str, int] = JSON_CAP):
    """The JSON value in the regular file ``path``, read bounded (size cap, depth, integer size,
    surrogates); :class:`InputError` naming ``path`` (and the line) for anything else."""
    text = read_input_text(path, what, cap)
    try:
        return json_loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}", f"not valid JSON: {e.msg} (column {e.colno})") from None
    except JsonBoundsError as e:
        raise InputError(path, str(e)) from None


def iter_lines(fh: BinaryIO, cap: tuple[str, int] = ROW_CAP):
    """``(line number, bytes)`` for each line of the binary file ``fh``; a line longer than
    ``cap`` comes as ``(n, None)`` and is skipped to its end without being kept."""
    limit = byte_cap(cap)
    n = 0
    while line := fh.readline(limit + 1):
        n += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while (rest := fh.readline(MiB)) and not rest.endswith(b"\n"):
                pass
            yield n, None
            continue
        yield n, line

OUTPUT_MARKER = ".shoptune-output.json"


class OutputError(ValueError):
    """An output place that would replace, or sit in, what the command must not touch (one line)."""


def umask() -> int:
    """The process umask (read from /proc when it is there: setting it to read it races)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _nearest_folder(path: Path) -> Path:
    """The nearest existing one of ``path`` and its parents; NotADirectoryError if it is a file."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(p))
            return p
    return Path(".")


def check_out_dir(path: str | os.PathLike) -> Path:
    """``path`` can be (or become) a folder this process writes in: neither it nor a parent is
    an existing file, and the nearest existing one takes a new file (tried, then removed).
    Raises an :class:`OSError` naming the path; leaves nothing behind. For a command to call
    before its work, so a bad ``--out`` costs nothing."""
    path = Path(path)
    folder = _nearest_folder(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".shoptune-probe-", dir=folder)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write there ({e.strerror})", str(path)) from None
    os.close(fd)
    os.unlink(probe)
    return path


def check_out_file(path: str | os.PathLike) -> Path:
    """``path`` can be written as a file: not a folder, in a folder :func:`check_out_dir` accepts."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder (a file name is wanted here)", str(path))
    try:
        check_out_dir(path.parent)
    except OSError as e:
        if isinstance(e, NotADirectoryError):
            raise
        raise type(e)(e.errno, e.strerror, str(path)) from None
    return path


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` that names an existing file in the way."""
    path = Path(path)
    _nearest_folder(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new empty folder in ``parent`` (to fill, then rename into place) with the mode a
    ``mkdir`` would give it, so the renamed result is as readable as any other output."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=make_dirs(parent)))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def default_modes(folder: str | os.PathLike) -> Path:
    """Give everything in ``folder`` (a folder this process just wrote) the mode a plain
    ``open`` / ``mkdir`` gives: libraries that write private files (safetensors 0.8 writes
    0600) would otherwise make outputs unreadable to a server running as another user."""
    folder = Path(folder)
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
    return folder


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder (a file name is wanted here)", str(path))
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # an unwritable folder: name the file wanted, not the temp name
        raise type(e)(e.errno, f"cannot write a file there ({e.strerror})", str(path)) from None
    in_body = False
    try:
        try:
            want = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            want = 0o666 & ~umask()
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            os.fchmod(fh.fileno(), want)
            in_body = True
            yield fh
            in_body = False
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not in_body and isinstance(e, OSError) and e.filename in (None, tmp):
            raise type(e)(e.errno, e.strerror, str(path)) from None  # a full disk: name the target
        raise


def write_json(path, obj) -> None:
    with atomic_open(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2)
        fh.write("\n")


def write_jsonl(path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


# ----------------------------------------------------------------------------- output folders

def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder a shoptune command wrote (None: no readable marker)."""
    path = Path(folder) / OUTPUT_MARKER
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return None
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("command"), str) \
            or not isinstance(meta.get("files"), list):
        return None
    return meta


def write_marker(folder: str | os.PathLike, command: str, files: Iterable[str] | None = None) -> None:
    """Mark ``folder`` as written by ``shoptune COMMAND`` (``files``: the names it wrote there;
    default: what the folder holds now)."""
    from shoptune import __version__
    folder = Path(folder)
    names = sorted(set(files if files is not None else os.listdir(folder)) - {OUTPUT_MARKER})
    write_json(folder / OUTPUT_MARKER, {"command": command, "files": names, "shoptune": __version__})


def _shown(names) -> str:
    names = sorted(names)
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def existing_inputs(*groups) -> list[Path]:
    """The paths among ``groups`` (strings, paths, lists of them; data paths as the loaders
    resolve them against the data dir) that exist: the inputs an output must keep clear of."""
    from shoptune.paths import resolve_data_path
    found = []
    for g in groups:
        for item in ([g] if isinstance(g, (str, os.PathLike)) or g is None else g):
            if item is None:
                continue
            try:
                found.append(resolve_data_path(item))
            except (FileNotFoundError, OSError, ValueError):
                continue
    return found


def check_not_input(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                    flag: str = "--out") -> None:
    """``out`` is not one of ``inputs``, holds none of them and is not inside one (OutputError)."""
    real = _real(out)
    for i in inputs:
        if i is None:
            continue
        r = _real(i)
        if r == real:
            raise OutputError(f"{flag} {out}: is an input ({i}); write the output somewhere else")
        if real in r.parents:
            raise OutputError(f"{flag} {out}: holds an input ({i}); write the output somewhere else")
        if r in real.parents and r.is_dir():
            raise OutputError(f"{flag} {out}: is inside the input folder {i}; write the output "
                              f"somewhere else")


def owned_entries(folder: Path, command: str, legacy: Callable[[Path], Iterable[str]] | None = None):
    """(what ``folder`` holds, what of it its writer wrote there, the writer's command or None).
    ``legacy(folder)``: the names of ``folder`` that ``COMMAND`` writes by its own rules (a
    command that writes in place, e.g. checkpoints) or that an older version wrote without a
    marker; an unmarked folder with none of them is not the command's."""
    entries = set(os.listdir(folder))
    marker = read_marker(folder)
    rules = set(legacy(folder)) if legacy is not None else set()
    if marker is not None:
        return entries, {str(n) for n in marker["files"]} | rules | {OUTPUT_MARKER}, marker["command"]
    if rules:
        return entries, rules, command
    return entries, set(), None


def check_output_dir(out: str | os.PathLike, *, command: str, inputs: Iterable = (),
                     overwrite: bool = False, flag: str = "--out", resume: bool = False,
                     legacy: Callable[[Path], Iterable[str]] | None = None) -> Path:
    """``out`` may be (re)written by ``shoptune COMMAND``: it is not an input, nor holds or sits in
    one; it is new or empty, or (with ``overwrite``, or ``resume`` for a command that continues
    its own run) an earlier output of the same command holding nothing else; and its parent takes
    a new folder. Raises :class:`OutputError` / ``OSError`` (one line) before any work."""
    out = Path(out)
    check_not_input(out, inputs, flag)
    real = _real(out)
    try:
        cwd = _real(os.getcwd())
    except OSError:  # (the current folder was removed: nothing of it to protect)
        cwd = None
    if cwd is not None and (real == cwd or real in cwd.parents):
        raise OutputError(f"{flag} {out}: is the current folder{'' if real == cwd else ' (or holds it)'}; "
                          f"name a new folder for the output")
    if out.exists() or out.is_symlink():
        if not real.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a folder", str(out))
        entries, own, writer = owned_entries(real, command, legacy)
        if entries - {OUTPUT_MARKER}:  # (a marker alone: a run that failed before writing)
            if writer is None:
                raise OutputError(f"{flag} {out}: exists and holds files shoptune did not write "
                                  f"({_shown(entries)}); choose a new or empty folder")
            if writer != command:
                raise OutputError(f"{flag} {out}: holds the output of `shoptune {writer}`, not of "
                                  f"`shoptune {command}`; choose a new or empty folder")
            foreign = entries - own
            if foreign:
                raise OutputError(f"{flag} {out}: holds files `shoptune {command}` did not write "
                                  f"({_shown(foreign)}); move them out or choose a new folder")
            if not (overwrite or resume):
                raise OutputError(f"{flag} {out}: holds an earlier `shoptune {command}` output; "
                                  f"--overwrite replaces it, or choose a new folder")
    check_out_dir(real.parent)  # a new sibling folder can be made there
    return out


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, *, command: str, inputs: Iterable = (), overwrite: bool = False,
               flag: str = "--out", legacy: Callable[[Path], Iterable[str]] | None = None):
    """Write a whole output folder: yields a new temporary sibling of ``out`` to fill; when the
    body succeeds it is marked (:data:`OUTPUT_MARKER`) and renamed into place, an earlier output
    of the same command being replaced only as :func:`check_output_dir` allows (checked before
    and again at the end). On any failure the temp folder (and any parent folder made for it)
    is removed and ``out`` is as it was."""
    inputs = list(inputs)
    check_output_dir(out, command=command, inputs=inputs, overwrite=overwrite, flag=flag, legacy=legacy)
    real = _real(out)
    made = [p for p in (real.parent, *real.parent.parents) if not p.exists()]
    tmp = make_temp_dir(real.parent, f".{real.name}.tmp-")
    try:
        yield tmp
        default_modes(tmp)
        write_marker(tmp, command)
        check_output_dir(out, command=command, inputs=inputs, overwrite=overwrite, flag=flag, legacy=legacy)
        _swap_in(tmp, real)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # (deepest first; only if still empty)
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def _swap_in(tmp: Path, real: Path) -> None:
    """Rename ``tmp`` to ``real``; an existing ``real`` (checked: ours to replace) is moved aside
    first and removed once the new one is in place, or moved back if that fails."""
    if not real.exists() or not os.listdir(real):
        os.replace(tmp, real)  # (over an empty folder: allowed)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{real.name}.old-", dir=real.parent))
    os.rmdir(old)
    os.rename(real, old)
    try:
        os.rename(tmp, real)
    except BaseException:
        os.rename(old, real)
        raise
    shutil.rmtree(old, ignore_errors=True)


def check_new_file(path: str | os.PathLike, *, inputs: Iterable = (), overwrite: bool = False,
                   flag: str = "--out") -> Path:
    """``path`` may be written as a new file: never an input (nor inside an input folder); an
    existing file only with ``overwrite`` (a file carries no marker: the user says it may go);
    else as :func:`check_out_file`."""
    path = Path(path)
    check_not_input(path, inputs, flag)
    check_out_file(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputError(f"{flag} {path}: exists; --overwrite replaces it, or choose a new file name")
    return path
