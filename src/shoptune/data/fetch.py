"""Download the public sources into the data dir when ../shared/data is not there.

* EC-Guide (Apache-2.0) from the Hugging Face dataset ``AiMijie/EC-Guide`` (CSV files), written
  in the folder layout shoptune reads (``ec-guide/<Generation|MCQ|NER|Retrieval>/<NAME>.json``).
* The ShopBench development set (``development.json``, from the KDD Cup 2024 starter kit /
  Shopping MMLU release): given as ``--shopbench-url`` (no stable address is built in).
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from shoptune._io import OutputError, atomic_open, write_json
from shoptune.data.loaders import iter_raw

EC_GUIDE_REPO = "AiMijie/EC-Guide"
_FOLDERS = {"generation": "Generation", "mcq": "MCQ", "ner": "NER", "retrieval": "Retrieval"}


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    """Files already in the data dir are replaced only with ``overwrite`` (checked before any is)."""
    there = [p for p in paths if p.exists() or p.is_symlink()]
    if there and not overwrite:
        more = f" and {len(there) - 1} more" if len(there) > 1 else ""
        raise OutputError(f"{there[0]}{more}: already in the data dir; --overwrite replaces them")


def fetch_ec_guide(dest: Path, repo_id: str = EC_GUIDE_REPO, *, overwrite: bool = False) -> list[Path]:
    from huggingface_hub import snapshot_download

    snap = Path(snapshot_download(repo_id=repo_id, repo_type="dataset",
                                  allow_patterns=["EC-Guide/*.csv", "EC-Guide/*.json"]))
    files = {}
    for f in sorted((snap / "EC-Guide").glob("*.*")):
        prefix, _, name = f.stem.partition("_")
        if _FOLDERS.get(prefix.lower()) and name:
            files[f] = dest / "ec-guide" / _FOLDERS[prefix.lower()] / f"{name}.json"
    _refuse_existing(list(files.values()), overwrite)
    written = []
    for f in files:
        prefix, _, name = f.stem.partition("_")
        folder = _FOLDERS.get(prefix.lower())
        if not folder or not name:
            continue
        rows = []
        for loc, row, issue in iter_raw(f):
            if issue:
                raise ValueError(str(issue))
            rows.append({k: row[k] for k in ("input_field", "output_field", "task_type", "metric")
                         if k in row})
        out = files[f]
        write_json(out, rows)
        written.append(out)
    return written


def fetch_url(url: str, out: Path, *, overwrite: bool = False) -> Path:
    _refuse_existing([out], overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".part")
    with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as fh:
        fh.write(resp.read())
    # Sanity-check the format before it replaces anything.
    for _, _, issue in iter_raw(tmp):
        if issue:
            tmp.unlink()
            raise ValueError(f"{url}: downloaded file is not ShopBench JSON: {issue.message}")
        break
    tmp.replace(out)
    return out


def fetch(dest: Path, *, shopbench_url: str | None = None, ec_guide: bool = True,
          overwrite: bool = False) -> list[Path]:
    """Download into ``dest``; files already there are replaced only with ``overwrite``. What was
    fetched is recorded in ``dest/README.md`` unless that file is someone else's (then in
    ``dest/fetched.json``)."""
    if shopbench_url:  # (before the larger download)
        _refuse_existing([dest / "shopbench-dev" / "development.json"], overwrite)
    got = []
    if ec_guide:
        got += fetch_ec_guide(dest, overwrite=overwrite)
    if shopbench_url:
        got.append(fetch_url(shopbench_url, dest / "shopbench-dev" / "development.json", overwrite=overwrite))
    record = dest / "README.md"
    if record.exists() and not _fetch_record(record):
        record = dest / "fetched.json"
    with atomic_open(record) as fh:
        fh.write(json.dumps({"fetched": [str(p) for p in got]}, indent=1))
    return got


def _fetch_record(path: Path) -> bool:
    """Is ``path`` a record an earlier fetch wrote (JSON with only ``fetched``)?"""
    try:
        return list(json.loads(path.read_text(encoding="utf-8"))) == ["fetched"]
    except (OSError, ValueError, TypeError):
        return False
