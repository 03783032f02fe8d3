"""Task-routed experts as plain LoRA adapters, and adapters merged into one.

* :func:`export_experts`: a peft **Poly** (Multi-Head Routing) adapter, whose routing is fixed per
  task, is one plain LoRA per task: with the task's mixing weights ``w`` (sigmoid of the router's
  logits, normalised per split) each layer adds ``x @ A_t @ B_t / r`` where
  ``A_t[split] = sum_s w[split, s] A[split, s]`` and ``B_t[split] = sum_s w[split, s] B[split, s]``.
  Written as a PEFT LoRA (``lora_A = A_t^T``, ``lora_B = B_t^T``, ``r`` = Poly's r,
  ``lora_alpha = 1`` so the scale is ``1/r``), it is served by any engine that serves LoRA (the
  built-in engine, llama.cpp, vLLM) with no engine change. A route may also be a *group* of tasks
  (e.g. a capability): its expert uses the mean of their mixing weights.
* :func:`merge_adapters`: several LoRA adapters merged into one with peft's
  ``add_weighted_adapter`` (``ties``, ``dare_ties``, ``linear``, ...).

    shoptune export experts runs/poly --out runs/poly/experts
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from shoptune._io import make_temp_dir, write_json

EPS = 1e-12  # peft.tuners.poly.router.EPS: the normalisation Poly's router applies
# the combination types peft's LoRA add_weighted_adapter accepts (peft/tuners/lora/model.py)
MERGE_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat", "svd",
                 "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")


class ExpertError(ValueError):
    """An adapter folder that cannot be exported or merged (one line, names the folder)."""


def _read_config(folder: Path) -> dict:
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ExpertError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    return json.loads(path.read_text(encoding="utf-8"))


def routing_table(records, route_by: str) -> dict:
    """Poly's routes for a training mixture: one per task (``route_by: task``) or per capability;
    ``task_route`` maps each training task to its route id. Saved as ``adapter/routing.json``."""
    from shoptune.records import CAPABILITIES
    caps = {r.task: r.capability for r in records}
    tasks = sorted(caps)
    if route_by == "task":
        routes = tasks
        task_route = {t: i for i, t in enumerate(tasks)}
    elif route_by == "capability":
        routes = [c for c in CAPABILITIES if c in set(caps.values())]
        task_route = {t: routes.index(caps[t]) for t in tasks}
    else:
        raise ExpertError(f"route_by {route_by!r}: task or capability")
    return {"route_by": route_by, "routes": routes, "task_route": task_route, "task_capability": caps}


def expert_routes(routing: dict) -> dict[str, list[int]]:
    """The experts to export for a routing table: one per route, and with ``route_by: task`` one
    per capability too (the mean mixing weights of its tasks: the expert for a task the adapter
    was not trained on, e.g. ShopBench's own tasks)."""
    routes = {name: [i] for i, name in enumerate(routing["routes"])}
    if routing["route_by"] == "task":
        by_cap: dict[str, list[int]] = {}
        for task, cap in sorted(routing["task_capability"].items()):
            by_cap.setdefault(cap, []).append(routing["task_route"][task])
        routes.update(by_cap)
    return routes


def expert_for(routing: dict, task: str, capability: str) -> str:
    """The expert that answers a question of ``task`` (its card name) and ``capability``."""
    if routing["route_by"] == "task" and task in routing["task_route"]:
        return task
    return capability


def mixing_weights(module_logits: torch.Tensor, n_splits: int, n_skills: int) -> torch.Tensor:
    """Poly's router in eval mode: (n_tasks, n_splits, n_skills) weights, summing to 1 per split."""
    w = torch.sigmoid(module_logits.double()).view(-1, n_splits, n_skills)
    return w / (w.sum(-1, keepdim=True) + EPS)


def expert_state(weights: dict[str, torch.Tensor], cfg: dict, tasks: list[int]) -> dict[str, torch.Tensor]:
    """The LoRA state dict of the expert for ``tasks`` (one task id, or several averaged)."""
    q, s = int(cfg["n_splits"]), int(cfg["n_skills"])
    out = {}
    for key, a in weights.items():
        if not key.endswith(".poly_lora_A"):
            continue
        prefix = key[: -len(".poly_lora_A")]
        b = weights[prefix + ".poly_lora_B"]
        w = mixing_weights(weights[prefix + ".poly_router.module_logits"], q, s)[tasks].mean(0)  # (q, s)
        _, _, d_in, r = a.shape
        d_out = b.shape[-1]
        a_t = torch.einsum("qs,qsdr->qdr", w, a.double()).reshape(q * d_in, r)
        b_t = torch.einsum("qs,qsrd->qrd", w, b.double()).transpose(0, 1).reshape(r, q * d_out)
        out[prefix + ".lora_A.weight"] = a_t.T.contiguous().to(a.dtype)
        out[prefix + ".lora_B.weight"] = b_t.T.contiguous().to(b.dtype)
    if not out:
        raise ExpertError("no Poly layers in the adapter's weights")
    return out


def lora_config_for(cfg: dict) -> dict:
    """The PEFT LoRA config equal to a Poly layer with its routing fixed (scale 1/r)."""
    from peft import LoraConfig
    lcfg = LoraConfig(r=int(cfg["r"]), lora_alpha=1, lora_dropout=0.0, bias="none",
                      target_modules=sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], list)
                      else cfg["target_modules"], task_type=cfg.get("task_type") or "CAUSAL_LM",
                      base_model_name_or_path=cfg.get("base_model_name_or_path"))
    d = lcfg.to_dict()
    d["peft_type"] = "LORA"
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def export_experts(poly_dir: Path, out: Path, routes: dict[str, list[int]]) -> dict[str, Path]:
    """One PEFT LoRA folder per route (name -> the Poly task ids it stands for) under ``out``,
    plus ``out/experts.json`` (route -> folder, task ids). Each folder is written to a temporary
    name and renamed, so a folder that exists is complete."""
    from safetensors.torch import load_file, save_file

    from shoptune.serve.engine import ADAPTER_NAME_RE
    poly_dir, out = Path(poly_dir), Path(out)
    cfg = _read_config(poly_dir)
    if cfg.get("peft_type") != "POLY":
        raise ExpertError(f"{poly_dir}: a {cfg.get('peft_type')} adapter; experts are exported from POLY adapters")
    weights = load_file(str(poly_dir / "adapter_model.safetensors"))
    n_tasks = int(cfg["n_tasks"])
    out.mkdir(parents=True, exist_ok=True)
    lcfg = lora_config_for(cfg)
    written = {}
    for name, tasks in routes.items():
        if not ADAPTER_NAME_RE.match(name):
            raise ExpertError(f"expert name {name!r}: letters, digits, '.', '_', '-'")
        bad = [t for t in tasks if not 0 <= t < n_tasks]
        if not tasks or bad:
            raise ExpertError(f"expert {name}: task ids {tasks} (the adapter routes {n_tasks} tasks)")
        tmp = make_temp_dir(out, f".{name}-")  # (readable as any output, not 0700)
        save_file(expert_state(weights, cfg, list(tasks)), str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", lcfg)
        dest = out / name
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        written[name] = dest
    write_json(out / "experts.json", {"poly_adapter": str(poly_dir), "routes": routes,
                                      "experts": {n: str(p) for n, p in written.items()}})
    return written


ALL_TASKS = "all-tasks"  # the fallback expert of ``fallback="mean"`` (no task or capability has this name)
FALLBACKS = ("capability", "mean")


def export_run_experts(run: Path, out: Path, *, fallback: str = "capability") -> dict:
    """``shoptune export experts RUN``: the experts of a Poly training run (its ``adapter/`` and
    ``adapter/routing.json``), and ``experts.json`` naming the expert of every known task card
    (``task_experts``: a trained task's own expert, else its capability's).

    A card whose capability the run never trained on has no expert: with ``fallback="capability"``
    it is answered by the base model (listed in ``unrouted``); ``fallback="mean"`` exports one more
    expert, ``all-tasks`` (the mean mixing weights of every route), and gives it those cards. A
    single LoRA applies to every question; the mean expert is the experts' equivalent."""
    from shoptune.tasks import all_cards
    if fallback not in FALLBACKS:
        raise ExpertError(f"fallback {fallback!r}: one of {', '.join(FALLBACKS)}")
    run = Path(run)
    adapter = run / "adapter" if (run / "adapter" / "adapter_config.json").exists() else run
    if not (adapter / "routing.json").is_file():
        raise ExpertError(f"{adapter}: no routing.json (not the adapter of a `peft: poly` run)")
    routing = json.loads((adapter / "routing.json").read_text(encoding="utf-8"))
    routes = expert_routes(routing)
    if fallback == "mean":
        routes[ALL_TASKS] = list(range(len(routing["routes"])))
    written = export_experts(adapter, out, routes)
    task_experts, unrouted = {}, []
    for card in all_cards().values():
        name = expert_for(routing, card.name, card.capability)
        if name not in written and fallback == "mean":
            name = ALL_TASKS
        if name in written:
            task_experts[card.name] = name
        else:
            unrouted.append(card.name)
    meta = json.loads((Path(out) / "experts.json").read_text(encoding="utf-8"))
    meta.update(routing=routing, fallback=fallback, task_experts=dict(sorted(task_experts.items())),
                unrouted=sorted(unrouted))
    write_json(Path(out) / "experts.json", meta)
    return meta


def merge_adapters(adapters: dict[str, Path], out: Path, *, model: str, method: str = "ties",
                   density: float = 0.5, weights: list[float] | None = None) -> Path:
    """``adapters`` (name -> LoRA folder) merged into one LoRA folder ``out`` with peft's
    ``add_weighted_adapter`` (``combination_type=method``; ``density`` for ties/dare methods;
    equal ``weights`` by default). The merged rank is what peft's method gives (the sum of the
    ranks for ``cat``/SVD-free methods on equal ranks)."""
    from peft import PeftModel

    from shoptune.models import load
    names = list(adapters)
    if len(names) < 2:
        raise ExpertError("merging needs at least two adapters")
    base, _ = load(model, dtype="fp32")
    pm = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    kw = {"density": density} if method in ("ties", "dare_ties", "dare_linear", "magnitude_prune",
                                            "ties_svd", "dare_ties_svd", "dare_linear_svd",
                                            "magnitude_prune_svd") else {}
    pm.add_weighted_adapter(names, weights or [1.0] * len(names), adapter_name="merged",
                            combination_type=method, **kw)
    out = Path(out)
    tmp = make_temp_dir(out.parent, f".{out.name}-")
    pm.save_pretrained(str(tmp), selected_adapters=["merged"])
    # peft writes a non-default adapter into a sub-folder named after it
    src = tmp / "merged" if (tmp / "merged" / "adapter_config.json").exists() else tmp
    if out.exists():
        shutil.rmtree(out)
    src.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    write_json(out / "merge.json", {"method": method, "density": density if kw else None,
                                    "weights": weights or [1.0] * len(names),
                                    "adapters": {n: str(p) for n, p in adapters.items()}})
    return out
