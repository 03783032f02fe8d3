"""Training speed: each throughput lever measured against the #4 recipe, and against TRL's
SFTTrainer defaults, all in one run.

    .venv/bin/python benchmarks/train_speed.py [--steps 12] [--batch-size 8] [--max-length 256]
        [--compile] [--no-trl] [--no-ceiling] [--loss-steps 50] [--trl-repeats 3 --out F.json]

Same model (the embedded SmolLM2-135M), same rows (a diverse EC-Guide mixture rendered with the
evaluator's prompts), same LoRA (r=16, attention+MLP), batch size and precision (what `bf16: auto`
picks on this machine). Levers are cumulative, each on top of the ones before it:
the #4 recipe (LoRA dropout 0.05, logits at every position, fp32 weights under bf16 autocast) ->
LoRA dropout 0 -> LM head only at answer positions -> frozen base weights stored in bf16 (->
torch.compile with --compile). The last one is the recipe's default now. TRL pads each batch as it comes and uses its own defaults.

Then ``packing: true`` on top of the new defaults (padding-free batches, same rows, same order):
packing on/off in the same run.

Reports non-pad tokens/s (steps after the first two, which warm up), the speed-up over the #4
recipe, and MFU: 4 x base-parameter FLOPs per token (forward 2N, backward to the activations 2N;
LoRA needs no base-weight gradients) over the matmul peak measured in this run, for bf16 and
fp32. A 2048^3 matmul peak is no ceiling for a 576-wide model, so for the new defaults, padded
and packed, it also reports ``mfu.shape_ceiling``: the matmuls one step actually runs (every
decoder Linear forward and backward-to-input at the step's token count, the LoRA products, the LM
head at the answer positions; :func:`step_gemms`), each timed alone at its own shape and dtype
(:func:`shape_ceiling`); ``mfu.shape_ceiling`` = that matmul time / the measured step time. A
profile of a few steps splits the step time into matmul / attention / norm+act (element-wise) /
optimizer / rest (:func:`step_split`), and the matmul part is compared with its ceiling. ``--loss-steps N`` also trains the #4 recipe and the new defaults N steps on the same rows
and plots both loss curves (docs/results/train_speed.png).
Writes docs/results/train_speed.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from shoptune import REPO_CONFIGS
from shoptune import machine
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


def step_gemms(arch, tokens: int, answers: int, r: int, targets) -> dict[tuple[int, int, int], int]:
    """The matmuls one LoRA training step runs, as {(M, K, N): count}: every decoder Linear's
    forward and backward-to-input over ``tokens`` rows (frozen: no weight gradient), each LoRA's
    A and B products with their input and weight gradients, and the LM head forward and
    backward-to-input at the ``answers`` positions. Attention's own products are not here (the
    attention kernel is timed as attention)."""
    gemms: dict[tuple[int, int, int], int] = {}

    def add(shape, n=1):
        gemms[shape] = gemms.get(shape, 0) + n
    for name, (k, n) in arch.linears().items():
        add((tokens, k, n), arch.layers)      # x W^T
        add((tokens, n, k), arch.layers)      # dY W
        if name in targets:                   # LoRA: x A^T, (xA^T) B^T and their backward
            for shape in ((tokens, k, r), (tokens, r, n), (n, tokens, r), (tokens, n, r),
                          (r, tokens, k), (tokens, r, k)):
                add(shape, arch.layers)
    add((answers, arch.hidden, arch.vocab))   # LM head
    add((answers, arch.vocab, arch.hidden))
    return gemms


def shape_ceiling(gemms: dict, dtype: torch.dtype, reps: int = 5) -> dict:
    """Each matmul timed alone at its shape and dtype (best of ``reps``): the time one step's
    matmuls take at best on this machine, and their FLOPs."""
    seconds = flops = 0.0
    for (m, k, n), count in gemms.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        seconds += best * count
        flops += 2 * m * k * n * count
    return {"matmul_s": seconds, "flops": flops, "gflops": flops / seconds / 1e9}


# aten ops by the part of a step they belong to: (names, in-place variants too; substrings).
# Every op run inside the optimizer's step or zero_grad counts as optimizer; the rest is "rest".
PARTS = {
    "matmul": ({"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"}, ()),
    "attention": (set(), ("scaled_dot_product", "flash_attention")),
    "norm+act": ({"aten::pow", "aten::mean", "aten::rsqrt", "aten::mul", "aten::add", "aten::silu",
                  "aten::silu_backward", "aten::neg", "aten::cat", "aten::sum", "aten::div", "aten::sub",
                  "aten::sigmoid", "aten::slice_backward"}, ()),
    # a compiled step's fused element-wise kernels (inductor's C++ kernels, named by what they
    # fuse, recorded with cpp.enable_kernel_profile): the norm+act and cast work of an eager step
    "fused (compiled)": (set(), ("cpp_fused",)),
}


def part_of(ev) -> str:
    p = ev
    while p is not None:
        if p.name.startswith("Optimizer."):
            return "optimizer"
        p = p.cpu_parent
    for part, (names, contains) in PARTS.items():
        if ev.name.rstrip("_") in names or any(c in ev.name for c in contains):
            return part
    return "rest"


class ProfileSteps(TrainerCallback):
    def __init__(self, prof):
        self.prof, self.times = prof, []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())
        self.prof.step()


def step_split(trainer, active: int = 3, wait: int = 1) -> dict:
    """Profile ``active`` steps after two untimed ones: seconds per step by part (self CPU time
    of each aten op, summed by :data:`PARTS`; "rest" is the step's wall time not in those ops:
    the loss, casts, data, Python and the Trainer's own work) and the largest ops of "rest"."""
    from torch.profiler import ProfilerActivity, profile, schedule
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=wait, warmup=1, active=active)) as prof:
        cb = ProfileSteps(prof)
        trainer.add_callback(cb)
        trainer.train()
    wall = (cb.times[wait + active] - cb.times[wait]) / active
    parts = {p: 0.0 for p in [*PARTS, "optimizer"]}
    rest_ops: dict[str, float] = {}
    for ev in prof.events():
        sec = ev.self_cpu_time_total / 1e6 / active
        part = part_of(ev)
        if part == "rest":
            rest_ops[ev.name] = rest_ops.get(ev.name, 0.0) + sec
        else:
            parts[part] += sec
    parts["rest"] = max(wall - sum(parts.values()), 0.0)
    top = sorted(rest_ops.items(), key=lambda kv: -kv[1])[:8]
    return {"profiled_step_s": round(wall, 3), "seconds": {k: round(v, 3) for k, v in parts.items()},
            "share": {k: round(v / wall, 3) for k, v in parts.items()},
            "largest_rest_ops_s": {k: round(v, 4) for k, v in top}}


