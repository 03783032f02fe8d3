"""How far a compiled bf16 training step's losses move from eager's, and which is nearer fp32 (#35):

    flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/compile_numerics.py \
        [--steps 50] [--work DIR] [--out docs/results/compile_numerics.json]

Four arms train the same rows in the same order with train_speed.py's settings (the embedded
model, LoRA r=16 on attention+MLP, batch 8, max 256 tokens, the recipe's defaults), each in a
process of its own, ``--steps`` steps:

- ``eager``: bf16 autocast, bf16 frozen weights (what training runs on a bf16 machine);
- ``compiled``: the same, decoder layers compiled, fused kernels keeping their intermediates in
  fp32 (inductor's default);
- ``compiled_emulate``: compiled, intermediates rounded to bf16 where eager's separate ops round
  them (``emulate_precision_casts``, what ``compile: on`` sets);
- ``fp32``: eager, fp32 weights, no autocast: the reference the bf16 arms approximate.

Reports, per arm, the mean and max |loss difference| per step to eager and to fp32, and plots
the differences. An arm whose JSON is already in ``--work`` is not run again (a cut run resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from shoptune import machine
from shoptune._io import write_json

DEFAULTS = ["lora.dropout=0.0", "answer_logits_only=true", "base_dtype=auto"]
ARMS = {  # name: (overrides, emulate_precision_casts)
    "eager": (DEFAULTS, None),
    "compiled": (DEFAULTS + ["compile=on"], False),
    "compiled_emulate": (DEFAULTS + ["compile=on"], True),
    "fp32": (["lora.dropout=0.0", "answer_logits_only=true", "base_dtype=fp32", "bf16=false"], None),
}


def run_arm(name: str, steps: int, work: Path) -> None:
    """One arm, in this (child) process: its losses to ``work/NAME.json``."""
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    import train_speed as ts

    from shoptune import compiling
    from shoptune.train.mixture import build_mixture
    extra, emulate = ARMS[name]
    if emulate is not None:
        settings = compiling.inductor_settings

        def arm_settings():
            path = settings()
            from torch._inductor import config
            config.emulate_precision_casts = emulate
            return path
        compiling.inductor_settings = arm_settings
    a = argparse.Namespace(steps=steps, batch_size=8, max_length=256)
    cfg = ts.config(Path(tempfile.mkdtemp(prefix="numerics-")), name, a, extra)
    records, _ = build_mixture(cfg.mixture)
    t0 = time.perf_counter()
    r, *_ = ts.run_shoptune(cfg, records, steps)
    write_json(work / f"{name}.json", {
        "name": name, "overrides": extra, "emulate_precision_casts": emulate, "losses": r["losses"],
        "tokens_per_s": r["tokens_per_s"], "compile_s": r["compile_s"],
        "wall_s": round(time.perf_counter() - t0, 1)})


def diffs(x: list[float], y: list[float]) -> dict:
    d = [abs(p - q) for p, q in zip(x, y, strict=True)]
    return {"mean_abs": round(sum(d) / len(d), 4), "max_abs": round(max(d), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--work", default=None, help="the arms' JSON (default: a new temp folder)")
    ap.add_argument("--out", default="docs/results/compile_numerics.json")
    ap.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)  # (a child process)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="compile-numerics-"))
    if a.arm:
        run_arm(a.arm, a.steps, work)
        return
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}
    arms = {}
    for name in ARMS:
        path = work / f"{name}.json"
        if not path.exists():
            print(f"== {name}", flush=True)
            subprocess.run([sys.executable, __file__, "--arm", name, "--steps", str(a.steps), "--work", str(work)],
                           env=env, check=True)
        arms[name] = json.loads(path.read_text())
        print(f"{name}: loss {arms[name]['losses'][0]:.4f} -> {arms[name]['losses'][-1]:.4f}, "
              f"{arms[name]['tokens_per_s']} tok/s", flush=True)
    res = {"machine": machine.describe(), "command": " ".join(["benchmarks/compile_numerics.py", *sys.argv[1:]]),
           "steps": a.steps, "arms": arms,
           "vs_eager": {n: diffs(arms[n]["losses"], arms["eager"]["losses"]) for n in ARMS if n != "eager"},
           "vs_fp32": {n: diffs(arms[n]["losses"], arms["fp32"]["losses"]) for n in ARMS if n != "fp32"}}
    print("| arm | vs eager bf16: mean / max abs | vs fp32: mean / max abs | tok/s |")
    print("|---|---|---|---|")
    for n in ARMS:
        cells = [f"{d['mean_abs']:.4f} / {d['max_abs']:.4f}" if d else "-"
                 for d in (res["vs_eager"].get(n), res["vs_fp32"].get(n))]
        print(f"| {n} | {cells[0]} | {cells[1]} | {arms[n]['tokens_per_s']} |")
    write_json(Path(a.out), res)
    plot(res, Path(a.out).with_suffix(".png"))
    print(f"wrote {a.out}")


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ref = res["arms"]["fp32"]["losses"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n, arm in res["arms"].items():
        if n != "fp32":
            ax.plot(range(1, len(ref) + 1), [p - q for p, q in zip(arm["losses"], ref)],
                    label=f"{n} (mean |diff| {res['vs_fp32'][n]['mean_abs']:.4f})")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss - fp32 eager loss")
    ax.set_title(f"bf16 training losses against fp32, same rows ({res['machine'].get('cpu', '?')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
