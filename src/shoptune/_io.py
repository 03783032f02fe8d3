"""Atomic file writes: write to a temp file beside the target, fsync, then rename.

Files and folders made here get the permissions a plain ``open`` / ``mkdir`` would give
(``0o666`` / ``0o777`` less the umask; a replaced file keeps its mode), not the private
``0o600`` / ``0o700`` of :mod:`tempfile`. A target that cannot be written raises an
:class:`OSError` naming the target (not the temp file)."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path


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