def ceiling_report(cfg, records, a, r: dict) -> dict:
    """``mfu.shape_ceiling`` for a measured lever ``r`` and the profile's split of its step."""
    from shoptune.train.plan import load_arch
    from shoptune.train.trainer import base_weights_dtype
    arch = load_arch(cfg.model)
    dtype = base_weights_dtype(cfg)
    gemms = step_gemms(arch, round(r["computed_tokens_per_step"]), round(r["answer_tokens_per_step"]),
                       cfg.lora.r, cfg.lora.modules())
    ceil = shape_ceiling(gemms, dtype)
    prof = profile_run(cfg, records)
    matmul_measured = prof["seconds"]["matmul"] * r["step_s"] / prof["profiled_step_s"]
    return {"dtype": str(dtype).removeprefix("torch."), "gemm_shapes": len(gemms),
            "step_matmul_gflop": round(ceil["flops"] / 1e9, 1), "ceiling_gflops": round(ceil["gflops"], 1),
            "ceiling_matmul_s": round(ceil["matmul_s"], 3), "step_s": r["step_s"],
            "shape_ceiling": round(ceil["matmul_s"] / r["step_s"], 3),
            "matmul_part_vs_ceiling": round(ceil["matmul_s"] / matmul_measured, 3) if matmul_measured else None,
            "split": prof}


