"""Memory planner: what one training process needs, from the model's ``config.json`` alone.

    shoptune train configs/train/gpu/qwen2.5-7b-qlora.yaml --plan --gpu l4-24g
    shoptune train configs/train/gpu/qwen2.5-7b-lora.yaml --plan --gpu a100-80g --gpus 4 \
        --accelerate configs/accelerate/fsdp.yaml

Plain functions, no weights loaded, nothing trained. Every figure is bytes per process and models
what *this* recipe does (``train/trainer.py:build_model``, ``train/quant.py``), not a generic rule:

- weights: LoRA keeps the decoder's Linear weights in the training dtype (bf16 under bf16
  autocast) and embeddings, LM head and norms in fp32; QLoRA stores those Linear weights nf4 with
  double-quantized block constants (0.516 byte/param) or int8, and peft's
  ``prepare_model_for_kbit_training`` makes everything else fp32; a full fine-tune (for
  comparison; the recipe trains adapters) keeps fp32 weights under autocast.
- trainable weights (LoRA: r x (in + out) per adapted Linear), their gradients and AdamW's two
  moments: 4 + 4 + 8 bytes per trainable parameter.
- activations: bytes saved for backward per token and decoder layer, counted from what the
  implementation saves (norm inputs in fp32, q/k/v/output of attention, the MLP's gate/up/SiLU
  outputs, each adapted Linear's input and LoRA-A output; ``tests/train/test_plan.py`` traces a
  real layer with ``saved_tensors_hooks`` and compares), times layers (with gradient
  checkpointing: each layer's input, plus one layer recomputed), plus one layer's worth of
  gradient buffers during backward; flash/SDPA attention saves no seq x seq matrix.
- logits: the 49k-150k-wide LM head runs only at answer positions (``answer_logits_only``); the
  answer share of tokens is an assumption (``answer_fraction``), printed with the plan.
- batches: the worst case, ``batch_size x max_length`` tokens (packing removes padding but not
  this bound).
- sharding (accelerate config): FSDP divides weights, gradients and optimizer state by the
  number of processes and adds two unsharded layers in flight; ZeRO-2 divides gradients and
  optimizer state; DDP adds one gradient bucket copy.
- a GPU adds its CUDA context and workspaces (0.75 GiB assumed) and keeps 5% for allocator
  fragmentation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1024 ** 3
ARCHS = Path(__file__).parent / "archs"
# shipped copies of public config.json files (archs/README.md names each source)
KNOWN = {"Qwen/Qwen2.5-7B-Instruct": "Qwen2.5-7B-Instruct.json",
         "Qwen/Qwen2.5-14B-Instruct": "Qwen2.5-14B-Instruct.json",
         "Qwen/Qwen2.5-72B-Instruct": "Qwen2.5-72B-Instruct.json",
         "meta-llama/Llama-3.1-8B-Instruct": "Llama-3.1-8B-Instruct.json",
         "meta-llama/Llama-2-7b-hf": "Llama-2-7b-hf.json",
         "HuggingFaceTB/SmolLM2-135M-Instruct": "SmolLM2-135M-Instruct.json",
         "smollm2-135m": "SmolLM2-135M-Instruct.json"}


@dataclass(frozen=True)
class Gpu:
    name: str
    mib: int  # total memory as nvidia-smi reports it
    bf16: bool


GPUS = {g.name: g for g in [
    Gpu("h200-141g", 143771, True), Gpu("h100-80g", 81559, True), Gpu("a100-80g", 81920, True),
    Gpu("a100-40g", 40960, True), Gpu("l40s-48g", 46068, True), Gpu("a6000-48g", 49140, True),
    Gpu("rtx4090-24g", 24564, True), Gpu("rtx3090-24g", 24576, True), Gpu("a10g-24g", 23028, True),
    Gpu("l4-24g", 23034, True), Gpu("v100-32g", 32768, False), Gpu("t4-16g", 15360, False)]}
CUDA_CONTEXT = 0.75 * GiB  # CUDA context + cuBLAS/cuDNN workspaces (assumption, typical 0.5-1 GiB)
FRAGMENTATION = 0.05       # share of the GPU the caching allocator cannot hand out
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Arch:
    """The sizes a decoder-only Llama/Qwen2-style model's memory depends on."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each Linear in one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def params(self) -> dict[str, int]:
        linear = self.layers * sum(a * b for a, b in self.linears().values())
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        norms = self.layers * 2 * self.hidden + self.hidden
        embed = self.vocab * self.hidden
        head = 0 if self.tied else embed
        return {"linear": linear, "bias": bias, "norms": norms, "embed": embed, "head": head,
                "total": linear + bias + norms + embed + head}


