"""The evaluation recipe: load data -> prompts -> backend -> score -> write results.

    shoptune eval --model smollm2-135m --data data/shopbench-dev/development.json --out runs/base

Writes ``predictions.jsonl``, ``scores.json``, ``report.md`` and ``tracks.png`` into ``out``
(each written atomically).
"""
from __future__ import annotations

import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shoptune import __version__, machine
from shoptune._io import check_output_dir, existing_inputs, output_dir, write_json, write_jsonl
from shoptune.data.loaders import load_records
from shoptune.decoding import build_prompts
from shoptune.tasks import plan_for
from shoptune.eval.backends import LocalBackend, OpenAIBackend
from shoptune.eval.report import plot_tracks, write_report
from shoptune.eval.scoring import score_outputs, summarize
from shoptune.eval.suite import build_suite, data_manifest, fingerprint
from shoptune.paths import resolve_data_path


def _local_model(model: str, adapter: str | None, *, merge: bool, dtype: str):
    """``(model, tokenizer)`` for the local backend; a single adapter merged when ``merge``."""
    from shoptune.models import load
    if adapter and merge:
        from shoptune.models import torch_dtype
        target = torch_dtype(dtype)  # (ValueError naming the choices)
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
        self.route = [task_adapters.get(r.task, default_adapter) for r in records]
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
    from shoptune._io import hash_file
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() or f == path:
            hash_file(h, f, "data file")
    return h.hexdigest()[:16]


def _check_task_adapters(model: str, engine: str, task_adapters: dict[str, str], records) -> None:
    """Before any model is loaded: every ``--task-adapter TASK=DIR`` names a task (a task card,
    a ShopBench task name such as ``task2``, or a task of the questions; a typo would otherwise
    leave TASK's questions on the base model without a word) and, for an engine that serves LoRA
    from a converted or separate copy (llama.cpp, vLLM), an adapter that fits the base. Errors
    name the option as typed. (A known task without questions here is fine: an experiment routes
    every task of a capability.)"""
    from shoptune.tasks import all_cards
    cards = all_cards()
    known = (set(cards) | {c.source.task_name for c in cards.values() if c.source.task_name}
             | {r.task_name or r.task for r in records} | {r.task for r in records})
    for task, folder in sorted(task_adapters.items()):
        if task not in known:
            shown = sorted({r.task_name or r.task for r in records})
            more = f", ... ({len(shown)} tasks)" if len(shown) > 12 else ""
            raise ValueError(f"--task-adapter {task}={folder}: {task!r} is not a task (the questions' "
                             f"tasks: {', '.join(shown[:12])}{more}; `shoptune tasks ls` lists all)")
    if engine in ("llama.cpp", "vllm"):
        from transformers import AutoConfig

        from shoptune.models import InvalidAdapterError, _base_of, check_adapter, resolve
        base = _base_of(AutoConfig.from_pretrained(str(resolve(model))))  # (shapes only: meta device)
        checked: set[str] = set()
        for task, folder in sorted(task_adapters.items()):
            if folder in checked:  # (an experiment routes many tasks to one adapter)
                continue
            checked.add(folder)
            try:
                check_adapter(base, folder, base_name=model)
            except InvalidAdapterError as e:
                raise ValueError(f"--task-adapter {task}={folder}: {e}") from None


def _warn_uncarded(records, quiet: bool) -> None:
    """Say (stderr) which questions belong to no task card (a ShopBench ``task_name`` shoptune
    does not know, a row naming its own task): they are scored by their row's task type and
    metric with the generic parser, and a typo in ``task_name`` would otherwise pass unseen."""
    from collections import Counter

    from shoptune.tasks import all_cards
    cards = all_cards()
    odd = Counter(r.task_name or r.task for r in records if r.task not in cards)
    if odd and not quiet:
        from rich.console import Console
        shown = ", ".join(f"{t} ({n})" for t, n in sorted(odd.items())[:8]) + (", ..." if len(odd) > 8 else "")
        Console(stderr=True).print(f"warning: {sum(odd.values())} question(s) of tasks without a task "
                                   f"card: {shown}; scored by their rows' task_type and metric with "
                                   "the generic parser (`shoptune tasks ls` lists the known tasks)",
                                   markup=False, highlight=False, soft_wrap=True)


