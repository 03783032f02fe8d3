"""``shoptune serve``: one base model, many task adapters, an OpenAI-compatible HTTP API."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from shoptune.console import DTYPE_HELP, DTYPE_METAVAR, PROTOCOL_HELP, Dtype, Protocol, console, fail
from shoptune.serve.launch import ENGINES

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# the choices of shoptune.serve.upstream.KINDS and shoptune.experts.FALLBACKS, here so that the
# command line starts without importing torch (tests/test_second_hour.py checks they agree)
KINDS = ("auto", "vllm", "llama.cpp", "shoptune", "openai")
FALLBACKS = ("capability", "mean")


def _pairs(items: list[str] | None, what: str, fail) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            fail(f"{what} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be an API key (None if it can): clients send it as ``Authorization:
    Bearer KEY`` and it is compared exactly, so it must be printable ASCII without spaces."""
    if not key.strip():
        return "the API key is empty (an unset variable?)"
    if any(not "!" <= c <= "~" for c in key):
        return "an API key must be printable ASCII without spaces (this one has a space, a control " \
               "or a non-ASCII character)"
    return None


def read_keys_file(path: Path) -> set[str]:
    """One key per line (surrounding whitespace ignored); blank lines and '#' comments ignored.
    Raises ValueError naming the line of a key that cannot be one (see :func:`key_problem`)."""
    keys = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            if (why := key_problem(line)) is not None:
                raise ValueError(f"{path}:{n}: {why}")
            keys.add(line)
    return keys


def collect_keys(api_key: list[str] | None, api_keys_file: Path | None, fail) -> set[str]:
    """The keys clients must present: ``--api-key`` values, ``SHOPTUNE_API_KEY`` (when set) and
    ``--api-keys-file``; an empty or malformed one is an error (one line), never "no key"."""
    keys = set()
    for k in api_key or []:
        if (why := key_problem(k)) is not None:
            fail(f"--api-key: {why}; give a key, or leave --api-key out to serve without one")
        keys.add(k)
    env = os.environ.get("SHOPTUNE_API_KEY")
    if env is not None:
        if (why := key_problem(env)) is not None:
            fail(f"SHOPTUNE_API_KEY: {why}; set a key, or unset it to serve without one")
        keys.add(env)
    if api_keys_file is not None:
        try:
            from_file = read_keys_file(api_keys_file)
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{api_keys_file}: cannot read API keys: {e}")
        except ValueError as e:
            fail(str(e))
        if not from_file:
            fail(f"{api_keys_file}: no API keys in the file")
        keys |= from_file
    return keys


def _experts(folder: Path, adapters: dict, fail) -> tuple[dict, dict]:
    """``--experts DIR``: its experts added to ``adapters`` and the task card -> expert routing
    (``experts.json`` checked: one line naming the file and the field)."""
    from shoptune.experts import ExpertError, read_json_file
    from shoptune.serve.engine import ADAPTER_NAME_RE
    meta_path = folder / "experts.json"
    if not meta_path.is_file():
        fail(f"--experts {folder}: no experts.json (write one with `shoptune export experts`)")
    try:
        meta = read_json_file(meta_path, "experts file (experts.json)")
    except ExpertError as e:
        fail(f"--experts {folder}: {e}")
    experts, routed = (meta.get("experts"), meta.get("task_experts") or {}) if isinstance(meta, dict) else (None, None)
    if not isinstance(experts, dict) or not experts or not all(isinstance(n, str) and ADAPTER_NAME_RE.match(n)
                                                               for n in experts):
        fail(f"--experts {folder}: {meta_path}: experts must be a JSON object of expert names (as "
             f"`shoptune export experts` writes); got {str(experts if isinstance(meta, dict) else meta)[:80]}")
    if not isinstance(routed, dict) or not all(isinstance(t, str) and v in experts for t, v in routed.items()):
        fail(f"--experts {folder}: {meta_path}: task_experts must map task names to the experts listed "
             f"under experts; got {str(routed)[:80]}")
    out = dict(adapters)
    for name in experts:
        if name in out:
            fail(f"--experts {folder}: expert {name!r} has the name of an --adapter")
        out[name] = str(folder / name)
    return out, dict(routed)


