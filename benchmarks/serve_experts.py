"""Serving cost of N task-routed experts vs one merged adapter, one run, one machine (#22, "Measure"):

    flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/serve_experts.py \
        [--requests 48] [--concurrency 16] [--dtype fp32] [--engines builtin llama.cpp] \
        [--arms base merged_adapter merged_weights experts r32] [--experts DIR --merged DIR]
        [--r32 DIR] [--questions dev|core]

Each arm is one `shoptune serve` deployment of the same base model (--model, default the embedded
smollm2-135m) at one --dtype:

  base            no adapter (the floor);
  merged_adapter  one LoRA on every request: the TIES merge (peft add_weighted_adapter, density
                  0.2) of the four experts, what the `diverse-percap-ties` cell deploys;
  merged_weights  the same merged into the base weights (built-in: `serve --merge`; llama.cpp: the
                  merged model folder (`shoptune.serve.launch.merged_model`) exported to GGUF);
  experts         four rank-8 experts, one per capability, routed by task through /v1/tasks/{task}
                  (`serve --experts DIR`): what `diverse-percap` and Poly-exported experts deploy;
  r32             one rank-32 LoRA on every request (the r=32 baseline).

on the built-in engine and on llama.cpp (`serve --engine llama.cpp`: GGUF export, llama-server
with the adapters applied per request; the experts as LoRA per request). Adapters are random
(attention+MLP LoRA, non-zero B: the cost does not depend on the values), or real ones with
--experts DIR (a `shoptune export experts` folder, or any folder with an experts.json naming
`experts` and `task_experts`) and --merged DIR (a LoRA folder).

Workload: ShopBench development questions (data/shopbench-dev, the project's loader; or with
--questions core the core suite's, EC-Guide test questions included) sent to
POST /v1/tasks/{task} as `input_field`, round-robin over the experts the questions' tasks route to
(each gets an equal share of the traffic, mixed in every batch), by --concurrency clients after an
8-request warm-up. --merged is needed with --experts only for the merged arms.
Per arm: req/s, p50/p99 latency, errors, and the server's peak RSS (psutil, the whole process tree:
`shoptune serve` and, on llama.cpp, its llama-server) sampled every 0.1 s from start-up to the end of
the measurement; and each arm's ratio to the merged_adapter arm of the same engine (without
that arm, to the r32 arm; without either, no ratios).
Writes docs/results/serve_experts.{json,png} and prints the markdown table.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_engines import random_adapters  # noqa: E402  (the same random LoRA shape)
from serve_load import load  # noqa: E402  (the same client loop as the load benchmark)

from shoptune import machine  # noqa: E402
from shoptune._io import write_json  # noqa: E402
from shoptune.records import CAPABILITIES  # noqa: E402
from shoptune.serve.testing import ServerProcess  # noqa: E402

ARMS = ("base", "merged_adapter", "merged_weights", "experts", "r32")
ENGINES = ("builtin", "llama.cpp")
DEV = Path("data/shopbench-dev/development.json")
LABELS = {"base": "base model, no adapter", "merged_adapter": "1 merged adapter (TIES of 4 r=8)",
          "merged_weights": "merged into the weights", "experts": "4 r=8 experts, routed by task",
          "r32": "1 r=32 LoRA"}


class TreeRSS:
    """Peak resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil
        self.root, self.every = psutil.Process(pid), every
        self.peak = self.peak_children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> tuple[int, int]:
        import psutil
        total = children = 0
        for i, p in enumerate([self.root, *self.root.children(recursive=True)]):
            try:
                rss = p.memory_info().rss
            except psutil.Error:  # (a process that just ended)
                continue
            total += rss
            children += rss if i else 0
        return total, children

    def _run(self) -> None:
        while not self._stop.is_set():
            total, children = self.sample()
            self.peak, self.peak_children = max(self.peak, total), max(self.peak_children, children)
            self._stop.wait(self.every)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        mb = 1 << 20
        return {"peak_rss_mb": round(self.peak / mb), "peak_rss_children_mb": round(self.peak_children / mb)}


