"""The evaluation recipe: load data -> prompts -> backend -> score -> write results.

    shoptune eval --model smollm2-135m --data data/shopbench-dev/development.json --out runs/base

Writes ``predictions.jsonl``, ``scores.json``, ``report.md`` and ``tracks.png`` into ``out``
(each written atomically).
"""
from __future__ import annotations

import hashlib
import platform
import time
from pathlib import Path
from typing import Sequence

import torch

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shoptune import __version__
from shoptune._io import check_out_dir, write_json, write_jsonl
from shoptune.data.loaders import load_records
from shoptune.decoding import build_prompts, plan_for
from shoptune.eval.backends import LocalBackend, OpenAIBackend
from shoptune.eval.report import plot_tracks, write_report
from shoptune.eval.scoring import score_outputs, summarize
from shoptune.eval.suite import build_suite, data_manifest, fingerprint
from shoptune.paths import resolve_data_path


def _local_model(model: str, adapter: str | None, *, merge: bool, dtype: str):
    """``(model, tokenizer)`` for the local backend; a single adapter merged when ``merge``."""
    from shoptune.models import load
    if adapter and merge:
        from shoptune.models import default_dtype
        target = {"auto": default_dtype(), "bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
        if target is None:
            raise ValueError(f"dtype {dtype!r}: auto, bf16 or fp32")
        mdl, tok = load(model, adapter=adapter, dtype="fp32")
        return mdl.merge_and_unload().to(target).eval(), tok
    return load(model, adapter=adapter, dtype=dtype)


class _PerTaskBackend:
    """Runs each task's questions on that task's adapter (one model in memory at a time)."""

    def __init__(self, model: str, records, task_adapters: dict[str, str], default_adapter: str | None,
                 *, merge: bool, dtype: str, batch_size: int, prefix_cache: bool = False,
                 compile: bool = False):
        self.model, self.merge, self.dtype, self.batch_size = model, merge, dtype, batch_size
        self.prefix_cache, self.compile = prefix_cache, compile
        self.default_adapter = default_adapter
        self.route = [task_adapters.get(r.task_name or r.task, task_adapters.get(r.task, default_adapter))
                      for r in records]
        # the base (or default-adapter) model first: it gives the tokenizer and the dtype reported
        self.base_model, self.tok = _local_model(model, default_adapter, merge=merge, dtype=dtype)

    def run(self, prompts, plans, progress=None) -> list:
        outputs: list = [None] * len(prompts)
        groups: dict = {}
        for i, a in enumerate(self.route):
            groups.setdefault(a, []).append(i)
        order = [self.default_adapter] + sorted(a for a in groups if a != self.default_adapter)
        for a in order:
            idx = groups.get(a)
            if not idx:
                continue
            if a == self.default_adapter:
                mdl = self.base_model
            else:
                mdl, _ = _local_model(self.model, a, merge=self.merge, dtype=self.dtype)
            got = LocalBackend(mdl, self.tok, batch_size=self.batch_size,
                               prefix_cache=self.prefix_cache, compile=self.compile).run(
                [prompts[i] for i in idx], [plans[i] for i in idx], progress=progress)
            for i, o in zip(idx, got):
                outputs[i] = o
            if mdl is not self.base_model:
                del mdl
        return outputs


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


ENGINES = ("builtin", "llama.cpp", "vllm", "openai")
_BACKEND_ENGINE = {"local": "builtin", "openai": "openai"}  # the former --backend


def evaluate(*, model: str, data: Sequence[str] = (), out: str | Path, adapter: str | None = None,
             limit: int | None = None, engine: str = "builtin", base_url: str | None = None,
             api_key: str = "EMPTY", protocol: str = "starter-kit", batch_size: int = 16,
             concurrency: int = 16, dtype: str = "auto", n_boot: int = 1000,
             quiet: bool = False, suite: str | Path | None = None, merge: bool = True,
             task_adapters: dict[str, str] | None = None, prefix_cache: bool = False,
             backend: str | None = None, limit_per_task: int | None = None,
             compile: str | bool = "auto") -> dict:
    """``suite`` (a name under configs/eval or a YAML path) or ``data`` (files/folders).

    ``engine``: ``builtin`` (this process: transformers, length-sorted batches), ``llama.cpp`` /
    ``vllm`` (started for this evaluation and stopped after, asked through shoptune's task
    endpoint so the same constrained decoding applies; :mod:`shoptune.eval.engines`), or
    ``openai`` (an OpenAI-compatible server already running at ``base_url``; a shoptune server's
    task endpoint is used when it has one). ``backend`` (``local``/``openai``) is the former name.

    ``merge``: a single LoRA adapter is merged into the weights (in fp32, then cast to the
    evaluation dtype), so it costs nothing per token; ``merge=False`` keeps it unmerged.

    ``task_adapters``: evaluate a per-task deployment, one adapter per task. Each question is
    answered by the adapter of its task (its ShopBench ``task_name``, else its task card name);
    questions of other tasks by the base model, or by ``adapter`` when given.

    ``prefix_cache`` (builtin): the prompts' shared prefix is run once per model and its KV
    reused (:class:`~shoptune.decoding.PrefixCache`); answers equal within rounding.

    ``compile`` (builtin): ``on`` compiles the model's decoder layers (:mod:`shoptune.compiling`),
    ``auto`` where that was measured to pay on this kind of machine.

    ``limit`` keeps the first N questions; ``limit_per_task`` the first N of each task (as
    lm-evaluation-harness's limit); the report marks scores from partial coverage."""
    out = check_out_dir(out)  # before any work: a file in the way, an unwritable place
    for name, value in (("limit", limit), ("limit_per_task", limit_per_task)):
        if value is not None and value < 1:  # (records[:-1] would score all but one)
            raise ValueError(f"{name} {value}: must be at least 1")
    if backend is not None:
        if backend not in _BACKEND_ENGINE:
            raise ValueError(f"unknown backend {backend!r}; local or openai (or use engine=)")
        engine = _BACKEND_ENGINE[backend]
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: one of {', '.join(ENGINES)}")
    if bool(suite) == bool(data):
        raise ValueError("give either --suite or --data")
    if task_adapters and engine == "openai":
        raise ValueError("per-task adapters (--task-adapter) need an engine shoptune starts "
                         "(builtin, llama.cpp, vllm)")
    if engine == "openai" and not base_url:
        raise ValueError("--engine openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    from shoptune.compiling import resolve
    if engine != "builtin" and compile in ("on", True):
        raise ValueError(f"--compile on compiles the built-in engine's model; --engine {engine} runs its own")
    compiled = engine == "builtin" and resolve(compile, "eval")
    if task_adapters:
        missing = [str(d) for d in task_adapters.values() if not (Path(d) / "adapter_config.json").exists()]
        if missing:  # before any model load: a typo should not cost minutes
            raise ValueError(f"not a PEFT adapter folder (no adapter_config.json): {', '.join(missing)}")
    if suite:
        records, manifest = build_suite(suite)
    else:
        records = load_records(list(data))
    n_all = len(records)
    if limit_per_task:
        seen: dict[str, int] = {}
        kept = []
        for r in records:
            k = r.task_name or r.task
            if seen.get(k, 0) < limit_per_task:
                seen[k] = seen.get(k, 0) + 1
                kept.append(r)
        records = kept
    if limit:
        records = records[:limit]
    if suite:
        manifest.update(n_questions=len(records), ids=[r.id for r in records],
                        fingerprint=fingerprint([r.id for r in records], manifest["sources"]))
    else:
        manifest = data_manifest(records, list(data))
    t0 = time.time()
    tok = None
    served = None
    engine_info: dict = {"name": engine}
    if engine == "builtin":
        if task_adapters:
            runner = _PerTaskBackend(model, records, task_adapters, adapter, merge=merge,
                                     dtype=dtype, batch_size=batch_size, prefix_cache=prefix_cache,
                                     compile=compiled)
            mdl, tok = runner.base_model, runner.tok
        else:
            mdl, tok = _local_model(model, adapter, merge=merge, dtype=dtype)
            runner = LocalBackend(mdl, tok, batch_size=batch_size, prefix_cache=prefix_cache,
                                  compile=compiled)
        dtype_used = str(mdl.dtype).replace("torch.", "")
        import transformers
        engine_info.update(version=f"transformers {transformers.__version__}", dtype=dtype_used,
                           adapter=("merged" if merge else "lora") if (adapter or task_adapters) else None,
                           compiled=compiled)
    elif engine == "openai":
        runner = OpenAIBackend(adapter or model, base_url=base_url, api_key=api_key,
                               concurrency=concurrency, chat=protocol == "chat", protocol=protocol)
        dtype_used = None
        engine_info.update(version=None, dtype=None, adapter=None, base_url=base_url)
    else:
        from shoptune.eval.engines import EngineServer
        served = EngineServer(engine, model, adapter=adapter, task_adapters=task_adapters, dtype=dtype,
                              merge=merge, concurrency=concurrency, protocol=protocol)
    try:
        if served is not None:
            from rich.console import Console
            with Console(stderr=True, quiet=quiet).status(f"starting {engine}") as st:
                served.status = lambda m: st.update(m)
                url, request_model = served.__enter__()
            # an engine this process started: nothing else queues there, and on a machine shared
            # with other jobs a request may wait long; a failed one still stops the evaluation
            runner = OpenAIBackend(request_model, base_url=url, concurrency=concurrency,
                                   chat=protocol == "chat", protocol=protocol, timeout=1800.0)
            engine_info.update(served.info)
            dtype_used = engine_info["dtype"]
        load_s = time.time() - t0
        prompts = build_prompts(records, protocol, tok if engine == "builtin" else None)
        plans = [plan_for(r) for r in records]
        t1 = time.time()
        with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=quiet) as bar:
            task = bar.add_task("eval", total=len(records))
            extra = {"records": records} if isinstance(runner, OpenAIBackend) else {}
            outputs = runner.run(prompts, plans, progress=lambda n: bar.advance(task, n), **extra)
        gen_s = time.time() - t1
    finally:
        if served is not None:
            served.__exit__(None, None, None)
    if served is not None and getattr(runner, "tasks_used", 0) != len(records):
        raise RuntimeError(f"{engine}: {len(records) - runner.tasks_used} questions were not answered at "
                           "the task endpoint (no constrained decoding for them)")
    rows = score_outputs(records, outputs)
    summary = summarize(rows, n_boot=n_boot)
    manifest["engine"] = engine_info
    summary.update({
        "model": model, "adapter": adapter,
        "adapter_merged": bool((adapter or task_adapters) and merge and engine_info.get("adapter") == "merged"),
        "task_adapters": dict(sorted(task_adapters.items())) if task_adapters else None,
        "engine": engine_info,
        "backend": {"builtin": "local", "openai": "openai"}.get(engine, engine), "base_url": base_url,
        # questions a shoptune server answered at its task endpoint (its constrained decoding)
        "task_endpoint_questions": getattr(runner, "tasks_used", None),
        "protocol": protocol, "dtype": dtype_used, "batch_size": batch_size,
        "prefix_cache": bool(prefix_cache and engine == "builtin"),
        "data": [{"path": str(resolve_data_path(d)), "sha256_16": _file_hash(resolve_data_path(d))}
                 for d in data],
        "limit": limit, "limit_per_task": limit_per_task,
        "coverage": {"questions": len(records), "of": n_all, "partial": len(records) < n_all},
        "manifest": manifest,
        "timing": {"load_s": round(load_s, 3), "generate_s": round(gen_s, 3),
                   "questions_per_s": round(len(records) / gen_s, 4) if gen_s else None,
                   "score_s": round(time.time() - t1 - gen_s, 3)},
        "versions": {"shoptune": __version__, "python": platform.python_version()},
    })
    write_jsonl(out / "predictions.jsonl", rows)
    write_json(out / "scores.json", summary)
    write_report(summary, out / "report.md")
    plot_tracks({str(out): summary}, out / "tracks.png")
    return summary
