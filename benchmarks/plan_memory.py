"""The memory planner (``shoptune train CONFIG --plan``) against measured CPU peak memory.

    .venv/bin/python benchmarks/plan_memory.py [--batch-size 2] [--max-length 512] [--steps 2]
        [--answer-fraction 0.1] [--config configs/train/demo.yaml] [--out FILE.json] [key=value ...]

Trains ``--steps`` steps of the recipe (its own ``build_model`` / ``make_trainer``, the config's
LoRA, precision, packing, checkpointing) on rows of exactly ``--max-length`` random tokens whose
last ``--answer-fraction`` are answer tokens: the planner's worst case (``batch_size x
max_length`` tokens, the same answer share), so both sides count the same tokens.

Measured: the process's peak resident memory during training (``VmHWM``, reset through
``/proc/self/clear_refs`` once the model is built) minus its resident memory before the model
was loaded. The process re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` set so glibc hands
every freed tensor of 128 KiB or more back to the system at once; resident memory then follows
the tensors alive, not what the allocator keeps. Prints one JSON object (measured, planned,
ratio, the plan's parts).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
from pathlib import Path

MMAP_THRESHOLD = str(128 * 1024)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def synthetic_examples(n: int, length: int, answer_fraction: float, vocab: int, seed: int = 0) -> list[dict]:
    import torch
    g = torch.Generator().manual_seed(seed)
    answer = math.ceil(length * answer_fraction)
    out = []
    for _ in range(n):
        ids = torch.randint(100, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer:], "task_id": 0})
    return out


def measure(config: str, overrides: list[str], batch_size: int, max_length: int, steps: int,
            answer_fraction: float) -> dict:
    import torch  # noqa: F401  (imported before the baseline, like everything but the model)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from shoptune.models import load_tokenizer
    from shoptune.train.config import load_config
    from shoptune.train.plan import GiB, estimate, load_arch, setup_from_config, total
    from shoptune.train.trainer import base_weights_dtype, build_model, make_trainer

    out = Path(tempfile.mkdtemp(prefix="plan_memory-"))
    cfg = load_config(config, [*overrides, f"output_dir={out / 'run'}", f"batch_size={batch_size}",
                               f"max_length={max_length}", f"max_steps={steps}", "grad_accum=1",
                               "report_to=[]", "save_steps=100000", "logging_steps=1", "eval_steps=0"])
    load_tokenizer(cfg.model)
    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    model, tok = build_model(cfg.model, cfg.lora, base_dtype=base_weights_dtype(cfg),
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             quantization=cfg.quantization, packing=cfg.packing)
    examples = synthetic_examples(batch_size * steps, max_length, answer_fraction, len(tok))
    trainer = make_trainer(cfg, model, tok, examples, ["synthetic"], out / "run", steps, None)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    trainer.train()
    peak = _status_kib("VmHWM") * 1024
    setup = setup_from_config(cfg, answer_fraction=answer_fraction)
    parts = estimate(load_arch(cfg.model), setup)
    measured, planned = peak - baseline, total(parts)
    return {"config": str(config), "overrides": overrides, "model": cfg.model, "batch_size": batch_size,
            "max_length": max_length, "steps": steps, "answer_fraction": answer_fraction,
            "bf16": setup.bf16, "measured_gib": round(measured / GiB, 3), "planned_gib": round(planned / GiB, 3),
            "planned_over_measured": round(planned / measured, 3),
            "plan_parts_gib": {k: round(v / GiB, 3) for k, v in parts.items()}}


def main(argv: list[str] | None = None) -> None:
    from shoptune import REPO_CONFIGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(REPO_CONFIGS / "train" / "demo.yaml"))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--answer-fraction", type=float, default=0.1)
    ap.add_argument("--out", help="also write the result, with the machine and command, as JSON here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])
    res = measure(a.config, a.overrides, a.batch_size, a.max_length, a.steps, a.answer_fraction)
    print(json.dumps(res))
    if a.out:
        from shoptune import machine
        from shoptune._io import write_json
        write_json(Path(a.out), {"machine": machine.describe(),
                                 "command": " ".join(["benchmarks/plan_memory.py", *sys.argv[1:]]), **res})


if __name__ == "__main__":
    main()