ENGINES = ("builtin", "llama.cpp", "vllm", "openai")
_BACKEND_ENGINE = {"local": "builtin", "openai": "openai"}  # the former --backend


def evaluate(*, model: str, data: Sequence[str] = (), out: str | Path, adapter: str | None = None,
             limit: int | None = None, engine: str = "builtin", base_url: str | None = None,
             api_key: str = "EMPTY", protocol: str = "starter-kit", batch_size: int = 16,
             concurrency: int = 16, dtype: str = "auto", n_boot: int = 1000,
             quiet: bool = False, suite: str | Path | None = None, merge: bool = True,
             task_adapters: dict[str, str] | None = None, prefix_cache: bool = False,
             backend: str | None = None, limit_per_task: int | None = None,
             overwrite: bool = False, compile: str | bool = "auto") -> dict:
    """``suite`` (a name under configs/eval or a YAML path) or ``data`` (files/folders).

    ``engine``: ``builtin`` (this process: transformers, length-sorted batches), ``llama.cpp`` /
    ``vllm`` (started for this evaluation and stopped after, asked through shoptune's task
    endpoint so the same constrained decoding applies; :mod:`shoptune.eval.engines`), or
    ``openai`` (an OpenAI-compatible server already running at ``base_url``; a shoptune server's
    task endpoint is used when it has one). ``backend`` (``local``/``openai``) is the former name.

    ``merge``: a single LoRA adapter is merged into the weights (in fp32, then cast to the
    evaluation dtype), so it costs nothing per token; ``merge=False`` keeps it unmerged.

    ``task_adapters``: evaluate a per-task deployment, one adapter per task. Each question is
    answered by the adapter of its task (keys: task card names, or aliases such as ShopBench's
    ``task2``); questions of other tasks by the base model, or by ``adapter`` when given.

    ``prefix_cache`` (builtin): the prompts' shared prefix is run once per model and its KV
    reused (:class:`~shoptune.decoding.PrefixCache`); answers equal within rounding.

    ``compile`` (builtin): ``on`` compiles the model's decoder layers (:mod:`shoptune.compiling`),
    ``auto`` where that was measured to pay on this kind of machine.

    ``limit`` keeps the first N questions; ``limit_per_task`` the first N of each task (as
    lm-evaluation-harness's limit); the report marks scores from partial coverage.

    ``out`` is written whole at the end (:func:`shoptune._io.output_dir`); an earlier
    evaluation there is replaced only with ``overwrite``, a folder holding anything else never."""
    inputs = existing_inputs(data, [adapter] if engine != "openai" else [], list((task_adapters or {}).values()),
                             [model] if Path(str(model)).exists() else [])
    out = check_output_dir(out, command="eval", inputs=inputs, overwrite=overwrite,
                           legacy=_earlier_eval)  # before any work
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
        from shoptune.tasks import card_name
        task_adapters = {card_name(t): d for t, d in task_adapters.items()}
        missing = [str(d) for d in task_adapters.values() if not (Path(d) / "adapter_config.json").exists()]
        if missing:  # before any model load: a typo should not cost minutes
            raise ValueError(f"not a PEFT adapter folder (no adapter_config.json): {', '.join(missing)}")
    if suite:
        records, manifest = build_suite(suite)
    else:
        records = load_records(list(data))
    if task_adapters:
        _check_task_adapters(model, engine, task_adapters, records)
    _warn_uncarded(records, quiet)
    n_all = len(records)
    if limit_per_task:
        seen: dict[str, int] = {}
        kept = []
        for r in records:
            if seen.get(r.task, 0) < limit_per_task:
                seen[r.task] = seen.get(r.task, 0) + 1
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
        "machine": machine.describe(), "argv": sys.argv,  # where and how this record was made
    })
    with output_dir(out, command="eval", inputs=inputs, overwrite=overwrite, legacy=_earlier_eval) as tmp:
        write_jsonl(tmp / "predictions.jsonl", rows)
        write_json(tmp / "scores.json", summary)
        write_report(summary, tmp / "report.md")
        plot_tracks({str(out): summary}, tmp / "tracks.png")
    return summary


EVAL_FILES = ("predictions.jsonl", "scores.json", "report.md", "tracks.png")


def _earlier_eval(folder: Path) -> tuple[str, ...]:
    """What an evaluation written before output markers existed left in ``folder``."""
    return EVAL_FILES if (folder / "scores.json").is_file() else ()
