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
import math
from pathlib import Path

import torch

from shoptune._io import output_dir, write_json

EPS = 1e-12  # peft.tuners.poly.router.EPS: the normalisation Poly's router applies
MAX_JSON_BYTES = 16 << 20  # routing.json, adapter_config.json, experts.json: small files


class ExpertError(ValueError):
    """An adapter folder that cannot be exported or merged (one line, names the folder)."""


def read_json_file(path: Path, what: str, error=ExpertError):
    """A small JSON file (a leading BOM allowed), or ``error`` naming the file and what is wrong."""
    path = Path(path)
    try:
        if not path.is_file():
            raise error(f"{path}: no {what}" if not path.exists() else f"{path}: not a regular file ({what} expected)")
        if path.stat().st_size > MAX_JSON_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes; a {what} is at most {MAX_JSON_BYTES >> 20} MB")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read the {what} ({getattr(e, 'strerror', None) or e})") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: the {what} is not JSON ({str(e)[:120]})") from None


def _read_config(folder: Path) -> dict:
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ExpertError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    cfg = read_json_file(path, "adapter config")
    if not isinstance(cfg, dict):
        raise ExpertError(f"{path}: the adapter config is not a JSON object")
    return cfg


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


def _positive_int(cfg: dict, key: str, where: Path) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ExpertError(f"{where}: {key} must be a positive whole number (got {v!r})")
    return v


