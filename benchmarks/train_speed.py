"""Training speed: shoptune's trainer vs TRL's SFTTrainer with its default settings, same run.

    .venv/bin/python benchmarks/train_speed.py [--steps 12] [--batch-size 8] [--max-length 256]

Same model (the embedded SmolLM2-135M), same rows (a diverse EC-Guide mixture rendered with the
same prompts), same LoRA (r=16, attention+MLP) and batch size, same precision (what `bf16: auto`
picks on this machine: TRL's own bf16 default would run bf16 autocast even on CPUs without native
bf16). Everything else is each trainer's default: shoptune groups rows of similar length
and computes the answer-only loss itself; TRL pads each batch as it comes.

Reports non-pad tokens/s for both (steps after the first two, which warm up), the ratio, and MFU:
4 x base-parameter FLOPs per token (forward 2N, backward to the activations 2N; LoRA needs no
base-weight gradients) over the matmul peak measured in this run, for bf16 and for fp32.
Writes docs/results/train_speed.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from shoptune import REPO_CONFIGS
from shoptune._io import write_json


def matmul_peak(dtype: torch.dtype, reps: int = 5) -> float:
    """Dense square matmul FLOP/s at this dtype, best of ``reps``; the size grows (up to 2048)
    until one product takes 0.2 s (bf16 without native support runs ~100x slower than fp32)."""
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        a @ b
        if n >= 2048 or time.perf_counter() - t0 > 0.2:
            break
        n *= 2
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class Clock(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


class CountingCollator:
    """Wraps a collator; records each batch's non-pad tokens."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        if "attention_mask" in batch:
            self.tokens.append(int(batch["attention_mask"].sum()))
        else:  # padding-free batches carry no mask
            self.tokens.append(int(batch["input_ids"].numel()))
        return batch


def measure(trainer, warmup: int = 2) -> dict:
    clock, counter = Clock(), CountingCollator(trainer.data_collator)
    trainer.add_callback(clock)
    trainer.data_collator = counter
    trainer.train()
    steps = len(clock.times)
    tokens = sum(counter.tokens[warmup:steps])
    seconds = clock.times[-1] - clock.times[warmup - 1]
    return {"steps_timed": steps - warmup, "non_pad_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", default="docs/results/train_speed.json")
    a = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from shoptune.eval.backends import build_prompts
    from shoptune.models import load
    from shoptune.train.config import load_config
    from shoptune.train.format import IGNORE, answer_text, encode_records
    from shoptune.train.mixture import build_mixture
    from shoptune.train.recipe import build_model, make_trainer, use_bf16

    tmp = Path(tempfile.mkdtemp(prefix="train_speed-"))
    rows = a.steps * a.batch_size
    cfg = load_config(REPO_CONFIGS / "train" / "demo.yaml", [
        f"output_dir={tmp / 'shoptune'}", f"max_steps={a.steps}", f"batch_size={a.batch_size}",
        f"max_length={a.max_length}", f"mixture.total={rows}", "report_to=[]", "save_steps=100000",
        "logging_steps=100000", "lora.r=16", "lora.alpha=32", "lora.target_modules=attention+mlp"])
    records, _ = build_mixture(cfg.mixture)
    bf16 = use_bf16(cfg.bf16)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak: bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s; "
          f"training precision: {'bf16' if bf16 else 'fp32'}", flush=True)

    # (a) shoptune
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    names = sorted({r.task for r in records})
    examples = encode_records(records, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                              task_index={t: i for i, t in enumerate(names)})
    trainer = make_trainer(cfg, model, tok, examples, names, tmp / "shoptune", a.steps, None)
    trainer.args.disable_tqdm = True
    ours = measure(trainer)
    print("shoptune:", ours, flush=True)
    del trainer, model

    # (b) TRL SFTTrainer, defaults except what must match
    prompts = build_prompts(records, cfg.protocol, tok)
    data = Dataset.from_list([{"prompt": p, "completion": answer_text(r)} for p, r in zip(prompts, records)])
    base, tok = load(cfg.model, dtype="fp32")
    targs = SFTConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=a.batch_size,
                      max_steps=a.steps, max_length=a.max_length, learning_rate=cfg.learning_rate,
                      bf16=bf16, report_to=[], save_strategy="no", logging_steps=100000,
                      disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.modules(),
                      task_type="CAUSAL_LM")
    torch.manual_seed(0)
    trl = SFTTrainer(model=base, args=targs, train_dataset=data, processing_class=tok, peft_config=lcfg)
    theirs = measure(trl)
    theirs["defaults_that_differ"] = {k: getattr(targs, k) for k in
                                      ("gradient_checkpointing", "packing", "padding_free",
                                       "completion_only_loss")}
    print("trl:", theirs, flush=True)

    flops_per_token = 4 * n_params
    result = {
        "steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
        "precision": "bf16" if bf16 else "fp32", "base_params": n_params,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "shoptune": ours, "trl_sft_default": theirs,
        "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
        "mfu": {who: {k: round(flops_per_token * r["tokens_per_s"] / v, 3) for k, v in peaks.items()}
                for who, r in (("shoptune", ours), ("trl", theirs))},
        "answer_tokens_check": sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples),
    }
    print(json.dumps({"ratio": result["ratio"], "mfu": result["mfu"]}))
    write_json(Path(a.out), result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