def profile_run(cfg, records, active: int = 3) -> dict:
    """The step split of ``cfg``'s step; a compiled one after 3 unprofiled steps (its first
    steps compile), its fused kernels recorded one by one."""
    from shoptune.train.format import encode_records
    from shoptune.train.trainer import base_weights_dtype, build_model, make_trainer, use_compile
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    compiled = use_compile(cfg)
    if compiled:
        from torch._inductor import config as inductor
        inductor.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    model, tok = build_model(cfg.model, cfg.lora, base_dtype=base_weights_dtype(cfg), packing=cfg.packing,
                             compile=compiled)
    names = sorted({r.task for r in records})
    examples = encode_records(records, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                              task_index={t: i for i, t in enumerate(names)})
    out = Path(cfg.output_dir + "-profile")
    wait = 3 if compiled else 1
    trainer = make_trainer(cfg, model, tok, examples, names, out, wait + 1 + active, None)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    return step_split(trainer, active, wait)


class Clock(TrainerCallback):
    """When each step ended, and whether it compiled graphs (dynamo's graph count went up: a
    compiled arm's first steps, and any later step that met a new shape)."""

    def __init__(self):
        self.start, self.times, self.compiled = 0.0, [], []
        self._graphs = 0

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters
        return counters["stats"]["unique_graphs"]

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self._graphs = time.perf_counter(), self.graphs()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())
        self.compiled.append(self.graphs() > self._graphs)
        self._graphs = self.graphs()


class CountingCollator:
    """Wraps a collator; records each batch's non-pad tokens, all tokens computed on (with the
    padding) and answer tokens."""

    def __init__(self, inner):
        self.inner, self.tokens, self.computed, self.answers = inner, [], [], []

    def __call__(self, features):
        batch = self.inner(features)
        if "attention_mask" in batch:
            self.tokens.append(int(batch["attention_mask"].sum()))
        else:  # padding-free batches carry no mask
            self.tokens.append(int(batch["input_ids"].numel()))
        self.computed.append(int(batch["input_ids"].numel()))
        self.answers.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch


def measure(trainer, warmup: int = 2) -> dict:
    """Non-pad tokens/s over the steps after the first ``warmup`` that compiled nothing; the
    steps that did compile are the arm's compile time: what they took beyond a steady step's
    time per computed token (``compile_s``; 0 for eager arms)."""
    clock, counter = Clock(), CountingCollator(trainer.data_collator)
    trainer.add_callback(clock)
    trainer.data_collator = counter
    trainer.train()
    ends = [clock.start] + clock.times
    step_s = [b - a for a, b in zip(ends, ends[1:])]  # (each step from the end of the one before)
    timed = [i for i in range(warmup, len(step_s)) if not clock.compiled[i]]
    seconds = sum(step_s[i] for i in timed)
    tokens = sum(counter.tokens[i] for i in timed)
    per_token = seconds / sum(counter.computed[i] for i in timed)
    compile_s = sum(max(0.0, step_s[i] - per_token * counter.computed[i])
                    for i, c in enumerate(clock.compiled) if c)
    return {"steps_timed": len(timed), "non_pad_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1),
            "computed_tokens_per_step": round(sum(counter.computed[i] for i in timed) / len(timed), 1),
            "answer_tokens_per_step": round(sum(counter.answers[i] for i in timed) / len(timed), 1),
            "step_s": round(seconds / len(timed), 3), "compile_s": round(compile_s, 1),
            "compile_steps": [i for i, c in enumerate(clock.compiled) if c],
            "step_times": [round(t, 3) for t in step_s], "timed_steps": timed}


