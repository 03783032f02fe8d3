"""Data loading: what shoptune's reader adds on top of parsing the JSON, same run, same files.

    .venv/bin/python benchmarks/data_load.py [--data data/ec-guide] [--repeats 3] \
        [--out docs/results/data_load.json]

Every training run, `shoptune data stats/validate` and the evaluation suites read the sources
through `shoptune.data.loaders.iter_records`: parse, check each row against the record rules,
tag it with its task card and capability. Arms, each timed best-of-``--repeats``:

(a) parse: the files parsed with the standard library (`json.loads`), nothing else: the floor;
(b) records: `iter_records` over the same files (rows breaking the rules collected, not raised);
(c) mixture: `build_mixture` of configs/train/smoke.yaml restricted to two tasks and
    decontaminated against the tiny suite: what a small training run waits for before its first
    step (reading, the suite, near-duplicate matching, sampling).

Prints rows/s and (b)/(a), the reader's overhead factor over the parse: a regression in the
per-row path (task-card lookup, validation) shows up here first. Writes ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

from shoptune import machine
from shoptune._io import write_json
from shoptune.data.loaders import data_files, iter_records

ROOT = Path(__file__).resolve().parents[1]


def parse_only(files: list[Path]) -> int:
    n = 0
    for f in files:
        raw = f.read_bytes().decode("utf-8-sig")
        if f.suffix.lower() == ".csv":
            n += sum(1 for _ in csv.DictReader(io.StringIO(raw, newline="")))
        elif raw.lstrip()[:1] == "[":
            n += len(json.loads(raw))
        else:  # JSON lines: "\n" only, as the reader splits them
            n += sum(1 for line in raw.split("\n") if line.strip() and json.loads(line) is not None)
    return n


def records(data: Path) -> tuple[int, int]:
    """(valid rows, invalid rows): a row can break several rules, it is counted once."""
    issues: list = []
    n = sum(1 for _ in iter_records(data, issues=issues))
    return n, len({(i.file, i.loc) for i in issues})


def mixture(data: Path) -> int:
    from shoptune.train.config import load_config
    from shoptune.train.mixture import build_mixture
    cfg = load_config(ROOT / "configs/train/smoke.yaml", [
        f"mixture.sources={json.dumps([str(data)])}", "mixture.total=16",
        "mixture.include_tasks=[ecguide_sa,ecguide_qprp]",
        'mixture.decontaminate_against=["shopbench-dev","suite:tiny"]'])
    recs, _ = build_mixture(cfg.mixture)
    return len(recs)


def best_of(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data/ec-guide")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mixture", action="store_true", help="skip arm (c) (data without the EC-Guide tasks)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results/data_load.json")
    args = ap.parse_args(argv)
    files = data_files(args.data)
    if not files:
        ap.error(f"--data {args.data}: no data files")
    t_parse, n_parse = best_of(lambda: parse_only(files), args.repeats)
    t_rec, (n_rec, n_bad) = best_of(lambda: records(args.data), args.repeats)
    res = {
        "machine": machine.describe(),
        "command": "benchmarks/data_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": str(args.data), "files": len(files), "repeats": args.repeats,
        "parse": {"rows": n_parse, "seconds": t_parse, "rows_per_s": round(n_parse / t_parse)},
        "records": {"rows": n_rec, "invalid": n_bad, "seconds": t_rec,
                    "rows_per_s": round((n_rec + n_bad) / t_rec)},
        "records_vs_parse": round(t_rec / t_parse, 2),
    }
    print(f"{machine.summary()}: {len(files)} files")
    print(f"(a) parse    {n_parse:>7} rows  {t_parse:6.2f} s  {res['parse']['rows_per_s']:>8} rows/s")
    print(f"(b) records  {n_rec:>7} rows  {t_rec:6.2f} s  {res['records']['rows_per_s']:>8} rows/s"
          f"  ({n_bad} invalid)  = {res['records_vs_parse']}x the parse")
    if not args.no_mixture:
        t_mix, n_mix = best_of(lambda: mixture(args.data), args.repeats)
        res["mixture"] = {"rows": n_mix, "seconds": t_mix}
        res["mixture_vs_parse"] = round(t_mix / t_parse, 2)
        print(f"(c) mixture  {n_mix:>7} rows  {t_mix:6.2f} s  = {res['mixture_vs_parse']}x the parse")
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
