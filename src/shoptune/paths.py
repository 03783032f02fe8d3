"""Where shoptune finds its data and keeps its caches (both overridable)."""
from __future__ import annotations

import os
from pathlib import Path

import platformdirs

REPO_ROOT = Path(__file__).resolve().parents[2]

GET_DATA_HINT = ("run `make setup` (links ../shared/data to ./data when it exists) or "
                 "`shoptune data fetch`, or point --data-dir / SHOPTUNE_DATA_DIR at a copy")


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $SHOPTUNE_DATA_DIR, else ./data, else <repo>/data."""
    if override:
        return Path(override)
    if os.environ.get("SHOPTUNE_DATA_DIR"):
        return Path(os.environ["SHOPTUNE_DATA_DIR"])
    if Path("data").exists():
        return Path("data")
    return REPO_ROOT / "data"


def resolve_data_path(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Path:
    """A path as given if it exists (or is a symlink: a broken one or a loop is named by its
    reader, not looked for in the data dir); otherwise relative to the data dir ('data/x' or 'x')."""
    p = Path(path)
    if p.exists() or p.is_symlink():
        return p
    root = data_dir(data_root)
    parts = p.parts[1:] if p.parts and p.parts[0] == "data" else p.parts
    for cand in (root / p, root.joinpath(*parts) if parts else root):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{path}: no such file or folder (data dir: {root}); {GET_DATA_HINT}")


REPO_CACHE = Path(".cache") / "shoptune"  # inside a source checkout; the Makefile's cache too


def cache_dir() -> Path:
    """$SHOPTUNE_CACHE_DIR, else <repo>/.cache/shoptune when it exists (what `make setup` fills in
    a source checkout: the CLI then finds the model make converted instead of converting it
    again), else the user cache dir (XDG_CACHE_HOME/shoptune on Linux)."""
    if os.environ.get("SHOPTUNE_CACHE_DIR"):
        return Path(os.environ["SHOPTUNE_CACHE_DIR"])
    if (REPO_ROOT / REPO_CACHE).is_dir():
        return REPO_ROOT / REPO_CACHE
    return Path(platformdirs.user_cache_dir("shoptune"))
