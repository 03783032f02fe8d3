"""Three-stage training (arXiv 2411.03644), as ``curriculum: three-stage`` in a train config.

1. Task filtering. Tasks with fewer than ``low_resource_rows`` rows are low-resource. A probe
   measures transfer: the cosine between each task's LoRA gradient and the mean direction of the
   other tasks' gradients. Tasks below ``min_transfer`` (negative transfer) are excluded; the
   evidence goes to ``OUT/curriculum.json``.
2. Fine-tune on the kept high-resource tasks (``stage2_fraction`` of ``max_steps``).
3. Continue on all kept tasks, low-resource ones up-weighted (``low_resource_weight``), with
   per-task early stopping: every ``eval_every`` steps each task's validation loss is measured; a
   task that has not improved for ``patience`` evaluations gets loss weight 0 from then on.

Each stage is a Trainer run in ``OUT/stage2``, ``OUT/stage3`` (checkpointed, resumable).
"""
from __future__ import annotations

import json
import weakref
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from shoptune._io import write_json
from shoptune.train.format import encode_records
from shoptune.train.loss import mean_answer_loss
from shoptune.train.mixture import build_mixture
from shoptune.train.trainer import latest_complete_checkpoint, make_trainer, save_adapter, train

DONE = "STAGE_DONE"


def _lora_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


def _batches(examples: list[dict], size: int):
    for k in range(0, len(examples), size):
        yield examples[k:k + size]


def gradient_probe(model, examples: list[dict], task_names: list[str], *, batches: int,
                   batch_size: int, pad_id: int) -> dict[str, float]:
    """Cosine between each task's gradient and the mean unit gradient of the other tasks."""
    params = _lora_params(model)
    grads: dict[str, torch.Tensor] = {}
    model.train()
    for tid, name in enumerate(task_names):
        rows = [e for e in examples if e["task_id"] == tid][: batches * batch_size]
        if not rows:
            continue
        model.zero_grad(set_to_none=True)
        for batch in _batches(rows, batch_size):
            mean_answer_loss(model, batch, pad_id).backward()
        grads[name] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                 for p in params]).detach().clone()
    model.zero_grad(set_to_none=True)
    units = {t: g / g.norm().clamp(min=1e-12) for t, g in grads.items()}
    total = sum(units.values())
    sims = {}
    for t, u in units.items():
        others = total - u
        sims[t] = float(torch.dot(u, others) / others.norm().clamp(min=1e-12)) if len(units) > 1 else 1.0
    return sims


@torch.no_grad()
def task_val_losses(model, val_examples: list[dict], task_names: list[str], pad_id: int,
                    batch_size: int) -> dict[str, float]:
    was = model.training
    model.eval()
    out = {}
    for tid, name in enumerate(task_names):
        rows = [e for e in val_examples if e["task_id"] == tid]
        if rows:
            out[name] = float(sum(mean_answer_loss(model, b, pad_id) * len(b) for b in _batches(rows, batch_size))
                              / len(rows))
    if was:
        model.train()
    return out


class PerTaskEarlyStop(TrainerCallback):
    """Zero the loss weight of a task whose validation loss stopped improving."""

    def __init__(self, trainer_ref, val_examples, task_names, pad_id, every, patience, batch_size, report):
        self.ref, self.val, self.names, self.pad = trainer_ref, val_examples, task_names, pad_id
        self.every, self.patience, self.bs, self.report = every, patience, batch_size, report
        self.best: dict[str, float] = {}
        self.bad: Counter = Counter()

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.ref()
        if not self.every or state.global_step % self.every or trainer is None:
            return
        losses = task_val_losses(trainer.model, self.val, self.names, self.pad, self.bs)
        for t, v in losses.items():
            tid = self.names.index(t)
            if trainer.task_weights[tid] == 0:
                continue
            if v < self.best.get(t, float("inf")) - 1e-4:
                self.best[t], self.bad[t] = v, 0
            else:
                self.bad[t] += 1
                if self.bad[t] > self.patience:
                    trainer.task_weights[tid] = 0.0
                    self.report["stopped"][t] = state.global_step
        self.report["val_loss_history"].append({"step": state.global_step, **{k: round(v, 4) for k, v in losses.items()}})
        trainer.log({f"val_loss/{k}": round(v, 4) for k, v in losses.items()})

    # The early-stopping state travels with each checkpoint (written before its COMPLETE marker),
    # so --resume continues with the same stopped tasks, best losses and patience counters.
    STATE_FILE = "early_stop.json"

    def on_save(self, args, state, control, **kwargs):
        trainer = self.ref()
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and trainer is not None and ckpt.is_dir():
            write_json(ckpt / self.STATE_FILE, {
                "best": self.best, "bad": dict(self.bad), "stopped": self.report["stopped"],
                "val_loss_history": self.report["val_loss_history"],
                "task_weights": [float(w) for w in trainer.task_weights]})

    def restore(self, ckpt: Path) -> bool:
        path = ckpt / self.STATE_FILE
        trainer = self.ref()
        if trainer is None or not path.exists():
            return False
        saved = json.loads(path.read_text(encoding="utf-8"))
        self.best, self.bad = dict(saved["best"]), Counter(saved["bad"])
        self.report["stopped"] = dict(saved["stopped"])
        self.report["val_loss_history"] = list(saved["val_loss_history"])
        trainer.task_weights = torch.tensor(saved["task_weights"], dtype=trainer.task_weights.dtype)
        return True