def arch_from_config(cfg: dict, name: str = "model") -> Arch:
    """An :class:`Arch` from a Hugging Face ``config.json`` (Llama, Qwen2, Mistral-style).
    ValueError for a size field that is missing or not a whole number >= 1 (a plan from a zero
    or negative size would "fit" everywhere)."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{name}: config.json is not a JSON object")

    def size(key: str, default=None) -> int:
        v = cfg.get(key) if cfg.get(key) is not None else default
        if v is None:
            raise ValueError(f"{name}: config.json lacks the decoder size field {key!r}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: config.json: {key} must be a whole number >= 1 (got {v!r})")
        return v
    heads, hidden = size("num_attention_heads"), size("hidden_size")
    return Arch(name=name, hidden=hidden, intermediate=size("intermediate_size"),
                layers=size("num_hidden_layers"), heads=heads,
                kv_heads=size("num_key_value_heads", heads),
                head_dim=size("head_dim", hidden // heads or None), vocab=size("vocab_size"),
                tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=cfg.get("model_type") == "qwen2" or bool(cfg.get("attention_bias", False)))


def load_arch(model: str) -> Arch:
    """A shipped architecture (``Qwen/Qwen2.5-7B-Instruct``, ..., the embedded ``smollm2-135m``)
    or any local folder / file with a ``config.json``; never weights, never the network."""
    p = Path(model)
    if model in KNOWN:
        path = ARCHS / KNOWN[model]
    elif (p / "config.json").is_file():
        path = p / "config.json"
    elif p.is_file() and p.suffix == ".json":
        path = p
    else:
        raise ValueError(f"{model}: no config.json for the planner; known: {', '.join(KNOWN)}, "
                         "or a local model folder")
    from shoptune._io import CONFIG_CAP, read_json
    try:  # (bounded: a regular file of at most 1 MiB, JSON depth and integer size)
        cfg = read_json(path, "model config.json", CONFIG_CAP)
    except OSError as e:
        raise ValueError(f"{path}: unreadable config.json ({e.strerror or e})") from None
    return arch_from_config(cfg, model)


@dataclass
class Setup:
    """What a run does, in the planner's terms (``setup_from_config`` fills it from a TrainConfig)."""
    method: str = "lora"               # lora | qlora | full
    quantization: str = "none"         # none | nf4 | int8 (qlora)
    r: int = 16
    targets: tuple[str, ...] = ATTENTION + MLP
    batch_size: int = 8
    max_length: int = 512
    packing: bool = False
    checkpointing: bool = False
    bf16: bool = True
    answer_logits_only: bool = True
    answer_fraction: float = 0.1       # share of tokens that are answer tokens (an assumption)
    sharding: str = "none"             # none | ddp | fsdp | zero2
    processes: int = 1
    notes: list[str] = field(default_factory=list)


def lora_params(arch: Arch, r: int, targets) -> int:
    return arch.layers * sum(r * (a + b) for m, (a, b) in arch.linears().items() if m in targets)


