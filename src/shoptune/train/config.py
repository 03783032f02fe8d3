"""The training config: one typed schema, YAML in, ``key=value`` overrides on the command line.

    shoptune train configs/train/smoke.yaml output_dir=runs/smoke lora.r=32 max_steps=40
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from shoptune.train.mixture import MixtureConfig

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


class LoraSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    r: int = Field(default=16, ge=1)
    alpha: float = 32.0
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["attention", "attention+mlp"] | list[str] = "attention+mlp"
    use_rslora: bool = False

    def modules(self) -> list[str]:
        if self.target_modules == "attention":
            return ATTENTION
        if self.target_modules == "attention+mlp":
            return ATTENTION + MLP
        return list(self.target_modules)


class CurriculumSettings(BaseModel):
    """Three-stage training (arXiv 2411.03644): filter tasks, high-resource first, then all."""
    model_config = ConfigDict(extra="forbid")
    low_resource_rows: int = 200  # tasks below this many training rows are low-resource
    probe_batches: int = 2  # batches per task for the gradient-similarity probe
    min_transfer: float = 0.0  # tasks whose gradient cosine to the others is below: excluded
    stage2_fraction: float = Field(default=0.5, gt=0, lt=1)  # share of max_steps for stage 2
    low_resource_weight: float = 2.0  # loss weight of low-resource tasks in stage 3
    eval_every: int = 10  # stage 3: per-task validation loss every N steps
    patience: int = 2  # stop a task after this many evaluations without improvement
    val_rows_per_task: int = 16


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2-135m"
    output_dir: str = "runs/train"
    mixture: MixtureConfig = MixtureConfig()
    protocol: Literal["starter-kit", "chat"] = "starter-kit"
    lora: LoraSettings = LoraSettings()
    curriculum: Literal["none", "three-stage"] = "none"
    three_stage: CurriculumSettings = CurriculumSettings()
    max_steps: int = Field(default=100, ge=1)
    learning_rate: float = 5e-4
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = 0.0
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16)
    bf16: Literal["auto", True, False] = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 50
    save_total_limit: int = 2
    eval_steps: int = 0  # 0: no periodic evaluation during training
    eval_samples: int = 32  # validation questions scored with the evaluation engine
    eval_data: list[str] = []  # extra evaluation files at the end (e.g. shopbench-dev)
    report_to: list[str] = ["tensorboard"]


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"override {key}: {p} is not a section")
    d[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (optional) plus ``key=value`` overrides (values parsed as YAML: 32, true, [a,b])."""
    data = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such config")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a config must be a YAML mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v))
    return TrainConfig(**data)
