"""Token-gated experts (peft's X-LoRA): what they cost to train and to run against the capacity
experiment's arms, all in one run.

    .venv/bin/python benchmarks/xlora_cost.py [--steps 12] [--batch-size 4] [--max-length 192]
        [--out docs/results/xlora_cost.json]

#22 asks for X-LoRA "only if it trains within the budget". This measures that budget instead of
guessing it. Every arm trains the same rows (the capacity experiment's diverse mixture, rendered
with the recipe's prompts), in the same batches, in the same plain loop (forward, backward, AdamW
step; bf16 autocast where `bf16: auto` picks it), on the embedded SmolLM2-135M:

- ``lora-r32``: one LoRA r=32 on attention+MLP (the capacity experiment's baseline);
- ``poly``: peft's Poly, 4 skills of r=8, 2 splits, routed by task (the experiment's Poly arm);
  its ratio here checks the loop against the experiment's own recipe (result.json tokens/s);
- ``xlora``: X-LoRA gating four r=8 LoRA experts (attention+MLP) per token, experts trainable
  with the gate (``use_trainable_adapters``): the same trainable LoRA parameters as r=32, plus the
  gate;
- ``xlora-frozen``: X-LoRA's own recipe, experts trained beforehand and frozen, only the gate
  trains (the experts' cost is then a separate run, not counted here).

For each arm: non-pad training tokens/s (steps after the first two), forward-only tokens/s in eval
mode (what a prompt costs to read when served), greedy decoding tokens/s one prompt at a time
(X-LoRA forces ``use_cache=False`` in generate, so each new token re-reads the sequence),
trainable parameters, and the ratio to ``lora-r32``. Training runs in the recipe's precision
(``bf16: auto``), forward and decoding in fp32 (how the experiments score). The training ratio,
times the r=32 tokens/s the capacity runs recorded in the same precision, projects each arm's
minutes of training for the experiment's 150k-token run.
Writes the JSON (and prints the table).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_engines import random_adapters  # noqa: E402  (the same random LoRA shape)

from shoptune import REPO_CONFIGS, machine  # noqa: E402
from shoptune._io import write_json  # noqa: E402
from shoptune.records import CAPABILITIES  # noqa: E402

ARMS = ("lora-r32", "poly", "xlora", "xlora-frozen")
CAPACITY = Path("docs/results/experiments/capacity")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(examples: list[dict], batch_size: int, pad_id: int) -> list[dict]:
    """The recipe's right-padded batches (``shoptune.train.loss.collate``), in order."""
    from shoptune.train.loss import collate
    return [collate(examples[i:i + batch_size], pad_id)
            for i in range(0, len(examples) - batch_size + 1, batch_size)]


def build(arm: str, model_name: str, experts: dict[str, Path], n_tasks: int):
    from peft import LoraConfig, PolyConfig, XLoraConfig, get_peft_model

    from shoptune.models import load
    base, _ = load(model_name, dtype="fp32")
    base.config.use_cache = False
    torch.manual_seed(0)
    if arm == "lora-r32":
        return get_peft_model(base, LoraConfig(r=32, lora_alpha=64, lora_dropout=0.0,
                                               target_modules=TARGETS, task_type="CAUSAL_LM"))
    if arm == "poly":
        return get_peft_model(base, PolyConfig(r=8, n_skills=4, n_splits=2, n_tasks=n_tasks,
                                               target_modules=TARGETS, task_type="CAUSAL_LM"))
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                      # keys "0".."n-1": peft 0.21.2 loads the experts under str(i) but then
                      # activates the dict's keys (any other names raise KeyError on forward)
                      adapters={str(i): str(p) for i, p in enumerate(experts.values())},
                      use_trainable_adapters=(arm == "xlora"))
    return get_peft_model(base, cfg)


def step_kwargs(arm: str, batch: dict) -> dict:
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    if arm == "poly":
        kw["task_ids"] = batch["task_ids"]
    return kw