def activation_bytes_per_token_layer(arch: Arch, s: Setup) -> float:
    """Bytes one decoder layer saves for backward per token (no checkpointing)."""
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    p = 2 if s.bf16 else 4                      # matmul outputs under autocast / fp32
    mlp_p = 4 if s.method == "qlora" else p     # bitsandbytes returns its input's dtype (fp32)
    b = 2 * h * 4 + 2 * 4                       # both RMSNorms keep their fp32 input + rsqrt
    b += (2 * q + 2 * kv) * p + arch.heads * 4  # attention: q, k, v, output (+ logsumexp)
    b += 3 * i * mlp_p                          # gate out, up out, SiLU(gate)
    targets = ATTENTION + MLP if s.method == "full" else s.targets
    dims = arch.linears()
    if s.bf16:  # autocast casts each adapted Linear's input once more, per Linear
        b += sum(dims[m][0] * 2 for m in targets)
    else:       # fp32: one input tensor per group; o_proj's input is attention's saved output
        b += 4 * (h * any(m in targets for m in ("q_proj", "k_proj", "v_proj"))
                  + h * any(m in targets for m in ("gate_proj", "up_proj"))
                  + i * ("down_proj" in targets))
    if s.method != "full":
        b += len([m for m in targets if m in dims]) * s.r * p  # LoRA-A outputs
    return b


def estimate(arch: Arch, s: Setup) -> dict[str, float]:
    """Bytes per process, by part (see the module docstring for what each part holds)."""
    pc = arch.params()
    other = pc["embed"] + pc["head"] + pc["norms"]
    n = s.processes if s.sharding in ("fsdp", "zero2", "ddp") else 1
    if s.method == "full":
        weights, trainable = pc["total"] * 4, pc["total"]
    else:
        trainable = lora_params(arch, s.r, s.targets)
        if s.method == "qlora":
            per = NF4_BYTES if s.quantization == "nf4" else 1
            weights = pc["linear"] * per + (pc["bias"] + other) * 4
        else:
            weights = (pc["linear"] + pc["bias"]) * (2 if s.bf16 else 4) + other * 4
        weights += trainable * 4
    grads, optim = trainable * 4, trainable * 8
    # autocast: bf16 copies of trainable fp32 weights are cached for the forward; frozen fp32
    # weights (the LM head) are cast per use (one at a time)
    casts = (trainable * 2 + arch.vocab * arch.hidden * 2) if s.bf16 else 0
    out = {"weights": weights, "gradients": grads, "optimizer": optim, "autocast copies": casts}
    if s.sharding == "fsdp":
        layer = (arch.params()["linear"] // arch.layers) * (2 if s.bf16 else 4)
        for k in ("weights", "gradients", "optimizer"):
            out[k] /= n
        out["fsdp gather buffers"] = 2 * layer
    elif s.sharding == "zero2":
        out["gradients"] /= n
        out["optimizer"] /= n
    elif s.sharding == "ddp" and n > 1:
        out["ddp gradient buckets"] = grads
    tokens = s.batch_size * s.max_length
    per_layer = activation_bytes_per_token_layer(arch, s)
    if s.checkpointing:  # each layer keeps its (fp32) input; one layer is recomputed at a time
        act = tokens * (arch.layers * arch.hidden * 4 + per_layer)
    else:
        act = tokens * arch.layers * per_layer
    act += tokens * (2 * arch.hidden * 4 + 2 * arch.head_dim * 4)  # final norm, RoPE cos/sin
    out["activations"] = act
    out["backward buffers"] = tokens * (per_layer + 2 * arch.hidden * 4)
    rows = math.ceil(tokens * s.answer_fraction) if s.answer_logits_only else tokens
    out["logits + loss"] = rows * arch.vocab * (12 + (2 if s.bf16 else 0))
    return out


def total(parts: dict[str, float]) -> float:
    return sum(parts.values())


def fits(parts: dict[str, float], gpu: Gpu) -> tuple[bool, float]:
    """(fits, bytes available for training on one such GPU after context and fragmentation)."""
    usable = gpu.mib * 1024 ** 2 * (1 - FRAGMENTATION) - CUDA_CONTEXT
    return total(parts) <= usable, usable


# accelerate's distributed types the planner models: data parallel (one full copy per process),
# FSDP, DeepSpeed ZeRO-2; the others (XLA, Megatron-LM tensor parallelism) it does not
_DATA_PARALLEL = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA", "MULTI_MUSA",
                  "MULTI_XPU", "MULTI_HPU", "MULTI_NEURON"}