def check_task_adapters(pairs: dict[str, str], adapters: list[str] | None, fail) -> None:
    """``--task-adapter TASK=NAME``: TASK is a task card (or a ShopBench task name) and, when the
    adapters are known here (``adapters``), NAME is one of them: a typo is one line at start,
    not a 404 on every call."""
    from shoptune.tasks import all_cards
    cards = all_cards()
    known = set(cards) | {c.source.task_name for c in cards.values() if c.source.task_name}
    for task, name in pairs.items():
        if task not in known:
            import difflib
            close = difflib.get_close_matches(task, sorted(known), n=2)
            fail(f"--task-adapter {task}={name}: no task card {task!r}"
                 + (f" (did you mean {' or '.join(close)}?)" if close else "; `shoptune tasks ls` lists them"))
        if adapters is not None and name not in adapters:
            fail(f"--task-adapter {task}={name}: no adapter {name!r} is served (served: "
                 f"{', '.join(adapters) or 'none'}); load it with --adapter {name}=DIR")


OverwriteOpt = Annotated[bool, typer.Option(
    help="Replace --out if it holds an earlier output of this same command (and nothing else); "
         "a folder with anything shoptune did not write there is never replaced.")]


def _remove(folder) -> None:
    import shutil
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def register(app: typer.Typer) -> None:

    export_app = typer.Typer(help="Export models and adapters for other serving engines.")
    app.add_typer(export_app, name="export")

    @export_app.command("gguf")
    def export_gguf_cmd(
        model: Annotated[str, typer.Option(help="Base model: a name from `shoptune models ls` or a folder.")],
        out: Annotated[Path, typer.Option(help="Folder for the .gguf files and manifest.json.")],
        adapter: Annotated[Optional[list[str]], typer.Option(
            help="PEFT adapter folder, or NAME=DIR (repeatable); written as NAME.gguf.")] = None,
        outtype: Annotated[Literal["bf16", "f16", "f32", "q8_0"], typer.Option(
            help="The GGUF files' weight type (q8_0: 8-bit, about half of bf16's size).")] = "bf16",
        overwrite: OverwriteOpt = False,
    ) -> None:
        """The base model and each adapter as the GGUF files llama.cpp's llama-server loads
        (converted by llama.cpp's own convert_hf_to_gguf.py / convert_lora_to_gguf.py)."""
        from shoptune.models import ModelNotFoundError
        from shoptune.serve.gguf import ExportError, export_gguf
        try:
            with console.status("exporting") as st:
                m = export_gguf(model, adapter or [], out, outtype=outtype,
                                status=lambda msg: st.update(msg), overwrite=overwrite)
        except (ExportError, ModelNotFoundError, FileNotFoundError) as e:
            fail(str(e))
        console.print(f"wrote {out}/{m['base']}" + "".join(f", {f}" for f in m["adapters"].values())
                      + ", manifest.json")
        console.print("serve with: " + " ".join(m["llama_server_command"]) + " -np 16 -c 32768",
                      markup=False, highlight=False)

    @export_app.command("experts")
    def export_experts_cmd(
        run: Annotated[Path, typer.Argument(help="A `peft: poly` training run (or its adapter/ folder).")],
        out: Annotated[Path, typer.Option(help="Folder for one PEFT LoRA folder per expert + experts.json.")],
        fallback: Annotated[Literal[FALLBACKS], typer.Option(help="For tasks of a capability the run never trained on: "
                                              "capability (no expert: the base model answers) or mean "
                                              "(an all-tasks expert, the mean of every route).")] = "capability",
        overwrite: OverwriteOpt = False,
    ) -> None:
        """A Poly adapter's experts as plain LoRA adapters: one per trained task (or capability),
        and one per capability for tasks it was not trained on; any engine serves them
        (`shoptune serve --experts OUT`, llama.cpp, vLLM)."""
        from shoptune.experts import ExpertError, export_run_experts
        try:
            with console.status("exporting experts"):
                meta = export_run_experts(run, out, fallback=fallback, overwrite=overwrite)
        except ExpertError as e:
            fail(str(e))
        console.print(f"wrote {len(meta['experts'])} experts ({meta['routing']['route_by']} routing) -> {out}; "
                      f"{len(meta['task_experts'])} task cards routed (experts.json)")
        if meta["unrouted"]:
            console.print(f"{len(meta['unrouted'])} task cards have no expert (their capability was not "
                          f"trained) and get the base model; --fallback mean gives them the mean of all experts")

    @export_app.command("merge")
    def export_merge_cmd(
        adapters: Annotated[list[str], typer.Argument(help="LoRA adapter folders, or NAME=DIR (2 or more).")],
        out: Annotated[Path, typer.Option(help="Folder for the merged PEFT LoRA adapter.")],
        model: Annotated[str, typer.Option(help="Their base model.")] = "smollm2-135m",
        method: Annotated[str, typer.Option(help="peft's add_weighted_adapter combination_type: ties, "
                                            "dare_ties, linear, cat, svd, ties_svd, ...")] = "ties",
        density: Annotated[float, typer.Option(help="Share of each adapter's weights kept (ties/dare): "
                                               "above 0, at most 1.")] = 0.2,
        overwrite: OverwriteOpt = False,
    ) -> None:
        """Several LoRA adapters merged into one with peft's add_weighted_adapter (equal weights)."""
        from shoptune.experts import ExpertError, merge_adapters
        from shoptune.serve.gguf import ExportError, named_adapters
        try:
            named = named_adapters(adapters, flag="adapter", use="it names the adapter in the merge")
            with console.status(f"merging {len(named)} adapters ({method})"):
                dest = merge_adapters(named, out, model=model, method=method, density=density,
                                      overwrite=overwrite)
        except (ExpertError, ExportError) as e:
            fail(str(e))
        console.print(f"merged {', '.join(named)} -> {dest}", markup=False, highlight=False)

    @app.command("serve")
    def serve_cmd(
        model: Annotated[str, typer.Option(help="Base model: a name from `shoptune models ls` or a folder.")] = "smollm2-135m",
        adapter: Annotated[Optional[list[str]], typer.Option(
            help="NAME=DIR, repeatable: a PEFT adapter served as model NAME.")] = None,
        host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface; "
                                            "give an --api-key then).")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
        api_key: Annotated[Optional[list[str]], typer.Option(
            help="A key clients must send as `Authorization: Bearer KEY` (repeatable; also "
                 "SHOPTUNE_API_KEY and --api-keys-file). Without any key the API is open to anyone "
                 "who can reach the port; an empty key is an error.")] = None,
        api_keys_file: Annotated[Optional[Path], typer.Option(
            help="File with one API key per line ('#' comments).")] = None,
        adapters_dir: Annotated[Optional[Path], typer.Option(
            help="Folder that runtime /v1/load_lora_adapter may load from (off without it).")] = None,
        task_model: Annotated[Optional[list[str]], typer.Option(
            help="TASK=NAME (repeatable): the model (an --adapter's NAME) that /v1/tasks/TASK answers "
                 "with when the request names none; TASK is a task card's name (or ShopBench's, "
                 "task2). Without it a task is answered by an adapter named like it, else the base "
                 "model.")] = None,
        task_adapter: Annotated[Optional[list[str]], typer.Option(
            hidden=True, help="The former name of --task-model (TASK=NAME).")] = None,
        served_model_name: Annotated[Optional[str], typer.Option(help="Id of the base model in the API.")] = None,
        merge: Annotated[bool, typer.Option(help="Merge the single --adapter into the weights and serve "
                                            "only it: a single-task deployment, no per-token LoRA cost. "
                                            "Off by default, unlike `shoptune eval`'s: a server keeps "
                                            "every adapter apart so requests choose one (and mix in "
                                            "batches).")] = False,
        dtype: Annotated[Dtype, typer.Option(metavar=DTYPE_METAVAR, help=DTYPE_HELP)] = "auto",
        max_batch_size: Annotated[int, typer.Option(
            help="Most requests decoded together in one batch (llama.cpp, vllm: their slots).")] = 16,
        max_wait_ms: Annotated[float, typer.Option(
            help="Milliseconds a batch waits for more requests to join before it starts.")] = 5.0,
        max_queue: Annotated[int, typer.Option(
            help="Requests waiting at most; one more is answered 429 (retry later).")] = 256,
        max_prompt_tokens: Annotated[int, typer.Option(
            help="Longest prompt accepted, in tokens (400 over it).")] = 2048,
        max_new_tokens: Annotated[int, typer.Option(help="Most tokens a request may ask for.")] = 512,
        max_body_bytes: Annotated[int, typer.Option(
            help="Largest request body accepted, in bytes (413 over it).")] = 1 << 20,
        body_timeout: Annotated[float, typer.Option(
            help="Seconds a client has to send the whole request body (408 after).")] = 30.0,
        request_timeout: Annotated[float, typer.Option(help="Seconds before a request is cancelled (504).")] = 300.0,
        protocol: Annotated[Protocol, typer.Option(
            help=f"{PROTOCOL_HELP} Here: the prompts of /v1/tasks, as `shoptune eval` sends "
                 "them.")] = "starter-kit",
        threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
        engine_kind: Annotated[Literal[ENGINES], typer.Option("--engine", help=(
            "builtin (in-process, no build) | llama.cpp (export to GGUF, start and supervise "
            "llama-server, serve through the gateway; needs `make llama-server`) | vllm (start and "
            "supervise vLLM with the adapters as LoRA modules, run-time loads included; needs "
            "`make vllm`)."))] = "builtin",
        experts: Annotated[Optional[Path], typer.Option(
            help="A folder from `shoptune export experts`: every expert served as an adapter, and "
                 "/v1/tasks/TASK answered by its task's expert.")] = None,
        upstream: Annotated[Optional[str], typer.Option(
            help="Gateway mode: decode on this OpenAI-compatible engine (vLLM, llama.cpp "
                 "llama-server, ...) instead of in-process; --model names its base model "
                 "(only its tokenizer is loaded), --adapter NAME=REF renames an upstream adapter.")] = None,
        upstream_api_key_env: Annotated[Optional[str], typer.Option(
            help="Name of the environment variable holding the upstream's API key.")] = None,
        upstream_kind: Annotated[Literal[KINDS], typer.Option(
            help="What --upstream is (auto: detected from its endpoints; shoptune: another "
                 "`shoptune serve`; openai: any other OpenAI-compatible server).")] = "auto",
        upstream_model: Annotated[Optional[str], typer.Option(
            help="The upstream's id of the base model (default: the first it lists).")] = None,
        upstream_concurrency: Annotated[int, typer.Option(
            help="Requests in flight to the upstream at once (the rest wait in the queue).")] = 64,
        upstream_max_bytes: Annotated[int, typer.Option(
            help="Largest upstream reply the gateway reads: one body, or one whole stream (502 above).")] = 8 << 20,
        max_connections: Annotated[int, typer.Option(
            help="Open client connections at most; over it the oldest idle one is closed (kept "
                 "under the open-files limit).")] = 1000,
        header_timeout: Annotated[float, typer.Option(
            help="Seconds a connection has to send a request's headers, from connecting or from "
                 "its previous response (closed after).")] = 10.0,
        keep_alive_timeout: Annotated[float, typer.Option(
            help="Seconds an idle keep-alive connection stays open.")] = 5.0,
        compile_: Annotated[Literal["auto", "on", "off"], typer.Option("--compile", help=(
            "Compile the built-in engine's decoder layers with torch.compile (the first requests "
            "of each shape pay the compile; batches with per-row adapters run eagerly); auto = on "
            "where it was measured to pay on this kind of machine."))] = "auto",
        log_level: Annotated[Literal[LOG_LEVELS], typer.Option(
            help="The server's log level (uvicorn's and shoptune's).")] = "info",
    ) -> None:
        """Serve the base model and its task adapters (OpenAI-compatible, dynamic batching)."""
        import logging

        import torch
        import uvicorn

        from shoptune.models import ModelNotFoundError, load
        from shoptune.serve.app import build_app
        from shoptune.serve.engine import EngineError, Engine, check_adapter_dir
        from shoptune.serve.handlers import ServeSettings
        from shoptune.tasks import card_name

        from shoptune.serve.connections import (accept_backlog, fit_open_files, guarded_h11,
                                                install_accept_log_limit)

        adapters = _pairs(adapter, "--adapter", fail)
        keys = collect_keys(api_key, api_keys_file, fail)
        for name, value in (("--max-connections", max_connections), ("--upstream-max-bytes", upstream_max_bytes)):
            if value < 1:
                fail(f"{name} {value}: must be at least 1")
        for name, value in (("--header-timeout", header_timeout), ("--keep-alive-timeout", keep_alive_timeout)):
            if not value > 0:
                fail(f"{name} {value}: must be a positive number of seconds")
        if adapters_dir is not None and not adapters_dir.is_dir():
            fail(f"--adapters-dir {adapters_dir}: not a directory")
        if not body_timeout > 0:
            fail(f"--body-timeout {body_timeout}: must be a positive number of seconds")
        if merge and experts is not None:
            fail("--merge serves one adapter merged into the weights; --experts serves several "
                 "(one per task): give one of them")
        if merge and len(adapters) != 1:
            fail("--merge needs exactly one --adapter")
        if threads:
            torch.set_num_threads(threads)
        logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # (one line per upstream request, health polls too)
            logging.getLogger("httpx").setLevel(logging.WARNING)
        install_accept_log_limit()
        supervisor = merged_dir = None
        if experts is not None:  # exported Poly experts: every expert an adapter, tasks routed to theirs
            adapters, routed = _experts(experts, adapters, fail)
            task_model = [f"{t}={n}" for t, n in routed.items()] + list(task_model or [])
        if engine_kind not in ENGINES:
            fail(f"--engine {engine_kind!r}: one of {', '.join(ENGINES)}")
        task_adapters = _pairs(task_adapter, "--task-adapter", fail)  # (before any model loads)
        in_process = engine_kind == "builtin" and upstream is None
        check_task_adapters(task_adapters, ([] if merge else list(adapters)) if in_process else None, fail)
        from shoptune.compiling import resolve
        try:
            compiled = resolve(compile_, "serve") if in_process else False
        except ValueError as e:
            fail(str(e))
        if compile_ == "on" and not compiled:
            fail("--compile on compiles the built-in engine's model; with --engine "
                 f"{engine_kind}{' / --upstream' if upstream else ''} the engine holds the weights")
        if engine_kind != "builtin":
            if upstream is not None:
                fail(f"--engine {engine_kind} starts its own upstream: no --upstream with it")
            if merge and engine_kind != "vllm":
                fail("--merge with --engine llama.cpp: llama-server applies adapters per request; "
                     "serve the adapter as it is")
            from shoptune.serve.gguf import ExportError
            from shoptune.serve.launch import merged_model, start_engine
            try:
                served = served_model_name or model
                if merge:  # vLLM's LoRA path on CPUs costs several times the merged weights
                    (name, folder), = adapters.items()
                    check_adapter_dir(Path(folder))
                    with console.status(f"merging {name} into {model}"):
                        merged_dir = merged_model(model, folder)
                    model, adapters, served = str(merged_dir), {}, served_model_name or name
                with console.status(f"starting {engine_kind}") as st:
                    supervisor = start_engine(engine_kind, model, adapters, dtype=dtype, served_name=served,
                                              slots=max_batch_size, threads=threads,
                                              status=lambda m: st.update(m))
                upstream = supervisor.url
            except (ExportError, EngineError, ModelNotFoundError, FileNotFoundError) as e:
                if supervisor is not None:
                    supervisor.stop()
                _remove(merged_dir)
                fail(str(getattr(e, "message", e)))
            if engine_kind == "llama.cpp":
                adapters, upstream_kind = {}, "llama.cpp"  # (served under their names: NAME.gguf)
            else:
                adapters, upstream_kind, served_model_name = {}, "vllm", served
        if upstream is not None:
            if merge:
                fail("--merge serves an in-process model; with --upstream the engine holds the weights")
            if upstream_concurrency < 1:
                fail(f"--upstream-concurrency {upstream_concurrency}: must be at least 1")
            upstream_key = None
            if upstream_api_key_env:
                upstream_key = os.environ.get(upstream_api_key_env)
                if not upstream_key:
                    fail(f"--upstream-api-key-env {upstream_api_key_env}: that environment variable is not set")
            from shoptune.models import load_tokenizer
            from shoptune.serve.upstream import UpstreamEngine
            try:
                tok = load_tokenizer(model)
                engine = UpstreamEngine(upstream, tok, base_name=served_model_name or model,
                                        kind=upstream_kind, api_key=upstream_key, adapters=adapters,
                                        max_concurrency=upstream_concurrency, max_queue=max_queue,
                                        timeout=request_timeout, upstream_model=upstream_model,
                                        max_reply_bytes=upstream_max_bytes)
            except (ModelNotFoundError, EngineError, FileNotFoundError, ValueError, OSError) as e:
                if supervisor is not None:
                    supervisor.stop()
                fail(str(getattr(e, "message", e)))
            if supervisor is not None:  # (uvicorn re-raises SIGTERM after shutdown: stop it in the lifespan)
                engine.on_close.append(supervisor.stop)
                if merged_dir is not None:
                    engine.on_close.append(lambda: _remove(merged_dir))
                if hasattr(supervisor, "loaded"):  # vLLM: a restart brings back run-time loads
                    engine.before_load.append(supervisor.check_load)
                    engine.on_load.append(supervisor.loaded)
                    engine.on_unload.append(supervisor.unloaded)
            console.print(f"gateway to {engine.kind} at {upstream} (upstream model {engine.upstream_model})")
        else:
            try:
                for name, folder in adapters.items():
                    check_adapter_dir(Path(folder))
                with console.status(f"loading {model}"):
                    if merge:
                        (name, folder), = adapters.items()
                        lm, tok = load(model, adapter=folder, dtype=dtype)
                        lm = lm.merge_and_unload()
                        base_name, adapters = served_model_name or name, {}
                    else:
                        lm, tok = load(model, dtype=dtype)
                        base_name = served_model_name or model
                engine = Engine(lm, tok, base_name=base_name, max_batch_size=max_batch_size,
                                max_wait=max_wait_ms / 1000, max_queue=max_queue, compile=compiled)
                for name, folder in adapters.items():
                    engine.load_adapter(name, folder)
            except (ModelNotFoundError, EngineError, FileNotFoundError, ValueError) as e:
                fail(str(getattr(e, "message", e)))
        settings = ServeSettings(api_keys=frozenset(keys), adapters_dir=adapters_dir,
                                 max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_new_tokens,
                                 default_max_tokens=min(256, max_new_tokens),
                                 max_body_bytes=max_body_bytes, body_timeout=body_timeout,
                                 request_timeout=request_timeout,
                                 protocol=protocol,
                                 task_adapters={card_name(t): n for t, n in _pairs(
                                     [*(task_model or []), *(task_adapter or [])], "--task-model", fail).items()})
        fitting, nofile = fit_open_files(max_connections, reserve=128 + upstream_concurrency)
        if fitting < max_connections:
            console.print(f"--max-connections {max_connections}: only {fitting} fit under the open-files "
                          f"limit ({nofile}, `ulimit -n`); serving at most {fitting}", markup=False)
        console.print(f"serving {', '.join(engine.models())} on http://{host}:{port}/v1"
                      f"{' (API key required)' if keys else ' (no API key: open to anyone who can reach it)'}")
        try:
            uvicorn.run(build_app(engine, settings), host=host, port=port, log_level=log_level,
                        timeout_graceful_shutdown=int(request_timeout),
                        http=guarded_h11(fitting, header_timeout), timeout_keep_alive=keep_alive_timeout,
                        backlog=accept_backlog(fitting))
        finally:
            if supervisor is not None:
                supervisor.stop()
            _remove(merged_dir)
