"""``compile: auto|on|off``: torch.compile for the training step and the built-in engine (#35).

    shoptune train configs/train/demo.yaml compile=on
    shoptune eval --model smollm2-135m --suite core --out runs/e --compile on
    shoptune serve --compile on

Regional compilation: each decoder layer is compiled in place (``nn.Module.compile``). Every
layer runs the same code with its weights as graph inputs, so dynamo and inductor compile one
layer's graph and reuse it for all of them: compile time is one layer's, not the whole model's
(``torch.compile(model)`` did not finish compiling the variable-length LoRA step in 14 minutes on
2 cores). The model keeps its parameter names (no ``_orig_mod.`` wrapper), so checkpoints,
adapters, exact resume and peft's per-row adapters see the model they always saw.

Sequence lengths vary from batch to batch; the layers are compiled with a dynamic sequence
dimension after the first shape change (dynamo's automatic dynamic shapes), so a run compiles a
handful of graphs, not one per length.

Inductor's caches (FX graphs, AOTAutograd, compiled kernels) live under the project's cache folder
(``$SHOPTUNE_CACHE_DIR/inductor``), so a second run on the same machine starts warm. Random ops
use aten's generators (``fallback_random``): a compiled step draws the same numbers as an eager
one (LoRA dropout, Poly's relaxed-Bernoulli routing), and checkpoints' RNG states mean the same.
Under bf16 autocast, fused kernels round their intermediates to bf16 where eager's separate ops
would (``emulate_precision_casts``): without it a fused kernel keeps them in fp32, and a 50-step
loss trajectory drifted 0.0148 (mean |delta|) from eager's; with it 0.0055, at no cost the runs
resolve (docs/results/train_speed.md: the drift was eager's rounding; the fused fp32 kernels
were nearer an fp32 run, but a run should not depend on whether it was compiled).

``auto`` turns compilation on only where it was measured to pay on this kind of machine
(:data:`MEASURED`, from ``benchmarks/train_speed.py`` and ``benchmarks/eval_engines.py``; see
docs/results/train_speed.md), and never without a C++ compiler.
"""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

SETTINGS = ("auto", "on", "off")

# Where compiling was measured to pay (True) or not (False), per use and machine kind
# (:func:`machine_kind`). Kinds missing here were not measured: ``auto`` leaves them off.
MEASURED: dict[str, dict[str, bool]] = {
    # docs/results/train_speed.compiled.json (2026-12-07): 1.0-1.2x tokens/s (three estimates in
    # one run) after a 69 s compile, the loss trajectory 0.0055 from eager's (target 1.8x): off
    "train": {"avx512_bf16": False},
    # docs/results/eval_compile.json (2026-12-07): a core-suite pass 1.01x eager's including a
    # 58 s compile, 1.16x once compiled, the same answers in fp32 (target 1.3x): off (a short
    # evaluation would pay the minute for nothing)
    "eval": {"avx512_bf16": False},
}


class CompileUnavailable(ValueError):
    """``compile: on`` where it cannot work (no C++ compiler, a combination it cannot run)."""


def machine_kind() -> str:
    """``cuda``, ``amx`` (Intel AMX bf16), ``avx512_bf16`` (native bf16, e.g. AMD EPYC) or
    ``cpu`` (no native bf16: AVX2-only machines emulate it)."""
    import torch

    from shoptune import machine
    if torch.cuda.is_available():
        return "cuda"
    m = machine.describe()
    return "amx" if m["amx_bf16"] else "avx512_bf16" if m["avx512_bf16"] else "cpu"


def compiler_missing() -> str | None:
    """Why inductor cannot build CPU kernels here (None: it can): it needs a C++ compiler and the
    Python headers."""
    import torch
    if torch.cuda.is_available():
        return None
    from torch._inductor import config
    names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    names = [n for n in names if n] or ["g++"]
    if not any(shutil.which(n) for n in names):
        return f"no C++ compiler ({' or '.join(names)} not on PATH); inductor builds its CPU kernels with one"
    include = sysconfig.get_paths().get("include") or ""
    if not Path(include, "Python.h").exists():
        return f"no Python headers ({include}/Python.h); inductor's kernels include them"
    return None


