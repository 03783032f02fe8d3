"""Multi-task LoRA fine-tuning recipe: setup -> (three-stage) train -> save -> evaluate.

    shoptune train configs/train/smoke.yaml output_dir=runs/smoke
    accelerate launch --cpu --num_processes 2 -m shoptune.train.recipe configs/train/smoke.yaml

Built on transformers ``Trainer`` + peft, so ``accelerate launch`` (DDP/FSDP/DeepSpeed configs
under ``configs/accelerate/``) runs it unchanged. Loss is on answer tokens only; batches are
length-grouped; bf16 autocast where the CPU has native bf16. Writes ``OUT/adapter/`` (a plain PEFT
adapter folder), ``OUT/run.json``, ``OUT/log.jsonl`` and TensorBoard files under ``OUT/tb``.
Checkpoints (``OUT/checkpoint-N``) get a ``COMPLETE`` marker once fully written; ``--resume``
continues from the newest complete one with the same data order, RNG and optimizer state.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from shoptune._io import read_marker, write_json, write_marker
from shoptune.train.config import TrainConfig, load_config
from shoptune.train.format import IGNORE, encode_records
from shoptune.train.mixture import MixtureConfig, build_mixture
from shoptune.experts import routing_table
from shoptune.train.sharded import full_state_dict
from shoptune.train.trainer import (PeriodicEval, base_weights_dtype, build_model,
                                    latest_complete_checkpoint, make_trainer, save_adapter,
                                    trainable_parameters, train, use_compile)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import accelerate
    import peft
    import transformers

    from shoptune import __version__
    return {"shoptune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__,
            "python": platform.python_version()}


def _balancer(cfg: TrainConfig, records, task_names: list[str], examples: list[dict]):
    """The loss balancer over capabilities (or tasks); each example gets its ``group_id``."""
    if cfg.loss_balancing == "static":
        return None
    from shoptune.records import CAPABILITIES
    from shoptune.train.balancing import Balancer
    cap = {r.task: r.capability for r in records}
    if cfg.balance_by == "task":
        groups, group_of = task_names, {t: i for i, t in enumerate(task_names)}
    else:
        groups = [c for c in CAPABILITIES if c in set(cap.values())]
        group_of = {t: groups.index(cap[t]) for t in task_names}
    for e in examples:
        e["group_id"] = group_of[task_names[e["task_id"]]]
    return Balancer(cfg.loss_balancing, groups, lr=cfg.balance_lr)


def validation_records(mix: MixtureConfig, n: int, seed: int):
    """A fixed sample of the mixture's validation split (same tasks, never trained on)."""
    vcfg = mix.model_copy(update={"split": "validation", "total": n, "temperature": 1e6,
                                  "upsample": False, "decontaminate_against": []})
    recs, _ = build_mixture(vcfg, allow_empty=True)
    return recs


# ----------------------------------------------------------------------------- recipe

RUN_FILES = ("adapter", "run.json", "log.jsonl", "tb", "curriculum.json", "stage2", "stage3", "eval")


