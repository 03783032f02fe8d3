"""Evaluation on a real engine: ``shoptune eval --engine llama.cpp|vllm``.

For one evaluation, :class:`EngineServer` starts the engine (:func:`shoptune.serve.launch.start_engine`),
puts shoptune's gateway in front of it in this process (the same app ``shoptune serve --engine``
runs, on a loopback port), and stops both afterwards. The evaluator then asks every question at
the gateway's task endpoint, so the engine decodes under exactly the constraints the built-in
evaluator applies (valid option tokens through ``logit_bias``, number lists through a grammar or
structured outputs, stop at the line end): the engine changes, the decoding rules do not.

Adapters: vLLM serves a single adapter merged into the weights (its CPU LoRA path costs several
times the merged weights per token); llama.cpp applies it per request as a LoRA (a merged model
would cost a full GGUF conversion per adapter, the LoRA conversion is small and the base export
is cached). Per-task adapters are served side by side and routed by the task endpoint.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

from shoptune.serve.gguf import ExportError
from shoptune.serve.launch import ENGINES, gguf_outtype, merged_model, start_engine


class EngineServer:
    """``with EngineServer(...) as (base_url, model):`` a running engine behind the gateway;
    ``model`` is the name requests use (None: let the task endpoint route per task)."""

    def __init__(self, kind: str, model: str, *, adapter: str | None = None,
                 task_adapters: dict[str, str] | None = None, dtype: str = "auto", merge: bool = True,
                 concurrency: int = 16, protocol: str = "starter-kit", status=None):
        if kind not in ENGINES or kind == "builtin":
            raise ValueError(f"engine {kind!r}: llama.cpp or vllm")
        self.kind, self.model, self.adapter = kind, model, adapter
        self.task_adapters = dict(task_adapters or {})
        self.dtype, self.merge, self.concurrency, self.protocol = dtype, merge, concurrency, protocol
        self.status = status or (lambda msg: None)
        self.supervisor = self.server = self.thread = None
        self.merged_dir: Path | None = None
        self.info: dict = {}

    def __enter__(self) -> tuple[str, str | None]:
        try:
            return self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self) -> tuple[str, str | None]:
        import uvicorn

        from shoptune.models import load_tokenizer
        from shoptune.serve.app import build_app
        from shoptune.serve.handlers import ServeSettings
        from shoptune.serve.testing import free_port
        from shoptune.serve.upstream import UpstreamEngine

        base, served, adapters, routes, request_model = self.model, "base", {}, {}, "base"
        mode = None
        if self.adapter and self.merge and self.kind == "vllm" and not self.task_adapters:
            self.status("merging the adapter into the weights")
            self.merged_dir = merged_model(self.model, self.adapter)
            base, served, request_model, mode = str(self.merged_dir), "merged", "merged", "merged"
        elif self.adapter:
            adapters["adapter"], request_model, mode = self.adapter, "adapter", "lora"
        for i, (task, folder) in enumerate(sorted(self.task_adapters.items())):
            name = next((n for n, d in adapters.items() if d == folder), f"task{i}")
            adapters[name], routes[task] = folder, name
        if self.task_adapters:
            request_model, mode = None, "lora, per task"
        try:
            self.supervisor = start_engine(self.kind, base, adapters, dtype=self.dtype, served_name=served,
                                           slots=self.concurrency, status=self.status)
        except ExportError as e:  # it names the engine's adapter (task0=...): name the option typed
            msg = str(e)
            for task, name in routes.items():
                msg = msg.replace(f"--adapter {name}=", f"--task-adapter {task}=")
            raise ExportError(msg) from None
        tok = load_tokenizer(base)
        engine = UpstreamEngine(self.supervisor.url, tok, base_name=served, kind=self.kind,
                                max_concurrency=self.concurrency, max_queue=100_000, timeout=1800)
        settings = ServeSettings(protocol=self.protocol, task_adapters=routes)
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(build_app(engine, settings), host="127.0.0.1",
                                                    port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="eval-gateway", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the evaluation gateway did not start")
            time.sleep(0.02)
        self.info = {"name": self.kind, "version": self.supervisor.version(),
                     "dtype": _dtype_name(self.kind, self.dtype), "adapter": mode}
        return f"http://127.0.0.1:{port}/v1", request_model

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.should_exit = True
            if self.thread is not None:
                self.thread.join(30)
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.merged_dir is not None:
            shutil.rmtree(self.merged_dir, ignore_errors=True)


def _dtype_name(kind: str, dtype: str) -> str:
    if kind == "llama.cpp":
        return gguf_outtype(dtype)
    from shoptune.serve.supervise import vllm_dtype
    return vllm_dtype(dtype)