def resolve(setting, use: str) -> bool:
    """Whether to compile for ``use`` (``train``, ``eval``, ``serve``) under ``setting``
    (auto/on/off, or a bool). ``on`` where no compiler is found raises
    :class:`CompileUnavailable`; ``auto`` is on where :data:`MEASURED` says it pays."""
    if isinstance(setting, bool):
        setting = "on" if setting else "off"
    if setting not in SETTINGS:
        raise ValueError(f"compile {setting!r}: one of {', '.join(SETTINGS)}")
    if setting == "off":
        return False
    missing = compiler_missing()
    if setting == "on":
        if missing:
            raise CompileUnavailable(f"compile: on: {missing}")
        return True
    table = MEASURED.get("eval" if use == "serve" else use, {})
    return missing is None and table.get(machine_kind(), False)


def inductor_settings() -> Path:
    """Inductor's caches under the project's cache folder (unless ``TORCHINDUCTOR_CACHE_DIR`` is
    set; returned), random ops on aten's generators, bf16 rounding as eager's (see the module
    docstring). Call before the first compiled call."""
    from torch._inductor import config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from shoptune.paths import cache_dir
    mine = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # importing torch._dynamo (transformers and peft do) writes torch's default, a per-user folder
    # in /tmp, into the environment: that value is torch's, not the user's
    if mine is None or os.path.abspath(mine) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    config.fallback_random = True
    config.emulate_precision_casts = True
    return path


def decoder_layers(model) -> list:
    """The model's decoder layers (a transformers model, or one wrapped by peft)."""
    import torch
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft -> transformers
    body = getattr(inner, "model", inner)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise CompileUnavailable(f"compile: no decoder layers found in {type(inner).__name__}")
    return list(layers)


def compile_layers(model, *, dynamic: bool | None = None, inference: bool = False) -> int:
    """Compile each decoder layer in place (see the module docstring); returns how many.
    Compiling happens at the first call of each new shape. ``inference``: also for forwards
    that carry a KV cache (prompts after the prefix cache), see :func:`_cache_updates_outside`;
    decode steps run eagerly (:func:`_decode_eagerly`)."""
    from torch._dynamo import config
    inductor_settings()
    # a few graphs per layer frame (shapes, with and without a padding mask or a KV cache), each
    # compiled once: more than dynamo's default limit of 8 before it gives up and runs eagerly
    config.recompile_limit = max(config.recompile_limit, 32)
    if inference:
        _cache_updates_outside()
        if dynamic is None:  # batch and length both vary from the first call on
            dynamic = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    if inference:
        _decode_eagerly(model)
    return len(layers)


def _decode_eagerly(model) -> None:
    """Forwards of one token per row (generation's decode steps) run the layers eagerly, the
    prompts' forwards compiled. A decode step's work is small matmuls over the weights; what
    compiling adds to it (guard checks, a graph launch per layer and per side of the eager
    KV-cache update) made a steady compiled decode step slower than an eager one, while prompt
    batches gain from fusion (docs/results/eval_engines.md). The stance is restored whatever
    the forward does (``always_call``)."""
    import torch
    stances: list = []

    def before(module, args, kwargs):
        x = next((v for v in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]) if v is not None), None)
        one_token = x is not None and x.dim() >= 2 and x.shape[1] == 1
        stances.append(torch.compiler.set_stance("force_eager") if one_token else None)

    def after(module, args, kwargs, output):
        stance = stances.pop() if stances else None
        if stance is not None:
            stance.__exit__(None, None, None)

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # (generate runs this one)
    if getattr(inner, "_shoptune_decode_eager", False):  # (compiled twice: one pair of hooks)
        return
    inner._shoptune_decode_eager = True
    inner.register_forward_pre_hook(before, with_kwargs=True)
    inner.register_forward_hook(after, with_kwargs=True, always_call=True)


def _cache_updates_outside() -> None:
    """A KV-cache update inside a compiled layer would be traced into it: transformers' cache
    indexes its per-layer list by the layer's ``layer_idx``, so dynamo would build one graph per
    layer (30 here, past its recompile limit). The update runs eagerly between the layer's
    graphs instead (``torch.compiler.disable``: whatever runs it, it is never traced), and
    integer module attributes are not specialized, so all layers share their graphs."""
    import torch
    from torch._dynamo import config
    from transformers.cache_utils import Cache
    config.allow_unspec_int_on_nn_module = True
    if not getattr(Cache.update, "_shoptune_eager", False):
        update = torch.compiler.disable(Cache.update)
        update._shoptune_eager = True
        Cache.update = update


def is_compiled(model) -> bool:
    try:
        return any(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(model))
    except CompileUnavailable:
        return False
