"""The memory planner's verdicts for 7B/14B/72B models on common GPUs, as a Markdown table
(docs/scaling.md). Reads only the shipped config.json copies; no weights, no GPU.

    .venv/bin/python benchmarks/plan_table.py

Each row is a GPU recipe (configs/train/gpu/) with ``model=`` and the listed overrides, planned
exactly as ``shoptune train RECIPE --plan --gpu G [--gpus N --accelerate A]`` plans it.
"""
from __future__ import annotations

from shoptune import REPO_CONFIGS
from shoptune.train.config import load_config
from shoptune.train.plan import GPUS, GiB, estimate, fits, load_arch, setup_from_config, total

MODELS = ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-14B-Instruct", "Qwen/Qwen2.5-72B-Instruct"]
COLUMNS = ["l4-24g", "a100-40g", "a100-80g", "h100-80g", "h200-141g"]
FSDP = REPO_CONFIGS / "accelerate" / "fsdp.yaml"
ROWS = [  # (label, recipe, overrides, processes, accelerate config)
    ("QLoRA nf4, checkpointing", "qwen2.5-7b-qlora.yaml", [], None, None),
    ("QLoRA nf4, checkpointing, batch 2", "qwen2.5-7b-qlora.yaml", ["batch_size=2", "grad_accum=4"], None, None),
    ("bf16 LoRA", "qwen2.5-7b-lora.yaml", [], None, None),
    ("bf16 LoRA, checkpointing", "qwen2.5-7b-lora.yaml", ["gradient_checkpointing=true"], None, None),
    ("bf16 LoRA, checkpointing, FSDP x 8", "qwen2.5-7b-lora.yaml", ["gradient_checkpointing=true"], 8, "fsdp"),
]


def table() -> list[str]:
    lines = ["| model | setup (r=32 on every Linear, 8 x 512 tokens unless said) | GiB per GPU | "
             + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---|" * len(COLUMNS)]
    for model in MODELS:
        arch = load_arch(model)
        for label, recipe, overrides, n, acc in ROWS:
            cfg = load_config(REPO_CONFIGS / "train" / "gpu" / recipe, [f"model={model}", *overrides])
            cells, size = [], None
            for g in COLUMNS:
                s = setup_from_config(cfg, gpu=GPUS[g], processes=n,
                                      accelerate=FSDP if acc == "fsdp" else None)
                parts = estimate(arch, s)
                size = total(parts)
                ok, _ = fits(parts, GPUS[g])
                cells.append("fits" if ok else "-")
            lines.append(f"| {model.split('/')[-1]} | {label} | {size / GiB:.1f} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    print("\n".join(table()))