# Each lever is measured on top of the ones before it (cumulative), all in this one run.
LEVERS = [
    ("before (#4 recipe)", ["lora.dropout=0.05", "answer_logits_only=false", "base_dtype=fp32"]),
    ("+ LoRA dropout 0", ["lora.dropout=0.0", "answer_logits_only=false", "base_dtype=fp32"]),
    ("+ answer-only logits", ["lora.dropout=0.0", "answer_logits_only=true", "base_dtype=fp32"]),
    ("+ bf16 frozen weights", ["lora.dropout=0.0", "answer_logits_only=true", "base_dtype=auto"]),
]
PACKING = ("+ packing (padding-free)", ["lora.dropout=0.0", "answer_logits_only=true", "base_dtype=auto",
                                         "packing=true"])
# The compiled step (#35), each on top of the new defaults: (name, overrides, length buckets).
# Buckets 0: `compile: on` as the recipe runs it (decoder layers compiled, the sequence dimension
# dynamic after the first shape change); 64: every batch right-padded to a multiple of 64
# tokens and the layers compiled for static shapes (one graph per bucket).
DEFAULTS = ["lora.dropout=0.0", "answer_logits_only=true", "base_dtype=auto"]
COMPILED = [("+ compile (dynamic lengths)", DEFAULTS + ["compile=on"], 0),
            ("+ compile (length buckets of 64)", DEFAULTS + ["compile=off"], 64)]


class BucketCollator:
    """Right-pads each batch to the next multiple of ``size`` tokens (mask 0, labels -100: the
    loss is the same), so a compiled step sees a few static shapes."""

    def __init__(self, inner, size: int, pad_id: int):
        self.inner, self.size, self.pad_id = inner, size, pad_id

    def __call__(self, features):
        import torch.nn.functional as F
        batch = self.inner(features)
        extra = -batch["input_ids"].shape[1] % self.size
        for key, value in (("input_ids", self.pad_id), ("attention_mask", 0), ("labels", -100)):
            batch[key] = F.pad(batch[key], (0, extra), value=value)
        return batch


def config(tmp: Path, name: str, a, extra: list[str]):
    from shoptune.train.config import load_config
    return load_config(REPO_CONFIGS / "train" / "demo.yaml", [
        f"output_dir={tmp / name}", f"max_steps={a.steps}", f"batch_size={a.batch_size}",
        f"max_length={a.max_length}", f"mixture.total={a.steps * a.batch_size}", "report_to=[]",
        "save_steps=100000", "logging_steps=1", "lora.r=16", "lora.alpha=32",
        "lora.target_modules=attention+mlp", "compile=off", *extra])  # (eager unless an arm says)


