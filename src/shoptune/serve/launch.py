"""Start a real engine for a model and its adapters: what ``shoptune serve --engine`` and
``shoptune eval --engine`` share.

* ``llama.cpp``: the model and adapters exported to GGUF (cached by content), ``llama-server``
  supervised on a loopback port, adapters applied per request (LoRA scales);
* ``vllm``: the Hugging Face folder and PEFT adapter folders served by vLLM (``make vllm``),
  adapters as ``--lora-modules``.

:func:`merged_model` writes an adapter merged into the base weights as a plain model folder,
for engines whose LoRA path costs more than the merged weights (vLLM on CPUs).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from shoptune.serve.supervise import (EngineSupervisor, LlamaServerSupervisor, VllmSupervisor,
                                      export_cached)

ENGINES = ("builtin", "llama.cpp", "vllm")


def gguf_outtype(dtype: str | None) -> str:
    """The GGUF tensor type for shoptune's --dtype: fp32 -> f32; bf16 and auto -> bf16."""
    if dtype in ("fp32", "float32"):
        return "f32"
    if dtype in (None, "", "auto", "bf16", "bfloat16"):
        return "bf16"
    raise ValueError(f"--dtype {dtype!r} with llama.cpp: auto, bf16 or fp32")


def start_engine(kind: str, model: str, adapters: dict[str, str], *, dtype: str = "auto",
                 served_name: str | None = None, slots: int = 16, threads: int | None = None,
                 status=None) -> EngineSupervisor:
    """Start (and supervise) ``kind`` serving ``model`` and ``adapters`` (name -> PEFT folder);
    returns the running supervisor (``.url``, ``.version()``, ``.stop()``). Raises
    :class:`~shoptune.serve.gguf.ExportError` / ``AdapterError`` with a one-line reason."""
    from shoptune.models import resolve
    from shoptune.serve.engine import check_adapter_dir
    for folder in adapters.values():
        check_adapter_dir(Path(folder))
    if kind == "llama.cpp":
        from shoptune.serve.gguf import ExportError, llama_server_path
        if llama_server_path() is None:  # (before minutes of GGUF export, not after)
            raise ExportError("no llama-server binary: run `make llama-server` (or set SHOPTUNE_LLAMA_SERVER)")
        folder, manifest = export_cached(model, adapters, outtype=gguf_outtype(dtype), status=status)
        sup: EngineSupervisor = LlamaServerSupervisor(folder, manifest, slots=slots, threads=threads)
    elif kind == "vllm":
        from shoptune.serve.gguf import check_adapters_fit
        check_adapters_fit(resolve(model), [(n, Path(d)) for n, d in adapters.items()], model)
        sup = VllmSupervisor(resolve(model), adapters, served_name=served_name or model, dtype=dtype,
                             max_num_seqs=slots)
    else:
        raise ValueError(f"engine {kind!r}: one of {', '.join(ENGINES)}")
    if status:
        status(f"starting {sup.name}")
    sup.start()
    return sup


def merged_model(model: str, adapter: str | Path, out: Path | None = None) -> Path:
    """``adapter`` merged into ``model`` (in fp32, saved as fp32 safetensors with the base's
    tokenizer and chat template): a plain model folder any engine serves as a base model.
    Written into ``out`` (default: a new temporary folder; the caller removes it)."""
    import torch

    from shoptune.models import load, resolve
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="shoptune-merged-"))
    mdl, tok = load(model, adapter=str(adapter), dtype="fp32")
    merged = mdl.merge_and_unload().to(torch.float32)
    merged.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    base = resolve(model)
    for extra in ("chat_template.jinja", "generation_config.json"):
        if (base / extra).is_file() and not (out / extra).exists():
            shutil.copy2(base / extra, out / extra)
    from shoptune._io import default_modes
    return default_modes(out)  # (safetensors writes 0600: the engine may run as another user)
