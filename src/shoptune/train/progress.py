"""What training shows on the terminal: the step bar with one short line per log (step, loss,
learning rate, tokens/s, validation scores) instead of transformers' raw dict of every logged
value, and the per-task losses as a table at the end (:func:`task_loss_table`, read from
``OUT/log.jsonl``, where every logged value stays, as in TensorBoard).
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import ProgressCallback


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_log(step: int, max_steps: int, logs: dict) -> str | None:
    """One line for a log event, or None for events with nothing to show."""
    if "loss" in logs:
        parts = [f"step {step}/{max_steps}", f"loss {logs['loss']:.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.3g}")
        if "tokens_per_s" in logs:
            parts.append(f"{logs['tokens_per_s']:.0f} tok/s")
        tasks = [k for k in logs if k.startswith("loss/")]
        if tasks:
            parts.append(f"{len(tasks)} task losses in log.jsonl")
        return ", ".join(parts)
    if "train_loss" in logs:
        return (f"done: {step} steps, mean loss {logs['train_loss']:.4f}, "
                f"{float(logs.get('train_runtime', 0)):.1f} s")
    shown = {k: v for k, v in logs.items() if k.startswith("val/") or k == "eval_loss"}
    if shown:
        return f"step {step}/{max_steps}, " + ", ".join(f"{k} {_num(v)}" for k, v in shown.items())
    return None


class CompactProgress(ProgressCallback):
    """transformers' progress bar; each log event is one short line (see :func:`format_log`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = format_log(state.global_step, state.max_steps, logs)
            if line:
                self.training_bar.write(line)


def use_compact_progress(trainer) -> None:
    """Replace the trainer's progress callback (if it shows one) with :class:`CompactProgress`."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(CompactProgress)


def task_losses(log_path: Path) -> dict[str, tuple[float, float, int]]:
    """Per task: (first logged loss, last logged loss, logs) from a run's ``log.jsonl``."""
    out: dict[str, list] = {}
    if not Path(log_path).exists():
        return {}
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in row.items():
            if k.startswith("loss/") and isinstance(v, (int, float)):
                first, _, n = out.get(k[5:], (v, v, 0))
                out[k[5:]] = (first, v, n + 1)
    return {t: tuple(v) for t, v in sorted(out.items())}


def task_loss_table(log_path: Path):
    """A rich Table of :func:`task_losses` (None when nothing was logged). A task logged once has
    no change to show (``-``, not ``+0.0000``); when no task was logged twice, only the loss."""
    from rich.table import Table

    losses = task_losses(log_path)
    if not losses:
        return None
    if all(n == 1 for _, _, n in losses.values()):
        from rich.console import Group
        from rich.text import Text
        t = Table("task", "loss")
        t.columns[1].justify = "right"
        for task, (_, last, _) in losses.items():
            t.add_row(task, f"{last:.4f}")
        return Group(Text("training loss per task (answer tokens), logged once: too few logs to show "
                          "a change"), t)
    t = Table(title="training loss per task (answer tokens; first -> last log)")
    for col in ("task", "first", "last", "change", "logs"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for task, (first, last, n) in losses.items():
        t.add_row(task, f"{first:.4f}", f"{last:.4f}", f"{last - first:+.4f}" if n > 1 else "-", str(n))
    return t
