"""The training config: one typed schema, YAML in, ``key=value`` overrides on the command line.

    shoptune train configs/train/smoke.yaml output_dir=runs/smoke lora.r=32 max_steps=40
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shoptune.configfile import ConfigError, load
from shoptune.train.mixture import MixtureConfig

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)  # > 0 costs ~1.4x step time on CPU (#14)
    target_modules: Literal["attention", "attention+mlp"] | list[str] = "attention+mlp"
    use_rslora: bool = False

    def modules(self) -> list[str]:
        if self.target_modules == "attention":
            return ATTENTION
        if self.target_modules == "attention+mlp":
            return ATTENTION + MLP
        return list(self.target_modules)


class PolySettings(BaseModel):
    """``peft: poly``: peft's Poly / Multi-Head Routing adapter, an inventory of ``n_skills`` LoRA
    skills per layer (each of rank ``lora.r``) mixed by a learned routing per task or capability;
    ``n_splits`` > 1 routes each of that many slices of a layer on its own (MHR). Trainable
    parameters: ``n_skills`` times a rank-``lora.r`` LoRA (plus the tiny router), so 4 skills of
    r=8 cost what one r=32 LoRA costs. ``lora.alpha``/``dropout`` do not apply (Poly scales by 1/r)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_skills: int = Field(default=4, ge=1)
    n_splits: int = Field(default=1, ge=1)
    route_by: Literal["task", "capability"] = "task"
    # peft's Poly scales its update by 1/r (LoRA's alpha/r with alpha = 1). ``alpha`` gives it
    # LoRA's alpha/r instead, through the equivalent reparametrisation under AdamW: the skills'
    # A and B are sqrt(alpha) times the alpha/r model's (A initialised x sqrt(alpha); B starts at
    # 0), their gradients are multiplied by sqrt(alpha) (so gradient clipping sees the alpha/r
    # model's gradients) and they train at sqrt(alpha) x the learning rate with weight decay /
    # sqrt(alpha); the router keeps the learning rate. The same trajectory as a Poly scaled by
    # alpha/r, up to float rounding (a test trains both). None: peft's plain Poly.
    alpha: float | None = Field(default=None, gt=0)
    # "scaled": how poly.alpha trained before 2026-12-07 (the committed capacity runs): the whole
    # adapter, router included, at sqrt(alpha) x the learning rate and no gradient scaling, so the
    # router learned sqrt(alpha) x faster than in the alpha/r model (and clipping saw the skills'
    # gradients 1/sqrt(alpha) as large). Kept to reproduce those runs.
    router_lr: Literal["base", "scaled"] = "base"