def read_poly(poly_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Poly adapter's config and weights, checked: a POLY config with whole-number sizes,
    readable safetensors whose Poly tensors all exist, agree with the config and are finite."""
    from safetensors.torch import load_file
    poly_dir = Path(poly_dir)
    if not poly_dir.is_dir():
        raise ExpertError(f"{poly_dir}: no such adapter folder")
    cfg = _read_config(poly_dir)
    where = poly_dir / "adapter_config.json"
    if cfg.get("peft_type") != "POLY":
        raise ExpertError(f"{poly_dir}: a {cfg.get('peft_type')} adapter; experts are exported from POLY adapters")
    r, n_tasks, q, s = (_positive_int(cfg, k, where) for k in ("r", "n_tasks", "n_splits", "n_skills"))
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise ExpertError(f"{where}: target_modules must be a module name list or a regex (got {targets!r})")
    wfile = poly_dir / "adapter_model.safetensors"
    if not wfile.is_file():
        raise ExpertError(f"{poly_dir}: no adapter_model.safetensors (only safetensors weights are read)")
    try:
        weights = load_file(str(wfile))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ExpertError(f"{wfile}: not a readable safetensors file ({type(e).__name__}: "
                          f"{(str(e).splitlines() or ['corrupt'])[0][:160]})") from None
    layers = [k[: -len(".poly_lora_A")] for k in weights if k.endswith(".poly_lora_A")]
    if not layers:
        raise ExpertError(f"{wfile}: no Poly layers in the adapter's weights")
    for prefix in layers:
        parts = {n: weights.get(f"{prefix}.{n}") for n in ("poly_lora_A", "poly_lora_B", "poly_router.module_logits")}
        missing = [n for n, t in parts.items() if t is None]
        if missing:
            raise ExpertError(f"{wfile}: tensor {prefix}.{missing[0]} is missing")
        a, b, logits = parts.values()
        if a.dim() != 4 or tuple(a.shape[:2]) != (q, s) or a.shape[3] != r or b.dim() != 4 \
                or tuple(b.shape[:3]) != (q, s, r) or tuple(logits.shape) != (n_tasks, q * s):
            raise ExpertError(
                f"{where}: config and weights do not belong together: n_splits={q}, n_skills={s}, "
                f"r={r}, n_tasks={n_tasks} but {wfile.name} has {prefix}: poly_lora_A {tuple(a.shape)}, "
                f"poly_lora_B {tuple(b.shape)}, router {tuple(logits.shape)}")
    for key, t in weights.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ExpertError(f"{wfile}: tensor {key} has NaN or infinite values")
    return cfg, weights


def check_routes(routes: dict, n_tasks: int, where: str = "expert") -> None:
    """Each expert name is a valid adapter (and folder) name and stands for task ids of the adapter."""
    from shoptune.serve.engine import ADAPTER_NAME_RE
    if not routes:
        raise ExpertError(f"{where}: no experts to export (no routes)")
    for name, tasks in routes.items():
        if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name):
            raise ExpertError(f"expert name {name!r}: letters, digits, '.', '_', '-' (it names a folder and an adapter)")
        if not isinstance(tasks, list) or not tasks or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_tasks for t in tasks):
            raise ExpertError(f"expert {name}: task ids {tasks!r} (the adapter routes {n_tasks} tasks: "
                              f"whole numbers 0 to {n_tasks - 1})")


def _write_experts(folder: Path, shown: Path, cfg: dict, weights: dict, routes: dict) -> dict[str, Path]:
    """One LoRA folder per route under ``folder`` (named as under ``shown``, where it will be)."""
    from safetensors.torch import save_file
    lcfg = lora_config_for(cfg)
    written = {}
    for name, tasks in routes.items():
        (folder / name).mkdir()
        save_file(expert_state(weights, cfg, list(tasks)), str(folder / name / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        write_json(folder / name / "adapter_config.json", lcfg)
        written[name] = Path(shown) / name
    return written


def export_experts(poly_dir: Path, out: Path, routes: dict[str, list[int]], *,
                   overwrite: bool = False) -> dict[str, Path]:
    """One PEFT LoRA folder per route (name -> the Poly task ids it stands for) under ``out``,
    plus ``out/experts.json`` (route -> folder, task ids). Everything is checked first and written
    into a new folder renamed into place (:func:`shoptune._io.output_dir`): ``out`` is complete
    or as it was."""
    poly_dir, out = Path(poly_dir), Path(out)
    cfg, weights = read_poly(poly_dir)
    check_routes(routes, cfg["n_tasks"])
    with output_dir(out, command="export experts", inputs=[poly_dir], overwrite=overwrite) as tmp:
        written = _write_experts(tmp, out, cfg, weights, routes)
        write_json(tmp / "experts.json", {"poly_adapter": str(poly_dir), "routes": routes,
                                          "experts": {n: str(p) for n, p in written.items()}})
    return written


ALL_TASKS = "all-tasks"  # the fallback expert of ``fallback="mean"`` (no task or capability has this name)
FALLBACKS = ("capability", "mean")
ROUTE_BY = ("task", "capability")


def read_routing(path: Path, n_tasks: int) -> dict:
    """``routing.json`` of a Poly run, checked against its adapter (``n_tasks`` router rows)."""
    from shoptune.serve.engine import ADAPTER_NAME_RE
    routing = read_json_file(path, "routing table (routing.json)")

    def bad(why: str) -> ExpertError:
        return ExpertError(f"{path}: {why}")
    if not isinstance(routing, dict):
        raise bad(f"a routing table is a JSON object, not {type(routing).__name__}")
    if routing.get("route_by") not in ROUTE_BY:
        raise bad(f"route_by {routing.get('route_by')!r}: one of {', '.join(ROUTE_BY)}")
    routes = routing.get("routes")
    if not isinstance(routes, list) or not routes:
        raise bad(f"routes must be a non-empty list of names (got {routes!r:.80})")
    if len(routes) > n_tasks:
        raise bad(f"{len(routes)} routes but the adapter's router has {n_tasks} (n_tasks)")
    names = set()
    for name in routes:
        if not isinstance(name, str) or not ADAPTER_NAME_RE.match(name) or name == ALL_TASKS:
            raise bad(f"route {name!r} cannot name an expert: letters, digits, '.', '_', '-'")
        if name in names:
            raise bad(f"route {name!r} is listed twice")
        names.add(name)
    task_route, caps = routing.get("task_route"), routing.get("task_capability")
    if not isinstance(task_route, dict) or not isinstance(caps, dict):
        raise bad("task_route and task_capability must be JSON objects (task -> route id, task -> capability)")
    for task, rid in task_route.items():
        if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid < len(routes):
            raise bad(f"task_route[{task!r}] = {rid!r}: a route id from 0 to {len(routes) - 1}")
    for task, cap in caps.items():
        if not isinstance(cap, str) or not ADAPTER_NAME_RE.match(cap) or cap == ALL_TASKS:
            raise bad(f"task_capability[{task!r}] = {cap!r} cannot name an expert: letters, digits, '.', '_', '-'")
        if routing["route_by"] == "task":
            if task not in task_route:
                raise bad(f"task {task!r} has a capability but no route (task_route)")
            if cap in names and routes[task_route[task]] != cap:
                raise bad(f"capability {cap!r} has the name of another route")
    return routing


def export_run_experts(run: Path, out: Path, *, fallback: str = "capability", overwrite: bool = False) -> dict:
    """``shoptune export experts RUN``: the experts of a Poly training run (its ``adapter/`` and
    ``adapter/routing.json``), and ``experts.json`` naming the expert of every known task card
    (``task_experts``: a trained task's own expert, else its capability's).

    A card whose capability the run never trained on has no expert: with ``fallback="capability"``
    it is answered by the base model (listed in ``unrouted``); ``fallback="mean"`` exports one more
    expert, ``all-tasks`` (the mean mixing weights of every route), and gives it those cards. A
    single LoRA applies to every question; the mean expert is the experts' equivalent.

    Everything is read and checked before anything is written; the folder appears whole."""
    from shoptune.tasks import all_cards
    if fallback not in FALLBACKS:
        raise ExpertError(f"fallback {fallback!r}: one of {', '.join(FALLBACKS)}")
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise ExpertError(f"{run}: no such folder (a `peft: poly` training run or its adapter/ folder)")
    adapter = run / "adapter" if (run / "adapter" / "adapter_config.json").exists() else run
    if not (adapter / "routing.json").exists() and not (adapter / "routing.json").is_symlink():
        raise ExpertError(f"{adapter}: no routing.json (not the adapter of a `peft: poly` run)")
    cfg, weights = read_poly(adapter)
    routing = read_routing(adapter / "routing.json", cfg["n_tasks"])
    routes = expert_routes(routing)
    if fallback == "mean":
        routes[ALL_TASKS] = list(range(len(routing["routes"])))
    check_routes(routes, cfg["n_tasks"])
    task_experts, unrouted = {}, []
    for card in all_cards().values():
        name = expert_for(routing, card.name, card.capability)
        if name not in routes and fallback == "mean":
            name = ALL_TASKS
        if name in routes:
            task_experts[card.name] = name
        else:
            unrouted.append(card.name)
    if not task_experts:
        raise ExpertError(f"{adapter / 'routing.json'}: none of its routes or capabilities names a known "
                          f"task card or capability; no task would be answered by an expert")
    with output_dir(out, command="export experts", inputs=[adapter], overwrite=overwrite) as tmp:
        written = _write_experts(tmp, out, cfg, weights, routes)
        meta = {"poly_adapter": str(adapter), "routes": routes,
                "experts": {n: str(p) for n, p in written.items()}, "routing": routing,
                "fallback": fallback, "task_experts": dict(sorted(task_experts.items())),
                "unrouted": sorted(unrouted)}
        write_json(tmp / "experts.json", meta)
    return meta


# the combination types peft's LoRA add_weighted_adapter accepts (peft/tuners/lora/model.py)
MERGE_METHODS = ("ties", "dare_ties", "dare_linear", "linear", "cat", "svd", "ties_svd",
                 "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
SAME_RANK_METHODS = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")  # (peft's rule)
DENSITY_METHODS = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "ties_svd", "dare_ties_svd",
                   "dare_linear_svd", "magnitude_prune_svd")
# LoRA config fields add_weighted_adapter does not carry into the merge (it keeps lora_A/lora_B only)
_NOT_MERGED = ("use_dora", "modules_to_save", "trainable_token_indices", "layer_replication",
               "target_parameters", "alora_invocation_tokens", "use_rslora")


def check_merge(adapters: dict[str, Path], *, model: str, method: str, density: float) -> list[int]:
    """Everything a merge needs, checked before any model is loaded (one line each): a known
    method, a density in (0, 1], two or more distinct plain LoRA folders (safetensors, finite,
    no DoRA or other part the merge would drop) trained for ``model``, with equal ranks where the
    method needs them. Returns their ranks."""
    from transformers import AutoConfig

    from shoptune.models import InvalidAdapterError, ModelNotFoundError, check_adapter, resolve
    from shoptune.serve.engine import AdapterError, check_adapter_dir
    if method not in MERGE_METHODS:
        raise ExpertError(f"--method {method!r}: one of {', '.join(MERGE_METHODS)}")
    if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
        raise ExpertError(f"--density {density}: the share of weights kept, above 0 and at most 1")
    if len(adapters) < 2:
        raise ExpertError("merging needs at least two adapters")
    seen: dict[Path, str] = {}
    for name, folder in adapters.items():
        real = Path(folder).resolve()
        if real in seen:
            raise ExpertError(f"{folder}: given twice (as {seen[real]} and {name}); merge two different adapters")
        seen[real] = name
    try:
        base_cfg = AutoConfig.from_pretrained(str(resolve(model)))
    except ModelNotFoundError as e:
        raise ExpertError(f"--model {model}: {e}") from None
    except (OSError, ValueError) as e:
        raise ExpertError(f"--model {model}: cannot read its config.json ({str(e).splitlines()[0][:160]})") from None
    ranks = []
    for name, folder in adapters.items():
        try:
            check_adapter_dir(Path(folder))
            cfg = check_adapter(base_cfg, folder, base_name=model, peft_types=("LORA",))
        except AdapterError as e:
            raise ExpertError(e.message) from None
        except InvalidAdapterError as e:
            raise ExpertError(str(e).replace("can be used here (they are applied per row in a batch)",
                                             "can be merged")) from None
        dropped = [k for k in _NOT_MERGED if cfg.get(k)]
        if cfg.get("bias", "none") not in ("none", None):
            dropped.append("bias")
        if dropped:
            raise ExpertError(f"{folder}: its {dropped[0]} ({cfg[dropped[0]]!r}) would be lost in the merge "
                              f"(peft merges the LoRA factors only); merge plain LoRA adapters")
        pattern = cfg.get("rank_pattern") or {}
        ranks.append(max([cfg["r"], *pattern.values()]) if isinstance(pattern, dict) else cfg["r"])
    if method in SAME_RANK_METHODS and len(set(ranks)) > 1:
        shown = ", ".join(f"{n} r={r}" for n, r in zip(adapters, ranks))
        raise ExpertError(f"--method {method} needs adapters of one rank ({shown}); use --method cat or an "
                          f"svd method for different ranks")
    return ranks


def merge_adapters(adapters: dict[str, Path], out: Path, *, model: str, method: str = "ties",
                   density: float = 0.5, weights: list[float] | None = None,
                   overwrite: bool = False) -> Path:
    """``adapters`` (name -> LoRA folder) merged into one LoRA folder ``out`` with peft's
    ``add_weighted_adapter`` (``combination_type=method``; ``density`` for ties/dare methods;
    equal ``weights`` by default). The merged rank is what peft's method gives (the sum of the
    ranks for ``cat``/SVD-free methods on equal ranks). Inputs are checked first
    (:func:`check_merge`); ``out`` appears whole with ``merge.json``, or not at all."""
    from peft import PeftModel

    from shoptune._io import check_output_dir
    from shoptune.models import load
    adapters = {n: Path(p) for n, p in adapters.items()}
    out = Path(out)
    check_merge(adapters, model=model, method=method, density=density)
    check_output_dir(out, command="export merge", inputs=adapters.values(), overwrite=overwrite)
    names = list(adapters)
    base, _ = load(model, dtype="fp32")
    pm = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(adapters[n]), adapter_name=n)
    kw = {"density": density} if method in DENSITY_METHODS else {}
    pm.add_weighted_adapter(names, weights or [1.0] * len(names), adapter_name="merged",
                            combination_type=method, **kw)
    merged = {k: v for k, v in pm.state_dict().items() if ".merged." in k or k.endswith(".merged")}
    bad = next((k for k, v in merged.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise ExpertError(f"the {method} merge gave NaN or infinite values ({bad}); nothing written")
    with output_dir(out, command="export merge", inputs=adapters.values(), overwrite=overwrite) as tmp:
        pm.save_pretrained(str(tmp), selected_adapters=["merged"])
        # peft writes a non-default adapter into a sub-folder named after it: move its files up
        sub = tmp / "merged"
        if (sub / "adapter_config.json").exists():
            for f in sub.iterdir():
                f.rename(tmp / f.name)
            sub.rmdir()
        write_json(tmp / "merge.json", {"method": method, "density": density if kw else None,
                                        "weights": weights or [1.0] * len(names),
                                        "adapters": {n: str(p) for n, p in adapters.items()}})
    return out