def run_three_stage(cfg, model, tok, records, val, examples, task_names, out: Path, *,
                    resume: bool, evaluator):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    st = cfg.three_stage
    counts = Counter(r.task for r in records)
    low = sorted(t for t in task_names if counts[t] < st.low_resource_rows)
    report = {"rows": dict(counts), "low_resource": low, "low_resource_rows": st.low_resource_rows,
              "stopped": {}, "val_loss_history": []}

    # Stage 1: filter tasks by transfer (gradient cosine to the other tasks' mean direction)
    sims = gradient_probe(model, examples, task_names, batches=st.probe_batches,
                          batch_size=cfg.batch_size, pad_id=tok.pad_token_id)
    excluded = sorted(t for t, s in sims.items() if s < st.min_transfer)
    kept = [t for t in task_names if t not in excluded]
    high = [t for t in kept if t not in low] or kept
    report.update({"transfer_cosine": {k: round(v, 4) for k, v in sims.items()},
                   "min_transfer": st.min_transfer, "excluded": excluded,
                   "stage2_tasks": high, "stage3_tasks": kept})
    write_json(out / "curriculum.json", report)
    if not kept:
        raise ValueError(f"three-stage: every task fell below min_transfer={st.min_transfer}; "
                         f"see {out / 'curriculum.json'}")

    # Stage 2: the high-resource tasks
    n2 = max(1, int(cfg.max_steps * st.stage2_fraction))
    d2 = out / "stage2"
    if resume and (d2 / DONE).exists():
        set_peft_model_state_dict(model, load_file(d2 / "adapter" / "adapter_model.safetensors"))
    else:
        ex2 = [e for e in examples if task_names[e["task_id"]] in high]
        t2 = make_trainer(cfg, model, tok, ex2, task_names, d2, n2, evaluator)
        train(t2, d2, resume)
        if t2.is_world_process_zero():
            save_adapter(t2.model, d2)
            hist = [h for h in t2.state.log_history if "loss" in h]
            write_json(d2 / "stage.json", {
                "steps": t2.state.global_step, "tokens_seen": int(t2.state.num_input_tokens_seen or 0),
                "first_loss": hist[0]["loss"] if hist else None,
                "final_loss": hist[-1]["loss"] if hist else None})
            (d2 / DONE).write_text("ok")
    if (d2 / "stage.json").exists():  # (a stage 2 finished before this file existed: not counted)
        report["stages"] = {"stage2": json.loads((d2 / "stage.json").read_text(encoding="utf-8"))}

    # Stage 3: all kept tasks, low-resource up-weighted, per-task early stopping
    weights = torch.tensor([0.0 if t in excluded else st.low_resource_weight if t in low else 1.0
                            for t in task_names])
    ex3 = [e for e in examples if task_names[e["task_id"]] in kept]
    vcfg = cfg.mixture.model_copy(update={"split": "validation", "total": None, "upsample": False,
                                          "max_per_task": st.val_rows_per_task,
                                          "include_tasks": kept, "decontaminate_against": []})
    vrecs = [r for r in build_mixture(vcfg, allow_empty=True)[0] if r.task in kept]
    val_ex = encode_records(vrecs, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                            task_index={t: i for i, t in enumerate(task_names)})
    d3 = out / "stage3"
    stopper = PerTaskEarlyStop(None, val_ex, task_names, tok.pad_token_id, st.eval_every, st.patience,
                               cfg.batch_size, report)
    # stage 3 draws its own data order: with the stage 2 seed it would replay stage 2's first
    # batches (the same rows again whenever the task sets overlap)
    t3 = make_trainer(cfg, model, tok, ex3, task_names, d3, max(1, cfg.max_steps - n2), evaluator,
                      task_weights=weights, before_complete=[stopper], data_seed=cfg.seed + 1)
    stopper.ref = weakref.ref(t3)
    ckpt = latest_complete_checkpoint(d3) if resume else None
    if ckpt is not None:
        stopper.restore(ckpt)
    train(t3, d3, resume)
    report["final_task_weights"] = {t: float(w) for t, w in zip(task_names, t3.task_weights)}
    if t3.is_world_process_zero():
        write_json(out / "curriculum.json", report)
    return t3, report
