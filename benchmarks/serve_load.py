"""Serving under load: dynamic batching vs one request at a time, same run, same machine.

    .venv/bin/python benchmarks/serve_load.py [--requests 64] [--concurrency 16 32]
    .venv/bin/python benchmarks/serve_load.py --soak 2000 --concurrency 32   # + hot-load mid-run

A mix of task-endpoint requests (multiple choice, retrieval, ranking, NER) and streamed chat
requests (64 greedy tokens), spread over 4 LoRA adapters, sent by 16 and 32 concurrent clients to
(a) `shoptune serve` (dynamic batching, mixed adapters per batch) and
(b) the same server with --max-batch-size 1 (one request at a time, the baseline).
Reports requests/s, p50/p99 latency, time to first token (the chat streams), errors and lost
requests (no answer, or a stream without its [DONE]) for each, the throughput ratio (target
>= 3x at 16 clients), and (a)'s throughput with every request on one adapter vs spread over four
(target >= 0.8x). Writes docs/results/serve_load.{json,png}.

--soak N: only (a), N requests at the highest concurrency over 4 adapters; once half of them are
answered a fifth adapter is loaded through POST /v1/load_lora_adapter and every fifth request of
the second half asks for it (they wait for the load). Target: 0 errors, 0 lost. Writes
docs/results/serve_load.soak.json.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from shoptune import machine
from shoptune._io import write_json
from shoptune.serve.testing import ServerProcess, make_adapters

TASKS = [
    ("shopbench_task2", {"question": "Which product category may have the attribute screen size?",
                         "options": ["banana", "television", "sock", "pencil"]}),
    ("shopbench_task3", {"question": "Select 3 snippets a customer would write about comfort. Output "
                                     "three numbers separated by comma.",
                         "candidates": ["very comfy", "fast shipping", "soft", "cheap", "comfortable",
                                        "great fit", "arrived late"]}),
    ("shopbench_task12", {"question": "Rank the products for the query 'red running shoes'.",
                          "candidates": ["red running shoes", "blue hat", "red sneakers", "pen",
                                         "shoe polish"]}),
    ("shopbench_task4", {"text": "asus zenbook 14 inch laptop sleeve", "entity_type": "brand"}),
]
CHAT_TOKENS = 64  # a short chat answer (--chat-tokens)
CHATS = ["Suggest a gift for a runner.", "What should I look for in a tent?",
         "Describe a good kitchen knife.", "Which phone case protects best?"]


def workload(n: int, adapters: list[str], chat_tokens: int = CHAT_TOKENS,
             late: str | None = None) -> list[tuple[str, dict]]:
    """Every other request a task, the rest streamed chat; adapters in turn. With ``late``, every
    fifth request of the second half asks for that adapter instead."""
    out = []
    for i in range(n):
        model = late if late and i >= n // 2 and i % 5 == 4 else adapters[i % len(adapters)]
        if i % 2 == 0:
            task, inp = TASKS[(i // 2) % len(TASKS)]
            out.append((f"/v1/tasks/{task}", {"model": model, "input": inp}))
        else:
            out.append(("/v1/chat/completions", {
                "model": model, "max_tokens": chat_tokens, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": CHATS[(i // 2) % len(CHATS)]}]}))
    return out


def pct(values: list[float], q: float) -> float | None:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None


async def load(url: str, work: list[tuple[str, dict]], concurrency: int,
               hot_load: tuple[str, Path] | None = None) -> dict:
    """Send ``work`` with ``concurrency`` clients. ``hot_load`` = (name, folder): loaded through
    the admin API once half the requests are answered; requests for it wait until then."""
    sem = asyncio.Semaphore(concurrency)
    progress = tqdm(total=len(work), desc=f"{concurrency} clients", unit="req", disable=len(work) < 200)
    latencies, ttft, errors = [], [], []
    lost = answered = 0
    generated = []  # completion tokens of each answered non-streamed request (its usage)
    loaded = asyncio.Event()
    hot: dict = {}
    background: list[asyncio.Task] = []

    async def do_load(client):
        t0 = time.perf_counter()
        try:
            r = await client.post(url + "/v1/load_lora_adapter",
                                  json={"lora_name": hot_load[0], "lora_path": hot_load[1].name})
            hot["status"] = r.status_code
            if r.status_code != 200:
                errors.append(f"load_lora_adapter {r.status_code}: {r.text[:200]}")
        except Exception as e:  # noqa: BLE001 - counted; the waiting requests then fail as they may
            errors.append(f"load_lora_adapter: {e!r}")
        finally:
            hot["seconds"] = round(time.perf_counter() - t0, 2)
            loaded.set()

    async def one(client, path, body):
        nonlocal lost, answered
        if hot_load and body["model"] == hot_load[0]:
            await loaded.wait()
        async with sem:
            t0 = time.perf_counter()
            try:
                if body.get("stream"):
                    async with client.stream("POST", url + path, json=body) as r:
                        if r.status_code != 200:
                            errors.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                        else:
                            first, done = None, False
                            async for line in r.aiter_lines():
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    chunk = json.loads(line[6:])
                                    if "error" in chunk:
                                        errors.append(f"in-stream: {chunk['error']['message'][:200]}")
                                    elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                                        first = time.perf_counter() - t0
                            if first is not None:
                                ttft.append(first)
                            lost += not done
                else:
                    r = await client.post(url + path, json=body)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                    else:
                        reply = r.json()
                        if path.startswith("/v1/tasks") and "answer" not in reply:  # a task reply without its answer
                            lost += 1
                        n_gen = (reply.get("usage") or {}).get("completion_tokens")
                        if isinstance(n_gen, int):
                            generated.append(n_gen)
            except Exception as e:  # noqa: BLE001 - any failure is an error of this request, not of the run
                errors.append(repr(e))
            finally:
                latencies.append(time.perf_counter() - t0)
                answered += 1
                progress.update(1)
                if hot_load and answered >= len(work) // 2 and "at_answered" not in hot:
                    hot["at_answered"] = answered
                    background.append(asyncio.create_task(do_load(client)))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 1)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(client, p, b) for p, b in work))
        await asyncio.gather(*background)
        wall = time.perf_counter() - t0
    progress.close()
    out = {"requests": len(work), "concurrency": concurrency, "wall_s": round(wall, 2),
           "req_per_s": round(len(work) / wall, 3),
           "p50_s": round(statistics.median(latencies), 3), "p99_s": pct(latencies, 0.99),
           "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None, "ttft_p99_s": pct(ttft, 0.99),
           "errors": len(errors), "lost": lost, "first_errors": errors[:3]}
    if generated:  # answers of different lengths cost different time: tokens/s separates the two
        out.update(completion_tokens=sum(generated), gen_tok_per_s=round(sum(generated) / wall, 1),
                   mean_completion_tokens=round(sum(generated) / len(generated), 1))
    if hot_load:
        out["hot_load"] = {"adapter": hot_load[0], **hot,
                           "requests_for_it": sum(b["model"] == hot_load[0] for _, b in work)}
    return out


def run_server(args, adapters, log, label, work_for, concurrencies, n, single=False) -> dict:
    flags = sum((["--adapter", f"{k}={v}"] for k, v in adapters.items()), [])
    s = ServerProcess(flags + args, log)
    try:
        asyncio.run(load(s.url, workload(8, list(adapters)), 8))  # warm-up
        res = {}
        for c in concurrencies:
            res[f"mixed@{c}"] = asyncio.run(load(s.url, work_for(n, list(adapters)), c))
            print(label, f"mixed@{c}", res[f"mixed@{c}"], flush=True)
        if single:
            c = max(concurrencies)
            res[f"single@{c}"] = asyncio.run(load(s.url, work_for(n, list(adapters)[:1]), c))
            print(label, f"single@{c}", res[f"single@{c}"], flush=True)
        return res
    finally:
        s.stop()


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [k for k in results["shoptune"] if k.startswith("mixed")]
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([i - 0.2 for i in x], [results["baseline"][k]["req_per_s"] for k in labels], 0.4,
           label="one request at a time")
    ax.bar([i + 0.2 for i in x], [results["shoptune"][k]["req_per_s"] for k in labels], 0.4,
           label="shoptune serve (dynamic batching)")
    ax.set_xticks(list(x), [k.replace("mixed@", "") + " clients" for k in labels])
    ax.set_ylabel("requests / s")
    ax.set_title("4 adapters, task + chat mix")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--chat-tokens", type=int, default=CHAT_TOKENS, help="max_tokens of chat requests")
    ap.add_argument("--soak", type=int, metavar="N", help="N requests with an adapter hot-loaded mid-run")
    ap.add_argument("--out", help="default: docs/results/serve_load.json (.soak.json with --soak)")
    a = ap.parse_args()
    a.out = a.out or f"docs/results/serve_load{'.soak' if a.soak else ''}.json"
    work = functools.partial(workload, chat_tokens=a.chat_tokens)
    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    # "late" (its own seed, so a request routed to another adapter would answer differently) is
    # in --adapters-dir but not loaded: --soak hot-loads it
    adapters = make_adapters(tmp / "adapters", names=("shoes", "tents", "books", "phones", "late"))
    late = adapters.pop("late")
    common = ["--max-new-tokens", str(max(64, a.chat_tokens))]
    if a.soak:
        soak(a, tmp, adapters, late, common)
        return
    results = {
        "shoptune": run_server(common + ["--max-batch-size", str(a.max_batch_size), "--max-wait-ms", "20"],
                               adapters, tmp / "a.log", "shoptune", work, a.concurrency, a.requests,
                               single=True),
        "baseline": run_server(common + ["--max-batch-size", "1", "--max-wait-ms", "0"],
                               adapters, tmp / "b.log", "baseline", work, a.concurrency, a.requests),
    }
    c = max(a.concurrency)
    summary = {f"throughput_ratio@{k}": round(results["shoptune"][f"mixed@{k}"]["req_per_s"] /
                                             results["baseline"][f"mixed@{k}"]["req_per_s"], 2)
               for k in a.concurrency}
    summary["mixed_vs_single_adapter"] = round(results["shoptune"][f"mixed@{c}"]["req_per_s"] /
                                               results["shoptune"][f"single@{c}"]["req_per_s"], 2)
    summary["errors"] = sum(r["errors"] for side in results.values() for r in side.values())
    summary["lost"] = sum(r["lost"] for side in results.values() for r in side.values())
    summary["chat_tokens"] = a.chat_tokens
    results["summary"] = summary
    results["machine"] = machine.describe()
    results["command"] = "benchmarks/serve_load.py --requests {} --concurrency {} --max-batch-size {} --chat-tokens {}".format(
        a.requests, " ".join(map(str, a.concurrency)), a.max_batch_size, a.chat_tokens)
    print(json.dumps(summary))
    out = Path(a.out)
    write_json(out, results)
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def soak(a, tmp: Path, adapters: dict[str, Path], late: Path, common: list[str]) -> None:
    c = max(a.concurrency)
    flags = sum((["--adapter", f"{k}={v}"] for k, v in adapters.items()), [])
    s = ServerProcess(flags + common + ["--max-batch-size", str(a.max_batch_size), "--max-wait-ms", "20",
                                        "--adapters-dir", str(late.parent)], tmp / "soak.log")
    try:
        asyncio.run(load(s.url, workload(8, list(adapters)), 8))  # warm-up
        res = asyncio.run(load(s.url, workload(a.soak, list(adapters), a.chat_tokens, late="late"), c,
                               hot_load=("late", late)))
    finally:
        s.stop()
    cmd = "benchmarks/serve_load.py --soak {} --concurrency {} --max-batch-size {} --chat-tokens {}".format(
        a.soak, c, a.max_batch_size, a.chat_tokens)
    result = {"command": cmd, "machine": machine.describe(), **res}
    print(json.dumps(result, indent=1))
    write_json(Path(a.out), result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