def read_accelerate(path: str | Path | None) -> tuple[str, int]:
    """(sharding, processes) from an accelerate config file (None: one process). ValueError,
    naming ``file:line: key``, for a ``distributed_type`` accelerate does not have or the planner
    does not model, a ``num_processes`` that is not a whole number >= 1, a ``deepspeed_config``
    that is not a mapping, a ZeRO stage other than 2."""
    if path is None:
        return "none", 1
    from accelerate.utils import DistributedType

    from shoptune.configfile import read_yaml
    cfg, lines = read_yaml(path, what="accelerate config")

    def bad(key: tuple, why: str) -> ValueError:
        line = lines.get(key)
        return ValueError(f"{path}{f':{line}' if line else ''}: {'.'.join(key)}: {why}")
    kind = cfg.get("distributed_type", "NO")
    known = [t.value for t in DistributedType]
    if not isinstance(kind, str) or kind.upper() not in known:
        raise bad(("distributed_type",), f"{kind!r} is not one of accelerate's ({', '.join(known)})")
    kind = kind.upper()
    if kind not in _DATA_PARALLEL | {"FSDP", "DEEPSPEED"}:
        raise bad(("distributed_type",), f"{kind}: the planner models data parallel (NO, MULTI_GPU, "
                                         "MULTI_CPU, ...), FSDP and DEEPSPEED (ZeRO-2) only")
    n = cfg.get("num_processes", 1)
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad(("num_processes",), f"must be a whole number >= 1 (got {n!r})")
    if kind == "FSDP":
        return "fsdp", n
    if kind == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        if not isinstance(ds, dict):
            raise bad(("deepspeed_config",), f"must be a mapping (zero_stage: 2, ...), not a "
                                             f"{type(ds).__name__}")
        stage = ds.get("zero_stage", 0)
        if stage != 2 or isinstance(stage, bool):
            raise bad(("deepspeed_config", "zero_stage"), f"ZeRO stage {stage!r}: the planner models "
                                                          "stage 2 (the shipped config)")
        return "zero2", n
    return ("ddp", n) if n > 1 else ("none", 1)


def setup_from_config(cfg, *, gpu: Gpu | None = None, processes: int | None = None,
                      accelerate: str | Path | None = None, answer_fraction: float = 0.1) -> Setup:
    """The planner's view of a TrainConfig (bf16 ``auto`` resolved for the target GPU, or for
    this machine when no GPU is named). ValueError for what it does not model (``peft: poly``)."""
    if cfg.peft != "lora":
        raise ValueError(f"--plan: peft: {cfg.peft} is not modelled (the planner counts LoRA and "
                         "QLoRA adapters); plan the run with peft=lora for the frozen base, "
                         "activations and logits, which a Poly adapter shares")
    from shoptune.train.trainer import use_bf16
    bf16 = (gpu.bf16 if cfg.bf16 == "auto" else bool(cfg.bf16)) if gpu else use_bf16(cfg.bf16)
    if cfg.base_dtype == "fp32":
        bf16 = False if cfg.quantization == "none" else bf16
    sharding, n = read_accelerate(accelerate)
    if processes is not None:
        n = processes
        sharding = sharding if sharding != "none" else ("ddp" if n > 1 else "none")
    s = Setup(method="qlora" if cfg.quantization != "none" else "lora", quantization=cfg.quantization,
              r=cfg.lora.r, targets=tuple(cfg.lora.modules()), batch_size=cfg.batch_size,
              max_length=cfg.max_length, packing=cfg.packing,
              checkpointing=cfg.gradient_checkpointing,
              bf16=bf16, answer_logits_only=cfg.answer_logits_only, answer_fraction=answer_fraction,
              sharding=sharding, processes=n)
    if s.method == "qlora" and sharding == "fsdp":
        s.sharding = "ddp"
        s.notes.append("QLoRA is not sharded by FSDP here (configs/accelerate/fsdp.yaml): counted as DDP")
    if s.packing:
        s.notes.append("packing removes padding; the worst case (batch_size x max_length tokens) is unchanged")
    return s


__all__ = ["Arch", "Gpu", "GPUS", "Setup", "arch_from_config", "load_arch", "lora_params",
           "activation_bytes_per_token_layer", "estimate", "total", "fits", "read_accelerate",
           "setup_from_config"]
