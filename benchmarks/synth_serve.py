"""Synthesis end to end against a real `shoptune serve` teacher on loopback (#13).

    flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/synth_serve.py \\
        [--rows 20] [--max-requests 40] [--pool-limit 60] [--no-student]

1. `shoptune data derive ranking` -> runs/synth-bench/qpr_ranking.jsonl (the pool);
2. `shoptune serve --model smollm2-135m` on a free loopback port (the teacher);
3. `run_synth` with configs/synth/qpr_ranking.yaml, made small (rows, budget, pool, max_tokens);
   the student (smollm2-135m, local evaluation engine) decides hard vs easy pool questions and
   is scored on the rows kept (the steering check);
4. writes docs/results/synth.md (+ synth.json): requests, rows kept, rejection reasons, tokens,
   wall time, the machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from shoptune import machine
from shoptune._io import atomic_open, write_json
from shoptune.data.synth import SynthSpec, run_synth, side_paths
from shoptune.paths import REPO_ROOT
from shoptune.serve.testing import ServerProcess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--max-requests", type=int, default=40)
    ap.add_argument("--pool-limit", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--no-student", action="store_true")
    ap.add_argument("--work", default="runs/synth-bench")
    ap.add_argument("--results", default="docs/results/synth.md")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    pool = work / "qpr_ranking.jsonl"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "shoptune.cli", "data", "derive", "ranking", "--out",
                    str(pool), "--against", "shopbench-dev"], check=True)
    derive_s = time.time() - t0
    over = dict(pool=[str(pool)], rows=a.rows, max_requests=a.max_requests, pool_limit=a.pool_limit,
                max_tokens=a.max_tokens, concurrency=a.concurrency,
                decontaminate_against=["shopbench-dev"])
    if a.no_student:
        over.update(student=None, characteristics={"difficulty": {"any": 1}, "language": {"en": 1}})
    spec = SynthSpec.from_yaml(REPO_ROOT / "configs/synth/qpr_ranking.yaml", over)
    out = work / "synth.jsonl"
    for p in [out, *side_paths(out).values()]:
        if p.is_file():
            p.unlink()
    t1 = time.time()
    server = ServerProcess(["--model", "smollm2-135m", "--max-new-tokens", str(a.max_tokens)],
                           work / "serve.log")
    up_s = time.time() - t1
    try:
        rep = run_synth(spec, out, teacher_url=server.url + "/v1", teacher_model="smollm2-135m",
                        api_key="EMPTY", quiet=True)
    finally:
        server.stop()
    rejected = [json.loads(x) for x in side_paths(out)["rejected"].read_text().splitlines()] \
        if side_paths(out)["rejected"].exists() else []
    cmd = "flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/synth_serve.py " + " ".join(sys.argv[1:])
    result = {"command": cmd, "machine": machine.summary(), "derive_s": round(derive_s, 1),
              "server_start_s": round(up_s, 1), "report": rep}
    write_json(Path(a.results).with_suffix(".json"), result)
    lines = [
        "# Synthesis end to end: `shoptune serve` (SmolLM2-135M) as the teacher (#13)", "",
        f"Command: `{cmd}`  ", f"Machine: {result['machine']}; {time.strftime('%Y-%m-%d')}", "",
        "Pool: `shoptune data derive ranking` questions (train split of the ranking suite's "
        f"settings, {rep['pool']['rows']} sampled); spec `configs/synth/qpr_ranking.yaml` with "
        f"rows={a.rows}, max_requests={a.max_requests}, max_tokens={a.max_tokens}, "
        f"concurrency={a.concurrency}; decontamination against shopbench-dev.", "",
        "| | value |", "|---|---|",
        f"| requests sent | {rep['requests']['total']} (retries by status: {rep['requests']['retried_by_status'] or 'none'}) |",
        f"| rows kept / wanted | {rep['kept']} / {rep['rows_wanted']} |",
        f"| rows rejected | {rep['rejected']} |",
        f"| tokens (prompt + completion) | {rep['tokens']} |",
        f"| wall time of the synthesis run | {rep['wall_s']} s (server start {result['server_start_s']} s, derive {result['derive_s']} s) |",
        f"| stopped | {rep['stopped'] or 'rows reached'} |",
        f"| pool difficulty (student) | {rep['pool']['difficulty'] or 'no student'} |",
        f"| steering check | {rep['steering'].get('difficulty', 'no rows kept / no student')} |", "",
        "Rejections by reason:", "",
        *[f"- `{k}`: {v}" for k, v in rep["rejected_by_reason"].items()], "",
        "First rejected replies (cut to 160 characters):", "",
        *[f"- `{r['reason']}`: {json.dumps(r['text'][:160], ensure_ascii=False)}" for r in rejected[:5]], "",
    ]
    with atomic_open(a.results) as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
