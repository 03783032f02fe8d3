"""Where constrained decoding gains or loses points against the naive starter-kit loop, per task.

    .venv/bin/python benchmarks/decoding_gap.py --adapter DIR [--data data/shopbench-dev/development.json]
        [--suite core] [--dtype fp32] [--out docs/results/decoding_gap.json]

One model (the adapter merged, as `shoptune eval` runs it), one dtype, the same questions, scored
by the same rules. Arms: ``naive`` (fixed prefix, greedy, 1 token for multiple choice / 100
otherwise, no stop at line ends), ``shoptune`` (what `shoptune eval` does), and ``shoptune`` with
one part of its plan switched off at a time: ``no_line_stop`` (generate past the first line and
keep all of it), ``no_number_constraint`` (retrieval/ranking lists unconstrained),
``starter_limits`` (100 new tokens for every generated answer), ``greedy_choice`` (multiple
choice by plain 1-token greedy decoding instead of the best valid option token). Per task: each
arm's score and how many answers differ from ``shoptune``'s; written as JSON with a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict
from pathlib import Path

import torch

from shoptune import machine
from shoptune._io import write_json
from shoptune.decoding import build_prompts
from shoptune.tasks import plan_for
from shoptune.eval.backends import LocalBackend
from shoptune.eval.scoring import _task_value, score_outputs, summarize


def _arms(plans):
    def no_line_stop(p):
        return dataclasses.replace(p, stop_newline=False) if p.kind == "generate" else p

    def no_numbers(p):
        return dataclasses.replace(p, numeric=False) if p.numeric else p

    def starter_limits(p):
        return dataclasses.replace(p, max_new_tokens=100) if p.kind == "generate" else p

    def greedy_choice(p):  # one greedy token, any token: what the naive loop does for MC
        return dataclasses.replace(p, kind="generate", choices=(), max_new_tokens=1) if p.kind == "choice" else p
    return {"shoptune": plans, "no_line_stop": [no_line_stop(p) for p in plans],
            "no_number_constraint": [no_numbers(p) for p in plans],
            "starter_limits": [starter_limits(p) for p in plans],
            "greedy_choice": [greedy_choice(p) for p in plans]}


def main() -> None:
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from eval_speed import naive

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--suite", default=None, help="an evaluation suite (e.g. core) instead of --data")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="docs/results/decoding_gap.json")
    args = ap.parse_args()
    from shoptune.eval.runner import _local_model
    if args.suite:
        from shoptune.eval.suite import build_suite
        recs = build_suite(args.suite)[0]
    else:
        from shoptune.data.loaders import load_records
        recs = load_records(args.data or "data/shopbench-dev/development.json")
    model, tok = _local_model(args.model, str(args.adapter) if args.adapter else None, merge=True,
                              dtype=args.dtype)
    prompts, plans = build_prompts(recs, "starter-kit"), [plan_for(r) for r in recs]
    outputs, seconds = {}, {}
    t = time.perf_counter()
    outputs["naive"] = naive(model, tok, recs)
    seconds["naive"] = time.perf_counter() - t
    for name, arm_plans in _arms(plans).items():
        t = time.perf_counter()
        outputs[name] = LocalBackend(model, tok, batch_size=args.batch_size).run(prompts, arm_plans)
        seconds[name] = time.perf_counter() - t
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    rows = {k: score_outputs(recs, v) for k, v in outputs.items()}
    overall = {k: summarize(v, n_boot=0)["overall"] for k, v in rows.items()}
    by_task: dict[str, dict] = defaultdict(dict)
    for k, rs in rows.items():
        groups = defaultdict(list)
        for r in rs:
            groups[r["task_name"]].append(r)
        for task, g in groups.items():
            base = [r["model_output"] for r in rows["shoptune"] if r["task_name"] == task]
            by_task[task][k] = {"score": round(_task_value(g), 4),
                                "differ": sum(a["model_output"] != b for a, b in zip(g, base))}
            by_task[task]["n"], by_task[task]["type"] = len(g), g[0]["task_type"] + "/" + g[0]["metric"]
    examples = defaultdict(list)
    for a, b in zip(rows["naive"], rows["shoptune"]):
        if a["score"] != b["score"] and len(examples[a["task_name"]]) < 3:
            examples[a["task_name"]].append({"gold": str(b["output_field"])[:200], "naive": a["model_output"][:200],
                                             "shoptune": b["model_output"][:200], "naive_score": a["score"],
                                             "shoptune_score": b["score"]})
    res = {"command": "benchmarks/decoding_gap.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                               vars(args).items() if v is not None),
           "machine": machine.describe(), "questions": len(recs), "dtype": str(model.dtype),
           "overall": {k: round(v, 4) for k, v in overall.items()},
           "seconds": {k: round(v, 1) for k, v in seconds.items()}, "tasks": dict(sorted(by_task.items())),
           "examples": examples}
    arms = list(outputs)
    print("| task | type | n | " + " | ".join(arms) + " |")
    print("|---|---|---|" + "---|" * len(arms))
    for task, d in sorted(by_task.items()):
        print(f"| {task} | {d['type']} | {d['n']} | " + " | ".join(f"{d[a]['score']:.3f}" for a in arms) + " |")
    print("| all-around | | | " + " | ".join(f"{overall[a]:.3f}" for a in arms) + " |")
    write_json(Path(args.out), res)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
