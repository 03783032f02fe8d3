"""The training machinery the recipe and the three-stage curriculum share: the multi-task
``Trainer`` (answer-only, per-task weighted loss), its callbacks (JSON-lines log, checkpoint
``COMPLETE`` markers, periodic evaluation), training arguments, the LoRA model, atomic adapter
saving and exact resume. ``recipe`` (setup -> train -> save) and ``curriculum`` (three stages)
both build on it; neither imports the other's internals.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from shoptune._io import atomic_open, default_modes, make_temp_dir
from shoptune.train.config import TrainConfig
from shoptune.train.loss import answer_token_losses, collate
from shoptune.train.packing import collate_packed

COMPLETE = "COMPLETE"


# ----------------------------------------------------------------------------- components

class ShopTrainer(Trainer):
    """Trainer with a per-task weighted, answer-only loss and per-task loss logging."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args, task_names: list[str], task_weights: torch.Tensor | None = None,
                 answer_logits_only: bool = True, balancer=None, skill_lr_scale: float | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.skill_lr_scale = skill_lr_scale  # Poly's skills under poly.alpha (see create_optimizer)
        self.answer_logits_only = answer_logits_only
        self.balancer = balancer  # shoptune.train.balancing.Balancer, or None (static)
        self._probed_step = -1
        self.model_accepts_loss_kwargs = True  # so Trainer counts answer tokens over the GA window
        self.task_names = task_names
        self.task_weights = task_weights if task_weights is not None else torch.ones(len(task_names))
        self._task_sum = torch.zeros(len(task_names), dtype=torch.float64)
        self._task_n = torch.zeros(len(task_names), dtype=torch.float64)
        self._last_log = (time.time(), 0)  # (time, tokens seen) of the last log; reset at train begin
        self.add_callback(_ThroughputClock(self))

    def _row_losses(self, model, inputs):
        """Per-row answer-token loss sums and counts; records the per-task loss for logging."""
        labels = inputs.pop("labels")
        task_ids = inputs.pop("task_ids")
        route_ids = inputs.pop("route_ids", None)
        packed = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        tok_loss, rows = answer_token_losses(model, inputs["input_ids"], inputs.get("attention_mask"),
                                             labels, answer_logits_only=self.answer_logits_only,
                                             route_ids=route_ids,
                                             **packed)  # packed batches: position ids, boundaries
        n_rows = task_ids.shape[0]  # one per example (a packed row holds several)
        row_sum = torch.zeros(n_rows, dtype=tok_loss.dtype, device=tok_loss.device).index_add(
            0, rows, tok_loss)
        row_n = torch.bincount(rows, minlength=n_rows).to(tok_loss.dtype)
        with torch.no_grad():
            self._task_sum.index_add_(0, task_ids.cpu(), row_sum.detach().double().cpu())
            self._task_n.index_add_(0, task_ids.cpu(), row_n.double().cpu())
        return row_sum * self.task_weights.to(row_sum.device)[task_ids], row_n

    def _ga_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _group_means(self, model, inputs):
        from shoptune.train.balancing import group_means
        group_ids = inputs.pop("group_ids")
        row_sum, row_n = self._row_losses(model, inputs)
        return group_means(row_sum, row_n, group_ids.to(row_sum.device), len(self.balancer.groups))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.balancer is not None:
            means, present = self._group_means(model, inputs)
            if self.balancer.method == "uncertainty" and model.training and self.args.logging_steps and \
                    (self.state.global_step + 1) % self.args.logging_steps == 0 and \
                    self._probed_step != self.state.global_step:
                self._probed_step = self.state.global_step
                self.balancer.probe_grad_norms(means, present, self._trainable())
            loss = self.balancer.combine(means, present) / self._ga_steps()
            return (loss, None) if return_outputs else loss
        row_sum, row_n = self._row_losses(model, inputs)
        if num_items_in_batch is None:
            denom = row_n.sum().clamp(min=1) * self.args.gradient_accumulation_steps
        else:
            denom = num_items_in_batch
        loss = row_sum.sum() / denom
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def _trainable(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``loss_balancing: upgrad``: the group losses' Jacobian, aggregated by torchjd, becomes
        the gradient (instead of one backward of a scalar loss)."""
        if self.balancer is None or not self.balancer.jacobian:
            return super().training_step(model, inputs, num_items_in_batch)
        if self.args.world_size > 1:
            raise ValueError("loss_balancing: upgrad runs on one process (its Jacobian bypasses "
                             "DDP's gradient reduction)")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            means, present = self._group_means(model, inputs)
        ga = self._ga_steps()
        self.balancer.backward(means, present, self._trainable(), scale=1.0 / ga)
        return (means[present].mean() / ga).detach()

    def create_optimizer(self, *args, **kwargs):
        """The balancer's learned log-variances train with the adapter (no weight decay). Under
        ``poly.alpha`` the skills' A and B train at ``skill_lr_scale`` x the learning rate with
        weight decay / ``skill_lr_scale`` (the reparametrisation of
        :class:`~shoptune.train.config.PolySettings`); the router keeps the learning rate."""
        opt = super().create_optimizer(*args, **kwargs)
        if self.skill_lr_scale:
            skills = {id(p) for n, p in self.model.named_parameters() if _is_poly_skill(n)}
            groups = []
            for g in opt.param_groups:  # (no state yet: the groups can be split)
                base = {k: v for k, v in g.items() if k != "params"}
                rest = [p for p in g["params"] if id(p) not in skills]
                mine = [p for p in g["params"] if id(p) in skills]
                groups += [{**base, "params": rest}] if rest else []
                groups += [{**base, "params": mine, "lr": g["lr"] * self.skill_lr_scale,
                            "weight_decay": g["weight_decay"] / self.skill_lr_scale}] if mine else []
            opt.param_groups[:] = groups
        if self.balancer is not None and self.balancer.log_vars.requires_grad:
            group = {"params": [self.balancer.log_vars], "weight_decay": 0.0}
            if self.balancer.lr is not None:
                group["lr"] = self.balancer.lr
            opt.add_param_group(group)
        return opt

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:
            for i, name in enumerate(self.task_names):
                if self._task_n[i] > 0:
                    logs[f"loss/{name}"] = round(float(self._task_sum[i] / self._task_n[i]), 4)
            self._task_sum.zero_()
            self._task_n.zero_()
            now, seen = time.time(), int(self.state.num_input_tokens_seen or 0)
            t0, s0 = self._last_log
            if now > t0 and seen > s0:
                logs["tokens_per_s"] = round((seen - s0) / (now - t0), 1)
            self._last_log = (now, seen)
            if self.balancer is not None:
                logs.update(self.balancer.log_items())
        super().log(logs, *args, **kwargs)


class _ThroughputClock(TrainerCallback):
    """Starts the tokens/s clock when training (re)starts, from the tokens seen so far: after a
    resume the first interval counts only this session's tokens and time."""

    def __init__(self, trainer: ShopTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._last_log = (time.time(), int(state.num_input_tokens_seen or 0))


class JsonlLog(TrainerCallback):
    """Every log line, as JSON lines, in OUT/log.jsonl (process 0)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class MarkComplete(TrainerCallback):
    """A checkpoint counts only once its COMPLETE marker exists (written after everything else)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                default_modes(ckpt)  # (safetensors writes 0600: readable as any other output)
                with atomic_open(ckpt / COMPLETE) as fh:
                    fh.write(str(state.global_step))


class PeriodicEval(TrainerCallback):
    """Score a small validation sample with the evaluation engine every ``every`` steps."""

    def __init__(self, records, tok, protocol: str, every: int):
        self.records, self.tok, self.protocol, self.every = records, tok, protocol, every
        self.trainer: Trainer | None = None
        self.last: dict = {}

    def evaluate(self, model) -> dict:
        from shoptune.decoding import build_prompts
        from shoptune.tasks import plan_for
        from shoptune.eval.backends import LocalBackend
        from shoptune.eval.scoring import score_outputs, summarize
        was_training = model.training
        model.eval()
        from shoptune.train.loss import autocast_for
        # (compiled layers run eagerly here: generation's KV-cache steps are not the training
        # step's shapes, and would only cost compiles)
        with torch.compiler.set_stance("force_eager"), autocast_for(model):
            outs = LocalBackend(model, self.tok, batch_size=16).run(
                build_prompts(self.records, self.protocol, self.tok), [plan_for(r) for r in self.records])
        if was_training:
            model.train()
        s = summarize(score_outputs(self.records, outs), n_boot=0)
        self.last = {"val/overall": round(s["overall"], 4),
                     **{f"val/{k}": round(v, 4) for k, v in s["capabilities"].items()}}
        return self.last

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and self.records and \
                state.is_world_process_zero and self.trainer is not None:
            self.trainer.log(self.evaluate(self.trainer.model))


def latest_complete_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint with its COMPLETE marker; incomplete ones newer than it are removed."""
    ckpts = sorted((p for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    best = None
    for p in ckpts:
        if (p / COMPLETE).exists():
            best = p
    for p in ckpts:
        if best is None or int(p.name.split("-")[-1]) > int(best.name.split("-")[-1]):
            shutil.rmtree(p, ignore_errors=True)
    return best


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines from after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    with atomic_open(path) as fh:
        fh.write("".join(k + "\n" for k in keep))


def use_bf16(setting) -> bool:
    if setting == "auto":
        from shoptune.models import default_dtype
        return default_dtype() == torch.bfloat16
    return bool(setting)


def effective_learning_rate(cfg: TrainConfig) -> float:
    """The optimizer's learning rate: the config's; times sqrt(poly.alpha) for the whole adapter
    under ``poly.router_lr: scaled`` (the skills alone under ``base``: :func:`skill_lr_scale`)."""
    if cfg.peft == "poly" and cfg.poly.alpha and cfg.poly.router_lr == "scaled":
        return cfg.learning_rate * cfg.poly.alpha ** 0.5
    return cfg.learning_rate


def skill_lr_scale(cfg: TrainConfig) -> float | None:
    """sqrt(poly.alpha): the factor on Poly's skills' learning rate (and on their gradients, set
    in :func:`build_model`) that makes poly.alpha exact; None when nothing is scaled that way."""
    if cfg.peft == "poly" and cfg.poly.alpha and cfg.poly.router_lr == "base":
        return cfg.poly.alpha ** 0.5
    return None


def _is_poly_skill(name: str) -> bool:
    return ".poly_lora_A." in name or ".poly_lora_B." in name or name.endswith(("poly_lora_A.default", "poly_lora_B.default"))


def training_args(cfg: TrainConfig, out: Path, max_steps: int, data_seed: int | None = None) -> TrainingArguments:
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tb"))  # transformers 5 reads it here
    return TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=effective_learning_rate(cfg),
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit, seed=cfg.seed,
        data_seed=cfg.seed if data_seed is None else data_seed, bf16=use_bf16(cfg.bf16), use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length", length_column_name="length",
        remove_unused_columns=False, report_to=cfg.report_to, dataloader_num_workers=0,
        # a packed batch has no padding (and no attention mask to count it by)
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",
        gradient_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=False,  # (compiling: build_model compiles the decoder layers, see use_compile)
    )


def use_compile(cfg: TrainConfig) -> bool:
    """``compile: on``, or ``auto`` where it was measured to pay on this machine kind
    (:func:`shoptune.compiling.resolve`); ``auto`` leaves packed and k-bit runs eager."""
    from shoptune.compiling import resolve
    if cfg.compile == "auto" and (cfg.packing or cfg.quantization != "none"):
        return False
    return resolve(cfg.compile, "train")


def base_weights_dtype(cfg: TrainConfig) -> torch.dtype:
    """bf16 frozen weights only under bf16 autocast (auto: whenever training runs in bf16)."""
    bf16 = use_bf16(cfg.bf16)
    if cfg.base_dtype == "bf16" and not bf16:
        raise ValueError("base_dtype: bf16 needs bf16 training (bf16: true or auto on a bf16 machine)")
    return torch.bfloat16 if bf16 and cfg.base_dtype != "fp32" else torch.float32


def build_model(model_name: str, lora, *, base_dtype: torch.dtype = torch.float32,
                gradient_checkpointing: bool = False, quantization: str = "none",
                packing: bool = False, peft: str = "lora", poly=None, n_routes: int = 1,
                compile: bool = False):
    """The base model with LoRA on ``lora.modules()`` (or, ``peft="poly"``, peft's Poly adapter:
    ``poly.n_skills`` rank-``lora.r`` skills per layer routed over ``n_routes`` tasks).
    ``base_dtype`` bf16 stores the frozen decoder Linear weights in bf16 (what autocast would
    cast them to at every step); embeddings, norms, adapter weights and the optimizer state stay
    fp32. ``quantization`` nf4/int8 loads those Linear weights k-bit instead (QLoRA, ``quant.py``;
    ``base_dtype`` is then the compute dtype); ``packing`` switches attention to one that keeps
    packed examples apart (``packing.py``); ``compile`` compiles each decoder layer in place
    (``shoptune.compiling``)."""
    from peft import LoraConfig, PolyConfig, get_peft_model

    from shoptune.models import load
    if quantization != "none":
        from shoptune.train.quant import load_quantized
        model, tok = load_quantized(model_name, quantization, compute_dtype=base_dtype,
                                    gradient_checkpointing=gradient_checkpointing)
    else:
        model, tok = load(model_name, dtype="fp32")
        model.train()
        if base_dtype != torch.float32:
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(base_dtype)
    if packing:
        from shoptune.train.packing import use_packed_attention
        use_packed_attention(model)
    if peft == "poly":
        _check_splits(model, lora.modules(), poly.n_splits)
        pcfg = PolyConfig(r=lora.r, target_modules=lora.modules(), n_tasks=n_routes,
                          n_skills=poly.n_skills, n_splits=poly.n_splits, task_type="CAUSAL_LM")
        model = get_peft_model(model, pcfg)
        if poly.alpha:  # (see PolySettings.alpha; the learning rates are set in the optimizer)
            s = poly.alpha ** 0.5
            for name, p in model.named_parameters():
                if "poly_lora_A" in name and _is_poly_skill(name):
                    with torch.no_grad():
                        p.mul_(s)
                if poly.router_lr == "base" and _is_poly_skill(name):
                    p.register_hook(lambda g, s=s: g * s)  # the alpha/r model's gradient
    else:
        lcfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.modules(), use_rslora=lora.use_rslora,
                          task_type="CAUSAL_LM", bias="none")
        model = get_peft_model(model, lcfg)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    if compile:
        from shoptune.compiling import compile_layers
        compile_layers(model)
    return model, tok


def _check_splits(model, modules: list[str], n_splits: int) -> None:
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules:
            if m.in_features % n_splits or m.out_features % n_splits:
                raise ValueError(f"poly.n_splits {n_splits} does not divide {name.rsplit('.', 1)[-1]}'s "
                                 f"{m.in_features} x {m.out_features} features")


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(model, out: Path, state_dict: dict | None = None, extra: dict | None = None) -> Path:
    """OUT/adapter written into a temp folder, then renamed: never half-written. ``extra``:
    JSON files to write beside the adapter (e.g. a Poly adapter's ``routing.json``). ``state_dict``:
    the gathered weights of a sharded (FSDP) model (``sharded.full_state_dict``)."""
    dest = out / "adapter"
    tmp = make_temp_dir(out, ".adapter-")  # (mode as mkdir gives, not mkdtemp's 0700)
    model.save_pretrained(str(tmp), safe_serialization=True,
                          **({"state_dict": state_dict} if state_dict is not None else {}))
    for name, value in (extra or {}).items():
        with atomic_open(tmp / name) as fh:
            fh.write(json.dumps(value, indent=1, sort_keys=True))
    default_modes(tmp)  # (safetensors writes 0600; a server running as another user reads it)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


class BalancerState(TrainerCallback):
    """The loss balancer's learned state in each checkpoint (``balancing.json``), for exact
    resume; its gradients cleared after every optimizer step."""

    FILE = "balancing.json"

    def __init__(self, balancer):
        self.balancer = balancer

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Trainer zeroes the model's gradients after each step; the balancer is not in the model
        self.balancer.log_vars.grad = None

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            with atomic_open(ckpt / self.FILE) as fh:
                fh.write(json.dumps(self.balancer.state()))


def make_trainer(cfg, model, tok, examples, task_names, out: Path, max_steps: int, evaluator,
                 task_weights: torch.Tensor | None = None,
                 before_complete: list[TrainerCallback] = (), data_seed: int | None = None,
                 balancer=None) -> ShopTrainer:
    """``before_complete``: callbacks whose ``on_save`` adds files to a checkpoint (they run
    before the COMPLETE marker is written). ``data_seed``: the data order's seed (default: the
    config's seed; a later stage passes another so it does not replay the earlier stage's order).
    ``balancer``: a :class:`~shoptune.train.balancing.Balancer` (examples carry ``group_id``)."""
    from datasets import Dataset

    extra = [BalancerState(balancer)] if balancer is not None else []
    trainer = ShopTrainer(
        model=model, args=training_args(cfg, out, max_steps, data_seed), train_dataset=Dataset.from_list(examples),
        data_collator=collate_packed if cfg.packing else lambda f: collate(f, tok.pad_token_id),
        task_names=task_names,
        task_weights=task_weights, answer_logits_only=cfg.answer_logits_only, balancer=balancer,
        skill_lr_scale=skill_lr_scale(cfg),
        callbacks=[JsonlLog(out / "log.jsonl"), *before_complete, *extra, MarkComplete()]
        + ([evaluator] if evaluator else []))
    if evaluator:
        evaluator.trainer = trainer
    from shoptune.train.sharded import fsdp_on_cpu
    fsdp_on_cpu(trainer)
    from shoptune.train.progress import use_compact_progress
    use_compact_progress(trainer)  # one short line per log, not transformers' raw dict
    return trainer


class CheckpointError(ValueError):
    """A checkpoint marked complete that cannot be resumed from: one line naming it and why."""


# what the adapter's structure is (a resume with another value cannot restore the optimizer)
_STRUCTURE = ("peft_type", "r", "target_modules", "n_skills", "n_splits", "n_tasks")


def check_checkpoint(ckpt: Path, model) -> None:
    """Before a resume: every file of the checkpoint reads (the JSON state parses, each torch
    file is a whole archive with matching checksums, the adapter's safetensors loads) and its
    adapter has the structure of ``model``'s (peft type, rank, target modules, Poly skills), so
    a file truncated after its COMPLETE marker or a run resumed under another config is one
    line, not a traceback from deep inside the Trainer or the optimizer."""
    import zipfile

    from safetensors.torch import load_file

    from shoptune._io import JSON_CAP, read_json

    def fail(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{ckpt / name}: {why}; the checkpoint is marked complete but cannot "
                               f"be resumed from: remove {ckpt.name} to resume from the one before, "
                               "or --overwrite to start over")
    for name in ("trainer_state.json", "adapter_config.json"):
        try:
            read_json(ckpt / name, name, JSON_CAP)
        except (OSError, ValueError) as e:
            raise fail(name, getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)) from None
    for f in sorted(ckpt.glob("*.pt")) + sorted(ckpt.glob("*.pth")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            raise fail(f.name, f"not a whole torch file ({e})") from None
        if bad is not None:
            raise fail(f.name, f"damaged (checksum of {bad})")
    try:
        load_file(ckpt / "adapter_model.safetensors")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise fail("adapter_model.safetensors", f"unreadable ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    saved = read_json(ckpt / "adapter_config.json", "adapter_config.json", JSON_CAP)
    now = model.peft_config["default"].to_dict() if hasattr(model, "peft_config") else {}
    for key in _STRUCTURE:
        a, b = saved.get(key), now.get(key)
        b = getattr(b, "value", b)  # (peft's PeftType enum)
        if key == "target_modules" and isinstance(a, list) and isinstance(b, (list, set)):
            a, b = sorted(a), sorted(b)
        if key in now and a != b:
            shown = {"peft_type": "peft", "r": "lora.r", "n_skills": "poly.n_skills",
                     "n_splits": "poly.n_splits", "n_tasks": "the routed tasks"}.get(key, key)
            raise CheckpointError(
                f"{ckpt}: saved by a run with {key} {a!r}, but this config gives {b!r} ({shown}): "
                "resume with the run's own config, or --overwrite to start over")


def train(trainer: ShopTrainer, out: Path, resume: bool) -> None:
    ckpt = latest_complete_checkpoint(out) if resume else None
    if ckpt is not None:
        check_checkpoint(ckpt, trainer.model)
        step = int(ckpt.name.split("-")[-1])
        _trim_log(out / "log.jsonl", step)
        if trainer.balancer is not None and (ckpt / BalancerState.FILE).exists():
            trainer.balancer.restore(json.loads((ckpt / BalancerState.FILE).read_text(encoding="utf-8")))
        if step >= trainer.args.max_steps:
            _restore_finished(trainer, ckpt)
            return
    elif trainer.is_world_process_zero() and (out / "log.jsonl").exists() and not resume:
        (out / "log.jsonl").unlink()
    trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)


def _restore_finished(trainer: ShopTrainer, ckpt: Path) -> None:
    """A run killed after its last checkpoint: take the weights and state from it, train nothing.

    ``Trainer.train(resume_from_checkpoint=...)`` checks ``max_steps`` only after a step, so
    resuming at ``global_step == max_steps`` would run one step more (at the schedule's final
    learning rate, with the callbacks seeing a step that the uninterrupted run never had)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    weights = load_file(ckpt / "adapter_model.safetensors")
    result = set_peft_model_state_dict(trainer.model, weights)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{ckpt}: adapter weights do not fit the model: {result.unexpected_keys[:3]}")
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