def previous_run(out: Path) -> list[str]:
    """What of an earlier training run ``out`` holds (its adapter, run.json, checkpoints...)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = [n for n in RUN_FILES if (out / n).exists()]
    return found + sorted((p.name for p in out.glob("checkpoint-*")),
                          key=lambda n: int(n.rsplit("-", 1)[-1]) if n.rsplit("-", 1)[-1].isdigit() else 0)


def run_entries(out: Path) -> list[str]:
    """The names a training run writes in its folder (for the output check: anything else in
    ``--out`` is someone's file)."""
    return previous_run(out) + [p.name for p in Path(out).glob(".adapter-*")]  # (a save cut short)


def clear_run(out: Path) -> list[str]:
    """Remove an earlier run's files from ``out`` (only the names :func:`previous_run` lists:
    anything else in the folder stays); returns what was removed."""
    gone = run_entries(out)
    for name in gone:
        p = Path(out) / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return gone


def main(cfg: TrainConfig, *, resume: bool = False, on_invalid: str = "skip") -> dict:
    """Train; a run that fails before its first complete checkpoint leaves no output folder it
    created behind. ``on_invalid``: rows breaking the record rules are skipped (their count is
    printed) or stop the run (``"fail"``)."""
    out = Path(cfg.output_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0 and read_marker(out) is None:
        write_marker(out, "train", files=[])  # (its files are the run's own: run_entries)
    try:
        return _main(cfg, out, resume, on_invalid)
    except BaseException:
        if created and latest_complete_checkpoint(out) is None and not (out / "adapter").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _main(cfg: TrainConfig, out: Path, resume: bool, on_invalid: str = "skip") -> dict:
    t_start = time.time()
    torch.manual_seed(cfg.seed)

    # 1. data: the mixture (plain data, fixed seeded order) and a validation sample
    issues: list = []
    records, manifest = build_mixture(cfg.mixture, on_invalid=on_invalid, issues=issues)
    if int(os.environ.get("RANK", "0")) == 0:
        from shoptune.console import err
        from shoptune.data.loaders import skipped_line
        err.print(skipped_line(issues), markup=False, highlight=False, soft_wrap=True)
    if not records:
        raise ValueError("the mixture selected no training rows; check sources and filters")
    val = validation_records(cfg.mixture, cfg.eval_samples, cfg.seed) if cfg.eval_steps else []

    # 2. model + adapter (LoRA, or Poly routed by task/capability), loss balancing groups
    routing = routing_table(records, cfg.poly.route_by) if cfg.peft == "poly" else None
    compiled = use_compile(cfg)
    model, tok = build_model(cfg.model, cfg.lora, base_dtype=base_weights_dtype(cfg),
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             quantization=cfg.quantization, packing=cfg.packing, peft=cfg.peft,
                             poly=cfg.poly, n_routes=len(routing["routes"]) if routing else 1,
                             compile=compiled)
    task_names = sorted({r.task for r in records})
    task_index = {t: i for i, t in enumerate(task_names)}
    examples = encode_records(records, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                              task_index=task_index)
    balancer = _balancer(cfg, records, task_names, examples)
    if routing:
        for e in examples:
            e["route_id"] = routing["task_route"][task_names[e["task_id"]]]
    manifest["tokens"] = {"total": sum(e["length"] for e in examples),
                          "answer": sum(sum(1 for x in e["labels"] if x != IGNORE) for e in examples)}

    # 3. train (one stage, or the three-stage curriculum)
    evaluator = PeriodicEval(val, tok, cfg.protocol, cfg.eval_steps) if val else None
    if cfg.curriculum == "three-stage":
        from shoptune.train.curriculum import run_three_stage
        trainer, curriculum_report = run_three_stage(cfg, model, tok, records, val, examples,
                                                     task_names, out, resume=resume,
                                                     evaluator=evaluator)
    else:
        trainer = make_trainer(cfg, model, tok, examples, task_names, out, cfg.max_steps, evaluator,
                               balancer=balancer)
        train(trainer, out, resume)
        curriculum_report = None

    # 4. save + report
    gathered = full_state_dict(trainer)  # sharded (FSDP) weights: every process takes part
    is_main = trainer.is_world_process_zero()
    result: dict = {}
    if is_main:
        adapter = save_adapter(trainer.model, out, gathered,
                               extra={"routing.json": routing} if routing else None)
        hist = [h for h in trainer.state.log_history if "loss" in h]
        earlier = [st for st in ((curriculum_report or {}).get("stages") or {}).values()]
        result = {
            "config": cfg.model_dump(), "mixture": manifest, "curriculum": curriculum_report,
            "adapter": str(adapter), "git_commit": _git_commit(), "versions": _versions(),
            "trainable_params": trainable_parameters(trainer.model),
            "balancing": ({**balancer.state(), **balancer.log_items()} if balancer is not None else None),
            "argv": sys.argv, "world_size": trainer.args.world_size,
            "compiled": compiled,  # (what compile: auto|on|off came to on this machine)
            # a curriculum's earlier stages count: steps and tokens add up, first loss is stage 2's
            "metrics": {"first_loss": next((st["first_loss"] for st in earlier), None)
                        if earlier else (hist[0]["loss"] if hist else None),
                        "final_loss": hist[-1]["loss"] if hist else None,
                        "loss_logs": None if earlier else len(hist),  # 1: first = final, no change seen
                        # the mean over the steps of this call (also when no step was logged)
                        "mean_loss": next((round(h["train_loss"], 4) for h in reversed(trainer.state.log_history)
                                           if "train_loss" in h), None),
                        "steps": trainer.state.global_step + sum(st["steps"] for st in earlier),
                        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0)
                        + sum(st["tokens_seen"] for st in earlier),
                        **({"val": evaluator.evaluate(trainer.model)} if evaluator else {})},
            "wall_time_s": round(time.time() - t_start, 1),
        }
        if cfg.eval_data:
            from shoptune.eval.runner import evaluate
            result["eval"] = {}
            for d in cfg.eval_data:
                name = Path(d).stem
                s = evaluate(model=cfg.model, adapter=str(adapter), data=[d], out=out / "eval" / name,
                             quiet=True, overwrite=True)  # (this run's own, resumed or re-run)
                result["eval"][name] = {"overall": s["overall"], "tracks": s["tracks"]}
        write_json(out / "run.json", result)
    return result


def cli_main(argv: list[str] | None = None) -> None:
    """``python -m shoptune.train.recipe CONFIG [key=value ...] [--resume]`` (for accelerate)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    path = argv[0] if argv and "=" not in argv[0] else None
    cfg = load_config(path, [a for a in argv if "=" in a])
    main(cfg, resume=resume)


if __name__ == "__main__":
    cli_main()
