"""What a ranking score means: chance and copy-the-list baselines next to models (#13).

    .venv/bin/python benchmarks/ranking_baselines.py runs/ranking/base/predictions.jsonl \
        [more predictions.jsonl ...] [--out docs/results/ranking_baselines.json]

For every ranking question in the first file (its gold relevance levels), with ShopBench's NDCG:
the exact expected score of a uniformly random order (the mean over all 120 permutations), the
score of answering the candidates in listed order ("1, 2, 3, 4, 5"), and per predictions file
its score and how often its answer *was* the listed order. Per task (derived questions, dev task12).
"""
from __future__ import annotations

import argparse
import itertools
import json
from collections import defaultdict
from pathlib import Path

from shoptune._io import write_json
from shoptune.eval.metrics import METRIC_FNS


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("predictions", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ndcg = METRIC_FNS["ndcg"]
    first = [r for r in rows(a.predictions[0]) if r["metric"] == "ndcg"]
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in first:
        by_task[r["task"]].append(r)
    out = {"command": "benchmarks/ranking_baselines.py " + " ".join(map(str, a.predictions)), "tasks": {}}
    for task, rs in sorted(by_task.items()):
        n = len(rs[0]["output_field"])
        perms = list(itertools.permutations(range(1, n + 1)))
        rand = sum(sum(ndcg(list(p), r["output_field"]) for p in perms) / len(perms) for r in rs) / len(rs)
        ident = sum(ndcg(list(range(1, n + 1)), r["output_field"]) for r in rs) / len(rs)
        t = {"questions": len(rs), "random_order": round(rand, 4), "listed_order": round(ident, 4),
             "runs": {}}
        ids = {r["id"] for r in rs}
        for p in a.predictions:
            mine = [r for r in rows(p) if r["id"] in ids]
            listed = sum(r.get("parsed") == list(range(1, n + 1)) for r in mine)
            t["runs"][str(p)] = {"score": round(sum(r["score"] for r in mine) / len(mine), 4),
                                 "answered_listed_order": round(listed / len(mine), 3)}
        out["tasks"][task] = t
    print(json.dumps(out, indent=1))
    if a.out:
        write_json(a.out, out)


if __name__ == "__main__":
    main()