class CurriculumSettings(BaseModel):
    """Three-stage training (arXiv 2411.03644): filter tasks, high-resource first, then all."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # tasks below this many training rows are low-resource
    low_resource_rows: int = Field(default=200, ge=0)
    probe_batches: int = Field(default=2, ge=1)  # batches per task for the gradient-similarity probe
    # tasks whose gradient cosine to the others is below: excluded
    min_transfer: float = Field(default=0.0, ge=-1, le=1)
    stage2_fraction: float = Field(default=0.5, gt=0, lt=1)  # share of max_steps for stage 2
    low_resource_weight: float = Field(default=2.0, gt=0)  # loss weight of low-resource tasks in stage 3
    eval_every: int = Field(default=10, ge=1)  # stage 3: per-task validation loss every N steps
    # stop a task after more than this many evaluations without improvement (0: at the first)
    patience: int = Field(default=2, ge=0)
    val_rows_per_task: int = Field(default=16, ge=1)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str = "smollm2-135m"
    output_dir: str = "runs/train"
    mixture: MixtureConfig = MixtureConfig()
    protocol: Literal["starter-kit", "chat"] = "starter-kit"
    lora: LoraSettings = LoraSettings()
    peft: Literal["lora", "poly"] = "lora"  # poly: task-routed LoRA experts (see PolySettings)
    poly: PolySettings = PolySettings()
    # how the groups' losses are combined (shoptune.train.balancing): static = token mean
    loss_balancing: Literal["static", "equal", "uncertainty", "upgrad"] = "static"
    balance_by: Literal["capability", "task"] = "capability"
    balance_lr: float = Field(default=0.01, gt=0, le=1)  # uncertainty: the log-variances' learning rate
    curriculum: Literal["none", "three-stage"] = "none"
    three_stage: CurriculumSettings = CurriculumSettings()
    max_steps: int = Field(default=100, ge=1)
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16)
    bf16: Literal["auto", True, False] = "auto"  # bf16 autocast; auto = where the CPU/GPU has native bf16
    # the frozen base weights: stored in bf16 when training in bf16 (LoRA weights and optimizer
    # state stay fp32; the same products autocast computes, without re-casting every step)
    base_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    answer_logits_only: bool = True  # run the LM head only where the loss is (identical loss)
    # torch.compile the decoder layers (shoptune.compiling): on, off, or auto = on where it was
    # measured to pay on this kind of machine (and a C++ compiler is found)
    compile: Literal["auto", "on", "off"] = "auto"
    torch_compile: bool = False  # former name of `compile: on` (older configs and run keys)
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = Field(default=5, ge=1)
    save_steps: int = Field(default=50, ge=1)
    save_total_limit: int = Field(default=2, ge=1)
    eval_steps: int = Field(default=0, ge=0)  # 0: no periodic evaluation during training
    eval_samples: int = Field(default=32, ge=1)  # validation questions scored with the evaluation engine
    eval_data: list[str] = []  # extra evaluation files at the end (e.g. shopbench-dev)
    report_to: list[str] = ["tensorboard"]
    # QLoRA: the frozen base's decoder Linear layers stored 4-bit (nf4, double-quantized) or 8-bit
    # by bitsandbytes, LoRA trained on top in fp32; the adapter is a plain LoRA for the unquantized base
    quantization: Literal["none", "nf4", "int8"] = "none"
    # padding-free: each batch's examples concatenated into one row, attention kept within each
    # example (train/packing.py); same loss and gradients as the padded batch, no pad FLOPs
    packing: bool = False

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as booleans

    @model_validator(mode="after")
    def _methods_combine(self) -> "TrainConfig":
        if self.torch_compile:
            if self.compile == "off":
                raise ValueError("torch_compile: true (the former name of compile: on) contradicts compile: off")
            self.compile = "on"
        if self.compile == "on" and self.packing:
            raise ValueError("compile: on with packing: true: a packed batch runs attention once per "
                             "example (one shape per example length), which a compiled layer cannot hold "
                             "to a few graphs; use one of them (compile: auto leaves packed runs eager)")
        if self.compile == "on" and self.quantization != "none":
            raise ValueError(f"compile: on with quantization: {self.quantization}: bitsandbytes' k-bit "
                             "layers are not compiled; use compile: off (auto leaves them eager)")
        if self.curriculum == "three-stage" and self.peft != "lora":
            raise ValueError("peft: poly cannot be combined with curriculum: three-stage")
        if self.curriculum == "three-stage" and self.loss_balancing != "static":
            raise ValueError(f"loss_balancing: {self.loss_balancing} cannot be combined with "
                             "curriculum: three-stage (it sets its own task weights)")
        if self.peft == "poly" and (self.eval_steps or self.eval_data):
            raise ValueError("peft: poly: evaluate its exported experts (`shoptune export experts`), "
                             "not with eval_steps / eval_data during training")
        if self.peft == "poly" and (self.lora.use_rslora or self.lora.dropout):
            raise ValueError("peft: poly has no rsLoRA scaling or dropout (lora.use_rslora, lora.dropout)")
        if self.peft == "poly" and self.packing:
            raise ValueError("peft: poly routes each batch row to one task; packing: true puts several "
                             "examples in one row")
        if self.peft == "poly" and self.quantization != "none":
            raise ValueError(f"peft: poly adapts plain Linear layers only (peft), not quantization: "
                             f"{self.quantization}")
        return self

    @field_validator("output_dir")
    @classmethod
    def _output_dir_is_a_folder(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        p = Path(v)
        for q in (p, *p.parents):
            if q.exists() and not q.is_dir():
                raise ValueError(f"{q} exists and is not a folder")
        return v


# Options added after experiment runs were first keyed (shoptune.experiment.spec.run_key). At
# their defaults they change nothing, so a run's key leaves them out: runs finished before an
# option existed keep their key and are not trained again. A new option whose default is
# behaviour-neutral belongs here; one whose default changes training must not. The values are
# written out (not read from the fields) so that changing a default later cannot make new runs
# hash like old ones trained under the old default; a test checks they equal today's defaults.
KEY_NEUTRAL_DEFAULTS = {
    "peft": "lora",
    "poly": {"n_skills": 4, "n_splits": 1, "route_by": "task", "alpha": None, "router_lr": "base"},
    "loss_balancing": "static",
    "balance_by": "capability",
    "balance_lr": 0.01,
    "quantization": "none",
    "packing": False,
    "compile": "auto",  # how fast a step runs, not what it trains (rounding aside)
}


def key_config(config: dict) -> dict:
    """A config dict as a run key sees it: ``poly.router_lr`` is left out where it changes nothing
    (no ``poly.alpha``) or where it is the behaviour from before it existed (``scaled``), so the
    keys of runs finished before it stay what they were; then the options at their
    :data:`KEY_NEUTRAL_DEFAULTS` are left out."""
    cfg = dict(config)
    poly = cfg.get("poly")
    if isinstance(poly, dict) and "router_lr" in poly and (poly.get("alpha") is None or poly["router_lr"] == "scaled"):
        cfg["poly"] = {k: v for k, v in poly.items() if k != "router_lr"}
    neutral = {**KEY_NEUTRAL_DEFAULTS,
               "poly": {k: v for k, v in KEY_NEUTRAL_DEFAULTS["poly"].items() if k != "router_lr"}}
    return {k: v for k, v in cfg.items() if not (k in neutral and v == neutral[k])}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) plus ``key=value`` overrides (values parsed as YAML: 32, true, [a,b]);
    :class:`ConfigError` with one line per problem (``file[:line]: field: why (got X)``)."""
    if path and not (Path(path).exists() or Path(path).is_symlink()):  # (a loop: its reader says so)
        raise FileNotFoundError(f"{path}: no such config")
    return load(TrainConfig, path, overrides, what="training config")


__all__ = ["ConfigError", "TrainConfig", "LoraSettings", "PolySettings", "CurriculumSettings", "load_config"]