def run_shoptune(cfg, records, steps: int, buckets: int = 0):
    """Train ``steps`` steps with the recipe's own trainer; timing + the per-step losses.
    ``buckets``: pad batches to multiples of it and compile the layers for static shapes."""
    from shoptune.compiling import compile_layers
    from shoptune.train.format import encode_records
    from shoptune.train.trainer import base_weights_dtype, build_model, make_trainer, use_compile
    torch.manual_seed(0)
    model, tok = build_model(cfg.model, cfg.lora, base_dtype=base_weights_dtype(cfg), packing=cfg.packing,
                             compile=use_compile(cfg))
    if buckets:
        compile_layers(model, dynamic=False)
    names = sorted({r.task for r in records})
    examples = encode_records(records, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                              task_index={t: i for i, t in enumerate(names)})
    trainer = make_trainer(cfg, model, tok, examples, names, Path(cfg.output_dir), steps, None)
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if buckets:
        trainer.data_collator = BucketCollator(trainer.data_collator, buckets, tok.pad_token_id)
    t0 = time.perf_counter()
    r = measure(trainer)
    r["wall_s"] = round(time.perf_counter() - t0, 1)
    r["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return r, model, tok, examples


def run_trl(a, records, base_cfg, out: Path, bf16: bool) -> dict:
    """TRL's SFTTrainer with its defaults except what must match (model, rows, LoRA, batch,
    length, learning rate, precision): the same measurement as :func:`run_shoptune`."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from shoptune.decoding import build_prompts
    from shoptune.models import load
    from shoptune.train.format import answer_text

    base, tok = load(base_cfg.model, dtype="fp32")
    prompts = build_prompts(records, base_cfg.protocol, tok)
    data = Dataset.from_list([{"prompt": p, "completion": answer_text(r)} for p, r in zip(prompts, records)])
    targs = SFTConfig(output_dir=str(out), per_device_train_batch_size=a.batch_size,
                      max_steps=a.steps, max_length=a.max_length, learning_rate=base_cfg.learning_rate,
                      bf16=bf16, report_to=[], save_strategy="no", logging_steps=100000,
                      disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=base_cfg.lora.dropout,
                      target_modules=base_cfg.lora.modules(), task_type="CAUSAL_LM")
    torch.manual_seed(0)
    trl = SFTTrainer(model=base, args=targs, train_dataset=data, processing_class=tok, peft_config=lcfg)
    r = measure(trl)
    r["defaults_that_differ"] = {k: getattr(targs, k) for k in
                                 ("gradient_checkpointing", "packing", "padding_free", "completion_only_loss")}
    return r


def side_by_side(a, records, base_cfg, tmp: Path, bf16: bool) -> dict:
    """shoptune's default recipe and TRL's SFTTrainer defaults, alternated ``--trl-repeats``
    times in this one process, so load from other processes and drift hit both arms alike; the
    ratio of each round and their median."""
    import statistics

    rounds = []
    for i in range(a.trl_repeats):
        load = [round(x, 2) for x in os.getloadavg()]
        ours, model, _, _ = run_shoptune(config(tmp, f"ours{i}", a, LEVERS[-1][1]), records, a.steps)
        del model
        theirs = run_trl(a, records, base_cfg, tmp / f"trl{i}", bf16)
        rounds.append({"shoptune_tokens_per_s": ours["tokens_per_s"], "trl_tokens_per_s": theirs["tokens_per_s"],
                       "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2), "load_avg_before": load,
                       "shoptune": {k: v for k, v in ours.items() if k != "losses"}, "trl": theirs})
        print(f"round {i}: shoptune {ours['tokens_per_s']} tok/s, TRL {theirs['tokens_per_s']} tok/s, "
              f"ratio {rounds[-1]['ratio']}", flush=True)
    ratios = [r["ratio"] for r in rounds]
    return {"rounds": rounds, "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "shoptune_overrides": LEVERS[-1][1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--compile", action="store_true",
                    help="also measure the compiled step (#35): each compiled arm twice in a fresh "
                         "process, first with an empty inductor cache (cold), then with the cache "
                         "that run left (warm); with --loss-steps also its loss curve")
    ap.add_argument("--arm", help=argparse.SUPPRESS)  # (a child process: one compiled arm, JSON to --arm-out)
    ap.add_argument("--arm-buckets", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--arm-out", help=argparse.SUPPRESS)
    ap.add_argument("--no-trl", action="store_true", help="skip the TRL SFTTrainer baseline")
    ap.add_argument("--loss-steps", type=int, default=0,
                    help="also train 'before' and the new defaults this many steps on the same rows "
                         "and plot both loss curves")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the shape ceiling and the step profile (minutes)")
    ap.add_argument("--trl-repeats", type=int, default=0,
                    help="only shoptune's default recipe vs TRL's SFTTrainer defaults, alternated "
                         "this many times (the ratio per round and its median; no levers)")
    ap.add_argument("--out", default="docs/results/train_speed.json")
    a = ap.parse_args()

    from shoptune.train.format import IGNORE
    from shoptune.train.mixture import build_mixture
    from shoptune.train.trainer import use_bf16

    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other processes on the machine
    tmp = Path(tempfile.mkdtemp(prefix="train_speed-"))
    if a.arm:  # a child process of compiled_arms()
        cfg = config(tmp, "arm", a, json.loads(a.arm))
        r, *_ = run_shoptune(cfg, build_mixture(cfg.mixture)[0], a.steps, buckets=a.arm_buckets)
        write_json(Path(a.arm_out), r)
        return
    base_cfg = config(tmp, "base", a, [])
    records, _ = build_mixture(base_cfg.mixture)
    bf16 = use_bf16(base_cfg.bf16)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak: bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s; "
          f"training precision: {'bf16' if bf16 else 'fp32'}", flush=True)
    command = " ".join(["benchmarks/train_speed.py", *sys.argv[1:]])
    if a.trl_repeats:
        res = side_by_side(a, records, base_cfg, tmp, bf16)
        write_json(Path(a.out), {
            "machine": machine.describe(), "command": command, "steps": a.steps, "batch_size": a.batch_size,
            "max_length": a.max_length, "precision": "bf16" if bf16 else "fp32",
            "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()}, "trl_vs_shoptune": res,
            "load_avg": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]}})
        print(f"shoptune / TRL: median {res['ratio_median']} (rounds {res['ratio_per_round']}); wrote {a.out}")
        return
    n_params = None
    levers = {}
    for name, extra in LEVERS + [PACKING]:
        r, model, tok, examples = run_shoptune(config(tmp, f"lever{len(levers)}", a, extra), records, a.steps)
        n_params = n_params or sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
        r["overrides"] = extra
        levers[name] = r
        print(f"{name}: {r['tokens_per_s']} tok/s", flush=True)
        del model
    flops_per_token = 4 * n_params
    before = levers[LEVERS[0][0]]["tokens_per_s"]
    for r in levers.values():
        r["speedup_vs_before"] = round(r["tokens_per_s"] / before, 2)
        r["mfu"] = {k: round(flops_per_token * r["tokens_per_s"] / v, 3) for k, v in peaks.items()}
    default = levers[LEVERS[-1][0]]
    packed = levers[PACKING[0]]
    for name, extra in () if a.no_ceiling else (LEVERS[-1], PACKING):  # the new defaults, padded and packed
        cfg = config(tmp, f"ceiling{len(extra)}", a, extra)
        rep = ceiling_report(cfg, records, a, levers[name])
        levers[name]["mfu"]["shape_ceiling"] = rep["shape_ceiling"]
        levers[name]["ceiling"] = rep
        print(f"{name}: shape ceiling {rep['ceiling_gflops']} GFLOP/s, mfu.shape_ceiling "
              f"{rep['shape_ceiling']}, split {rep['split']['share']}", flush=True)

    result = {
        "machine": machine.describe(), "command": command,
        "steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
        "precision": "bf16" if bf16 else "fp32", "base_params": n_params,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "levers": levers, "shoptune": {k: v for k, v in default.items() if k != "losses"},
        "speedup_vs_before": default["speedup_vs_before"],
        "packing": {"padded_tokens_per_s": default["tokens_per_s"], "packed_tokens_per_s": packed["tokens_per_s"],
                    "speedup": round(packed["tokens_per_s"] / default["tokens_per_s"], 2),
                    "computed_tokens_per_step": {"padded": default["computed_tokens_per_step"],
                                                 "packed": packed["computed_tokens_per_step"]}},
        "answer_tokens_check": sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples),
    }

    if a.compile:
        result["compiled"] = compiled_arms(a, tmp, records, default, peaks, flops_per_token,
                                           torch.bfloat16 if bf16 else torch.float32)
        print("compiled:", json.dumps({k: v for k, v in result["compiled"].items() if k != "arms"}), flush=True)
        write_json(Path(a.out), result)

    if not a.no_trl:  # TRL SFTTrainer, defaults except what must match
        theirs = run_trl(a, records, base_cfg, tmp / "trl", bf16)
        theirs["mfu"] = {k: round(flops_per_token * theirs["tokens_per_s"] / v, 3) for k, v in peaks.items()}
        print("trl:", theirs, flush=True)
        result["trl_sft_default"] = theirs
        result["ratio"] = round(default["tokens_per_s"] / theirs["tokens_per_s"], 2)

    result["load_avg"] = {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]}
    write_json(Path(a.out), result)  # the lever numbers are kept even if what follows fails
    if a.loss_steps:
        curves = loss_curves(a, tmp)
        result["loss_curves"] = curves
        if "compiled" in result:
            result["compiled"]["loss_mean_abs_delta"] = curves["compiled_mean_abs_step_diff"]
            # the same ratio over the curves' steps (the compiling steps left out of both): more
            # steps than an arm's timed ones, in the parent process with a warm cache
            result["compiled"]["ratio_loss_steps"] = round(
                curves["compiled"]["tokens_per_s"] / curves["new defaults"]["tokens_per_s"], 3)
        plot_curves(curves, Path(a.out).with_suffix(".png"))
    print(json.dumps({k: result.get(k) for k in ("speedup_vs_before", "ratio", "packing")}))
    write_json(Path(a.out), result)
    print(f"wrote {a.out}")


def child_arm(a, tmp: Path, extra: list[str], buckets: int, cache: Path) -> dict:
    """One arm measured by a fresh process of this script, with ``cache`` as inductor's cache
    folder (empty: a cold compile; left by an earlier child: a warm one)."""
    import os
    import subprocess
    import sys
    out = tmp / f"arm-{len(list(tmp.glob('arm-*.json')))}.json"
    cmd = [sys.executable, __file__, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--max-length", str(a.max_length), "--arm", json.dumps(extra), "--arm-buckets", str(buckets),
           "--arm-out", str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    return json.loads(out.read_text())


def compiled_arms(a, tmp: Path, records, default: dict, peaks: dict, flops_per_token: float,
                  dtype: torch.dtype) -> dict:
    """Each compiled arm, cold then warm, against the eager default of this run: tokens/s ratio,
    the median per-step time ratio over steps timed in both (the same batches in the same
    order), compile time, break-even steps (compile time / seconds saved per step), MFU vs the
    bf16 peak and vs the step's shape ceiling. The faster arm is the one reported on top."""
    from shoptune.train.config import ATTENTION, MLP
    from shoptune.train.plan import load_arch
    arch = load_arch("smollm2-135m")
    arms = {}
    for name, extra, buckets in COMPILED:
        cache = tmp / f"inductor-{buckets}"  # new and empty: the first child compiles cold
        cold = child_arm(a, tmp, extra, buckets, cache)
        warm = child_arm(a, tmp, extra, buckets, cache)
        both = [i for i in cold["timed_steps"] if i in default["timed_steps"]]
        saved = default["step_s"] - cold["step_s"]
        gemms = step_gemms(arch, round(cold["computed_tokens_per_step"]), round(cold["answer_tokens_per_step"]),
                           16, ATTENTION + MLP)  # (the arms' LoRA: r=16 on attention+MLP)
        ceiling = shape_ceiling(gemms, dtype)
        arms[name] = {
            "overrides": extra, "buckets": buckets, "cold": cold, "warm": warm,
            "ratio": round(cold["tokens_per_s"] / default["tokens_per_s"], 3),
            "ratio_warm_run": round(warm["tokens_per_s"] / default["tokens_per_s"], 3),
            "paired_step_ratio": round(statistics.median(default["step_times"][i] / cold["step_times"][i]
                                                         for i in both), 3) if both else None,
            "compile_s_cold": cold["compile_s"], "compile_s_warm": warm["compile_s"],
            "break_even_steps": round(cold["compile_s"] / saved, 1) if saved > 0 else None,
            "mfu": {**{k: round(flops_per_token * cold["tokens_per_s"] / v, 3) for k, v in peaks.items()},
                    "shape_ceiling": round(ceiling["matmul_s"] / cold["step_s"], 3)},
        }
        print(f"{name}: {cold['tokens_per_s']} tok/s ({arms[name]['ratio']}x), compile "
              f"{cold['compile_s']} s cold / {warm['compile_s']} s warm", flush=True)
    best = max(arms, key=lambda n: arms[n]["ratio"])
    # where a compiled step's time goes (the recipe's arm, `compile: on`), as for the eager default
    name, extra, _ = COMPILED[0]
    arms[name]["split"] = profile_run(config(tmp, "compiled-profile", a, extra), records)
    from torch._inductor import config as inductor_config  # (as shoptune.compiling set it)
    print(f"{name}: split {arms[name]['split']['share']}", flush=True)
    return {"arm": best, **{k: arms[best][k] for k in ("ratio", "paired_step_ratio", "compile_s_cold",
                                                       "compile_s_warm", "break_even_steps", "mfu")},
            "loss_mean_abs_delta": None, "arms": arms,
            "inductor": {k: getattr(inductor_config, k) for k in ("emulate_precision_casts", "fallback_random")}}


def loss_curves(a, tmp: Path) -> dict:
    """'before' and the new defaults (and with --compile the compiled step), ``--loss-steps``
    steps on the same rows in the same order."""
    from shoptune.train.mixture import build_mixture
    b = argparse.Namespace(**{**vars(a), "steps": a.loss_steps})
    curves, adapters = {}, {}
    for name, extra in (LEVERS[0], ("new defaults", []), *([("compiled", ["compile=on"])] if a.compile else [])):
        cfg = config(tmp, f"curve-{len(curves)}", b, extra)
        records, _ = build_mixture(cfg.mixture)
        r, model, _, _ = run_shoptune(cfg, records, a.loss_steps)
        curves[name] = {"losses": r["losses"], "tokens_per_s": r["tokens_per_s"], "wall_s": r["wall_s"]}
        from shoptune.train.trainer import save_adapter
        adapters[name] = save_adapter(model, Path(cfg.output_dir))
        print(f"curve {name}: loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}, {r['tokens_per_s']} tok/s",
              flush=True)
        del model
    x, y = curves[LEVERS[0][0]]["losses"], curves["new defaults"]["losses"]
    diffs = [abs(p - q) for p, q in zip(x, y)]
    curves["max_abs_step_diff"] = round(max(diffs), 4)
    curves["mean_abs_step_diff"] = round(sum(diffs) / len(diffs), 4)
    if "compiled" in curves:  # the compiled step against the eager one it replaces
        diffs = [abs(p - q) for p, q in zip(curves["compiled"]["losses"], y)]
        curves["compiled_max_abs_step_diff"] = round(max(diffs), 4)
        curves["compiled_mean_abs_step_diff"] = round(sum(diffs) / len(diffs), 4)
    curves["dev_quality"] = dev_quality({k: adapters[k] for k in (LEVERS[0][0], "new defaults")}, tmp)
    return curves


def dev_quality(adapters: dict[str, Path], tmp: Path) -> dict:
    """Both adapters on the ShopBench development set, paired comparison (new - before)."""
    import json as _json

    from shoptune.eval.paired import paired_compare
    from shoptune.eval.runner import evaluate
    rows, scores = {}, {}
    for name, adapter in adapters.items():
        out = tmp / f"dev-{name.split()[0]}"
        s = evaluate(model="smollm2-135m", adapter=str(adapter), data=["shopbench-dev/development.json"],
                     out=out, quiet=True)
        scores[name] = round(s["overall"], 4)
        rows[name] = [_json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    before, new = list(rows)
    cmp = paired_compare([rows[before]], [rows[new]])["overall"]
    res = {"overall": scores, "diff": round(cmp["diff"], 4), "ci95": [round(x, 4) for x in cmp["ci95"]],
           "p": round(cmp["p"], 4)}
    print(f"dev all-around: {scores}; new - before {res['diff']:+.3f} {res['ci95']} p={res['p']}", flush=True)
    return res


def plot_curves(curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        if isinstance(c, dict) and "losses" in c:
            ax.plot(range(1, len(c["losses"]) + 1), c["losses"], label=f"{name} ({c['tokens_per_s']} tok/s)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_title("Training loss: #4 recipe vs new defaults, same rows and order")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
