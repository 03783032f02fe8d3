"""Overhead accounting (arXiv 2411.03644): one server with N task adapters vs N single-task servers.

    .venv/bin/python benchmarks/serve_overhead.py [--adapters 4] [--requests 64] [--concurrency 16]

(a) one `shoptune serve` holding the base model and N LoRA adapters (mixed-adapter batches);
(b) N servers, each the base model with one adapter merged into its weights (`--merge`), the way
single-task deployments run. Both get the same task + chat workload spread over the N tasks
(in (b) each request goes to its task's server), on this machine at the same time.
Reports resident memory (RSS, summed over (b)'s processes), throughput and latency, and the
overhead reduction: 1 - (a)/(b) for memory, and for memory per unit of throughput.
Writes docs/results/serve_overhead.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import load, workload  # noqa: E402  (same workload as the load benchmark)

from shoptune._io import write_json  # noqa: E402
from shoptune.serve.testing import ServerProcess, make_adapters  # noqa: E402


async def routed_load(urls: dict[str, str], work, concurrency: int) -> dict:
    """Send each request to its adapter's server; one client pool, results merged."""
    by_server: dict[str, list] = {}
    for path, body in work:
        by_server.setdefault(body["model"], []).append((path, body))
    per = max(1, concurrency // len(urls))
    parts = await asyncio.gather(*(load(urls[m], w, per) for m, w in by_server.items()))
    wall = max(p["wall_s"] for p in parts)
    return {"requests": len(work), "concurrency": per * len(urls), "wall_s": wall,
            "req_per_s": round(len(work) / wall, 3),
            "p50_s": round(sorted(p["p50_s"] for p in parts)[len(parts) // 2], 3),
            "p99_s": max(p["p99_s"] for p in parts), "errors": sum(p["errors"] for p in parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--out", default="docs/results/serve_overhead.json")
    a = ap.parse_args()
    if a.adapters < 2:
        ap.error("--adapters: at least 2")
    import os
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="serve_overhead-"))
    names = tuple(f"task{i}" for i in range(a.adapters))
    adapters = make_adapters(tmp / "adapters", names=names)
    work = workload(a.requests, list(names))
    common = ["--max-new-tokens", "64", "--max-wait-ms", "20"]

    multi = ServerProcess(common + sum((["--adapter", f"{k}={v}"] for k, v in adapters.items()), []),
                          tmp / "multi.log")
    try:
        asyncio.run(load(multi.url, workload(8, list(names)), 8))
        res_multi = asyncio.run(load(multi.url, work, a.concurrency))
        rss_multi = multi.rss_bytes()
    finally:
        multi.stop()
    print("one server, N adapters:", res_multi, f"RSS {rss_multi / 2**20:.0f} MiB", flush=True)

    # each single-task server gets an equal share of the cores (no oversubscription)
    threads = str(max(1, cores // a.adapters))
    singles = {}
    try:
        for name, path in adapters.items():
            singles[name] = ServerProcess(common + ["--adapter", f"{name}={path}", "--merge",
                                                    "--threads", threads], tmp / f"{name}.log")
        urls = {n: s.url for n, s in singles.items()}
        for n, s in singles.items():
            asyncio.run(load(s.url, workload(2, [n]), 2))
        res_single = asyncio.run(routed_load(urls, work, a.concurrency))
        rss_single = sum(s.rss_bytes() for s in singles.values())
    finally:
        for s in singles.values():
            s.stop()
    print(f"{a.adapters} single-task servers:", res_single, f"RSS {rss_single / 2**20:.0f} MiB", flush=True)

    mem_red = 1 - rss_multi / rss_single
    per_tput = 1 - (rss_multi / res_multi["req_per_s"]) / (rss_single / res_single["req_per_s"])
    result = {
        "adapters": a.adapters, "cpu_cores": cores, "single_server_threads": int(threads),
        "one_server": {**res_multi, "rss_mib": round(rss_multi / 2**20, 1)},
        "single_task_servers": {**res_single, "rss_mib": round(rss_single / 2**20, 1)},
        "memory_reduction_pct": round(100 * mem_red, 1),
        "memory_per_throughput_reduction_pct": round(100 * per_tput, 1),
        "throughput_ratio": round(res_multi["req_per_s"] / res_single["req_per_s"], 2),
    }
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    write_json(Path(a.out), result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