def random_experts(root: Path, model: str) -> Path:
    """Four rank-8 LoRA experts, one per capability, and experts.json routing every task card to
    its capability's expert (what `shoptune export experts` writes for capability routing)."""
    from shoptune.tasks import all_cards
    folders = random_adapters(root, r=8, names=CAPABILITIES, model=model)
    write_json(root / "experts.json", {
        "experts": {n: str(p) for n, p in folders.items()},
        "task_experts": {c.name: c.capability for c in all_cards().values() if c.capability in folders}})
    return root


def read_experts(folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    meta_path = folder / "experts.json"
    if not meta_path.is_file():
        sys.exit(f"--experts {folder}: no experts.json (write one with `shoptune export experts`)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return {n: folder / n for n in meta.get("experts", {})}, dict(meta.get("task_experts") or {})


def traffic_records(questions: str) -> list:
    """The questions requests are drawn from: ``dev`` (ShopBench development set: its tasks reach
    the capability experts) or a suite name such as ``core`` (EC-Guide test questions too, so
    per-task experts, e.g. exported from Poly, each get their own task's traffic)."""
    if questions == "dev":
        from shoptune.data.loaders import load_records
        return load_records([str(DEV)])
    from shoptune.eval.suite import build_suite
    return build_suite(questions)[0]


def workload(n: int, task_experts: dict[str, str], model: str | None,
             questions: str = "dev") -> list[tuple[str, dict]]:
    """``n`` task requests: questions (``traffic_records``) of the routed tasks, round-robin over
    their experts (each expert's questions in order, cycled); ``model`` in the body if given."""
    by_expert: dict[str, list] = {}
    for r in _traffic(questions):
        if r.task in task_experts:
            by_expert.setdefault(task_experts[r.task], []).append(r)
    if not by_expert:
        sys.exit(f"{questions}: no question of a task the experts route")
    groups = [by_expert[k] for k in sorted(by_expert)]
    out = []
    for i in range(n):
        g = groups[i % len(groups)]
        r = g[(i // len(groups)) % len(g)]
        body = {"input": {"input_field": r.input_field}}
        if model:
            body["model"] = model
        out.append((f"/v1/tasks/{r.task}", body))
    return out


_TRAFFIC: dict[str, list] = {}


def _traffic(questions: str) -> list:
    if questions not in _TRAFFIC:  # built once a run: every arm gets the same requests
        _TRAFFIC[questions] = traffic_records(questions)
    return _TRAFFIC[questions]


def arm_flags(arm: str, engine: str, ad: dict, dtype: str) -> tuple[list[str], str | None]:
    """`shoptune serve` flags of an arm, and the model requests name (None: the server's routing)."""
    flags = ["--dtype", dtype, "--max-batch-size", "16", "--max-wait-ms", "20"]
    if engine != "builtin":
        flags += ["--engine", engine]
    if arm == "base":
        return flags, None
    if arm == "merged_adapter":
        return flags + ["--adapter", f"merged={ad['merged']}"], "merged"
    if arm == "merged_weights":
        if engine == "builtin":
            return flags + ["--adapter", f"merged={ad['merged']}", "--merge"], None
        return flags + ["--model", str(ad["merged_model"]), "--served-model-name", "merged"], None
    if arm == "experts":
        return flags + ["--experts", str(ad["experts"])], None
    return flags + ["--adapter", f"r32={ad['r32']}"], "r32"


def run_arm(arm: str, engine: str, ad: dict, a, tmp: Path) -> dict:
    flags, model = arm_flags(arm, engine, ad, a.dtype)
    if not any(f == "--model" for f in flags):
        flags += ["--model", a.model]
    t0 = time.time()
    try:
        s = ServerProcess(flags, tmp / f"{engine}-{arm}.log", startup_timeout=900)
    except RuntimeError as e:  # one arm that cannot start is reported, the others still measured
        print(engine, arm, "did not start:", e, flush=True)
        return {"failed": str(e)[-1500:], "command": "shoptune serve " + " ".join(flags)}
    rss = TreeRSS(s.proc.pid)
    try:
        startup_s = round(time.time() - t0, 1)
        idle_mb = round(rss.sample()[0] / (1 << 20))
        asyncio.run(load(s.url, workload(8, ad["task_experts"], model, a.questions), 8))  # warm-up
        res = asyncio.run(load(s.url, workload(a.requests, ad["task_experts"], model, a.questions),
                               a.concurrency))
    finally:
        mem = rss.stop()
        s.stop()
    res.update(mem, idle_rss_mb=idle_mb, startup_s=startup_s, command="shoptune serve " + " ".join(flags))
    for k in ("ttft_p50_s", "ttft_p99_s", "lost"):
        res.pop(k, None)
    print(engine, arm, json.dumps(res), flush=True)
    return res


def prepare(a, tmp: Path) -> dict:
    """The adapters every arm serves: experts (+ routing), their merge, the r=32 LoRA, and for
    llama.cpp the merge folded into a plain model folder."""
    from shoptune.experts import merge_adapters
    if a.experts:
        experts_dir = a.experts
        folders, task_experts = read_experts(a.experts)
    else:
        experts_dir = random_experts(tmp / "experts", a.model)
        folders, task_experts = read_experts(experts_dir)
    merged = a.merged
    if merged is None and {"merged_adapter", "merged_weights"} & set(a.arms):
        merged = merge_adapters(folders, tmp / "merged", model=a.model, method="ties", density=0.2)
    ad = {"experts": experts_dir, "task_experts": task_experts, "merged": merged,
          "n_experts": len({task_experts[path.rsplit("/", 1)[1]]
                            for path, _ in workload(a.requests, task_experts, None, a.questions)})}  # experts the traffic hits
    if "r32" in a.arms:
        ad["r32"] = a.r32 or random_adapters(tmp, r=32, names=("r32",), model=a.model, first_seed=10)["r32"]
    if "merged_weights" in a.arms and any(e != "builtin" for e in a.engines):
        from shoptune.serve.launch import merged_model
        ad["merged_model"] = merged_model(a.model, merged, tmp / "merged-model")
    return ad


def reference_arm(per_arm: dict) -> str | None:
    """What the ratios divide by: the merged adapter (the one-adapter deployment of the same
    experts), or without that arm the r=32 LoRA (the deployment Poly's experts compete with);
    None without either (no ratios)."""
    return next((a for a in ("merged_adapter", "r32") if a in per_arm), None)


def ratios(per_arm: dict) -> dict:
    ref = per_arm.get(reference_arm(per_arm) or "")
    if not ref or "failed" in ref:
        return {}
    out = {}
    for arm, r in per_arm.items():
        if "failed" in r:
            continue
        out[arm] = {"req_per_s": round(r["req_per_s"] / ref["req_per_s"], 3),
                    "peak_rss": round(r["peak_rss_mb"] / ref["peak_rss_mb"], 3)}
        if r.get("gen_tok_per_s") and ref.get("gen_tok_per_s"):
            out[arm]["gen_tok_per_s"] = round(r["gen_tok_per_s"] / ref["gen_tok_per_s"], 3)
    return out


def label(arm: str, results: dict) -> str:
    """The arm's row label; the experts' names how many experts the traffic reached."""
    if arm == "experts" and results.get("adapters") == "given":
        return f"{results['n_experts']} experts, routed by task"
    return LABELS[arm]


def table(results: dict) -> str:
    ref = next((reference_arm(results[e]) for e in ENGINES if e in results), None)
    x = {"merged_adapter": "x merged adapter", "r32": "x r32"}.get(ref, "x -")
    rows = [f"| engine | arm | req/s | {x} | generated tok/s (mean answer tokens) | {x} "
            f"| p50 s | p99 s | errors | peak RSS MB | {x} | idle RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for eng in ENGINES:
        for arm, r in results.get(eng, {}).items():
            if "failed" in r:
                rows.append(f"| {eng} | {label(arm, results)} | did not start | | | | | | | | | |")
                continue
            q = results["ratios"].get(eng, {}).get(arm, {})
            gen = f"{r['gen_tok_per_s']} ({r['mean_completion_tokens']})" if r.get("gen_tok_per_s") else "-"
            rows.append(f"| {eng} | {label(arm, results)} | {r['req_per_s']} | {q.get('req_per_s', '')} | {gen} | "
                        f"{q.get('gen_tok_per_s', '')} | {r['p50_s']} | "
                        f"{r['p99_s']} | {r['errors']} | {r['peak_rss_mb']} | {q.get('peak_rss', '')} | "
                        f"{r['idle_rss_mb']} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [e for e in ENGINES if results.get(e)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, ylabel in ((axes[0], "req_per_s", "requests / s"), (axes[1], "peak_rss_mb", "peak RSS (MB)")):
        w = 0.8 / max(1, len(engines))
        arms = [arm for arm in ARMS if any(arm in results[e] for e in engines)]
        for j, eng in enumerate(engines):  # (an arm that did not start: no bar)
            ax.bar([i + (j - (len(engines) - 1) / 2) * w for i in range(len(arms))],
                   [results[eng].get(arm, {}).get(key, 0) for arm in arms], w, label=eng)
        ax.set_xticks(range(len(arms)), [arm.replace("_", "\n") for arm in arms], fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    one = {"merged_adapter": "one merged adapter", "r32": "one r=32 LoRA"}.get(
        reference_arm(results[engines[0]]), "no adapter")
    fig.suptitle(f"{results['model']} {results['dtype']}: {one} vs {results['n_experts']} "
                 f"task-routed experts ({results['requests']} task requests, {results['concurrency']} clients)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--experts", type=Path, help="a folder of experts with experts.json (default: random)")
    ap.add_argument("--merged", type=Path, help="the merged LoRA adapter folder (default: TIES of the experts)")
    ap.add_argument("--r32", type=Path, help="a rank-32 LoRA adapter folder (default: random)")
    ap.add_argument("--questions", default="dev",
                    help="traffic: dev (ShopBench development questions) or a suite name, e.g. core "
                         "(EC-Guide tasks too: per-task experts each get their task's questions)")
    ap.add_argument("--out", default="docs/results/serve_experts.json")
    a = ap.parse_args()
    if (a.experts is None) != (a.merged is None) and {"merged_adapter", "merged_weights"} & set(a.arms):
        sys.exit("--experts and --merged go together (the merged adapter of those experts)")
    if "llama.cpp" in a.engines:
        from shoptune.serve.gguf import llama_server_path
        if llama_server_path() is None:
            sys.exit("no llama-server: run `make llama-server` (or set SHOPTUNE_LLAMA_SERVER), or --engines builtin")
    tmp = Path(tempfile.mkdtemp(prefix="serve_experts-"))
    t0 = time.time()
    try:
        ad = prepare(a, tmp)
        private_gguf_cache(tmp / "cache")
        results = {"machine": machine.describe(), "command": " ".join(["benchmarks/serve_experts.py", *sys.argv[1:]]),
                   "model": a.model, "dtype": a.dtype, "requests": a.requests, "concurrency": a.concurrency,
                   "questions": a.questions,
                   "n_experts": ad["n_experts"], "adapters": "given" if a.experts else "random attention+mlp LoRA",
                   "prepare_s": round(time.time() - t0, 1)}
        for eng in a.engines:
            results[eng] = {arm: run_arm(arm, eng, ad, a, tmp) for arm in a.arms}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["ratios"] = {eng: ratios(results[eng]) for eng in a.engines}
    results["errors"] = sum(r.get("errors", 0) for eng in a.engines for r in results[eng].values())
    results["failed_arms"] = [f"{eng}/{arm}" for eng in a.engines for arm, r in results[eng].items() if "failed" in r]
    results["wall_s"] = round(time.time() - t0, 1)
    out = Path(a.out)
    write_json(out, results)
    plot(results, out.with_suffix(".png"))
    print(table(results))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def private_gguf_cache(root: Path) -> None:
    """Serve with a cache dir of this run (removed with it) that links the real one's contents
    but ``gguf/``: the GGUF exports of this run's temporary adapters do not pile up in the cache."""
    from shoptune.paths import cache_dir
    real = cache_dir()
    root.mkdir(parents=True)
    for entry in real.iterdir() if real.is_dir() else []:
        if entry.name != "gguf":
            (root / entry.name).symlink_to(entry.resolve())
    os.environ["SHOPTUNE_CACHE_DIR"] = str(root)


if __name__ == "__main__":
    main()