def train_speed(model, arm: str, data: list[dict], bf16: bool, warmup: int = 2) -> dict:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4)
    times, tokens, losses = [], [], []
    for batch in data:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**step_kwargs(arm, batch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        tokens.append(int(batch["attention_mask"].sum()))
        losses.append(round(loss.item(), 4))
    s, n = sum(times[warmup:]), sum(tokens[warmup:])
    return {"tokens_per_s": round(n / s, 1), "step_s": round(s / (len(times) - warmup), 3),
            "steps_timed": len(times) - warmup, "losses": losses}


@torch.no_grad()
def forward_speed(model, arm: str, data: list[dict], bf16: bool, warmup: int = 1) -> dict:
    model.eval()
    times, tokens = [], []
    for batch in data:
        kw = step_kwargs(arm, batch)
        kw.pop("labels")
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(**kw)
        times.append(time.perf_counter() - t0)
        tokens.append(int(batch["attention_mask"].sum()))
    return {"tokens_per_s": round(sum(tokens[warmup:]) / sum(times[warmup:]), 1)}


@torch.no_grad()
def generate_speed(model, arm: str, prompts: list[dict], bf16: bool, new_tokens: int) -> dict:
    """Greedy decoding of ``new_tokens`` for each prompt alone (a server's single request):
    generated tokens/s after the first prompt (warm-up). The KV cache is on, as any server has
    it, except where the method turns it off (X-LoRA's generate forces ``use_cache=False``, so
    every new token re-reads the whole sequence)."""
    model.eval()
    times, made, cached = [], [], set()
    for p in prompts:
        # use_cache asked for every arm (X-LoRA's generate overrides it); what decoding actually
        # used is read back from the output (past_key_values is None without a cache)
        kw = {"input_ids": p["input_ids"], "attention_mask": torch.ones_like(p["input_ids"]),
              "max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
              "pad_token_id": p["pad_id"], "use_cache": True, "return_dict_in_generate": True}
        if arm == "poly":
            kw["task_ids"] = p["task_ids"]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(**kw)
        times.append(time.perf_counter() - t0)
        made.append(out.sequences.shape[1] - p["input_ids"].shape[1])
        cached.add(out.past_key_values is not None)
    return {"tokens_per_s": round(sum(made[1:]) / sum(times[1:]), 1), "new_tokens": new_tokens,
            "prompts": len(prompts) - 1, "use_cache": cached.pop() if len(cached) == 1 else None}


def prompt_parts(examples: list[dict], n: int, pad_id: int) -> list[dict]:
    """The prompt (every position before the first answer label) of the first ``n`` examples."""
    out = []
    for e in examples[:n]:
        k = next(i for i, x in enumerate(e["labels"]) if x != -100)
        out.append({"input_ids": torch.tensor([e["input_ids"][:k]]), "pad_id": pad_id,
                    "task_ids": torch.tensor([e["task_id"]])})
    return out


def recipe_tokens_per_s(cell: str, precision: str) -> tuple[float | None, list[str]]:
    """Median training tokens/s of the capacity experiment's finished runs of ``cell`` that
    trained in ``precision`` (their result.json), and which runs those are."""
    vals, runs = [], []
    for f in sorted((CAPACITY / "cells").glob(f"{cell}.s*/result.json")):
        res = json.loads(f.read_text(encoding="utf-8"))
        train = res.get("train") or {}
        if train.get("tokens_per_s") and train.get("precision") == precision:
            vals.append(train["tokens_per_s"])
            runs.append(f.parent.name)
    return (statistics.median(vals) if vals else None), runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--budget-tokens", type=int, default=150_000,
                    help="the capacity experiment's tokens per run (for the projection)")
    ap.add_argument("--model", default=None, help="model name or folder (default: the demo recipe's)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts to decode (after one warm-up)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--out", default="docs/results/xlora_cost.json")
    a = ap.parse_args()

    from shoptune.train.config import load_config
    from shoptune.train.format import encode_records
    from shoptune.train.mixture import build_mixture
    from shoptune.train.trainer import use_bf16

    tmp = Path(tempfile.mkdtemp(prefix="xlora_cost-"))
    cfg = load_config(REPO_CONFIGS / "train" / "demo.yaml", [
        f"output_dir={tmp / 'unused'}", "mixture.total=1600", f"max_length={a.max_length}",
        *([f"model={a.model}"] if a.model else [])])
    records, _ = build_mixture(cfg.mixture)
    records = records[:a.steps * a.batch_size]  # the mixture is shuffled: a diverse sample
    bf16 = use_bf16(cfg.bf16)
    precision = "bf16" if bf16 else "fp32"
    experts = random_adapters(tmp / "experts", r=8, names=CAPABILITIES, model=cfg.model)
    names = sorted({r.task for r in records})
    results: dict[str, dict] = {}
    data = None
    for arm in a.arms:
        model = build(arm, cfg.model, experts, len(names))
        if data is None:
            from shoptune.models import load
            _, tok = load(cfg.model, dtype="fp32")
            examples = encode_records(records, tok, protocol=cfg.protocol, max_length=cfg.max_length,
                                      task_index={t: i for i, t in enumerate(names)})
            data = batches(examples, a.batch_size, tok.pad_token_id)
            prompts = prompt_parts(examples, a.prompts + 1, tok.pad_token_id)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        r = {"trainable_params": trainable, "train": train_speed(model, arm, data, bf16),
             "forward": forward_speed(model, arm, data, False),  # fp32, as the experiments score
             "generate": generate_speed(model, arm, prompts, False, a.new_tokens)}
        results[arm] = r
        print(f"{arm}: train {r['train']['tokens_per_s']} tok/s, forward {r['forward']['tokens_per_s']} "
              f"tok/s, generate {r['generate']['tokens_per_s']} tok/s, {trainable / 1e6:.2f} M trainable",
              flush=True)
        del model

    recipe, runs = recipe_tokens_per_s("diverse-r32", precision)
    base = results.get("lora-r32")
    for arm, r in results.items():
        if base:
            r["train_ratio"] = round(r["train"]["tokens_per_s"] / base["train"]["tokens_per_s"], 3)
            r["forward_ratio"] = round(r["forward"]["tokens_per_s"] / base["forward"]["tokens_per_s"], 3)
            r["generate_ratio"] = round(r["generate"]["tokens_per_s"] / base["generate"]["tokens_per_s"], 3)
            if recipe:
                r["projected_run_min"] = round(a.budget_tokens / (recipe * r["train_ratio"]) / 60, 1)
    result = {"machine": machine.describe(), "precision": precision, "steps": a.steps,
              "batch_size": a.batch_size, "max_length": a.max_length, "rows": len(records),
              "budget_tokens": a.budget_tokens,
              "recipe_r32_tokens_per_s": recipe, "recipe_r32_runs": runs, "arms": results,
              "command": "benchmarks/xlora_cost.py " + " ".join(sys.argv[1:])}
    poly, _ = recipe_tokens_per_s("diverse-poly", precision)
    if "poly" in results and poly and recipe:  # does this loop rank the arms as the recipe does?
        result["poly_ratio_in_recipe"] = round(poly / recipe, 3)
    write_json(Path(a.out), result)
    print(f"{'arm':<14}{'trainable M':>12}{'train tok/s':>13}{'x r32':>7}{'fwd tok/s':>11}{'x r32':>7}"
          f"{'gen tok/s':>11}{'x r32':>7}{'run min':>9}")
    for arm, r in results.items():
        print(f"{arm:<14}{r['trainable_params'] / 1e6:>12.2f}{r['train']['tokens_per_s']:>13}"
              f"{r.get('train_ratio', ''):>7}{r['forward']['tokens_per_s']:>11}{r.get('forward_ratio', ''):>7}"
              f"{r['generate']['tokens_per_s']:>11}{r.get('generate_ratio', ''):>7}"
              f"{r.get('projected_run_min', ''):>9}")
    if "poly_ratio_in_recipe" in result:
        print(f"poly / r32 in the recipe's own runs: {result['poly_ratio_in_recipe']}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
