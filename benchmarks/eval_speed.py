"""Evaluation speed: the starter-kit protocol done naively vs `shoptune eval`, same run.

    .venv/bin/python benchmarks/eval_speed.py [--data data/shopbench-dev/development.json] \
        [--adapter DIR]

(a) naive: fixed prefix, greedy `generate`, 1 new token for multiple choice and 100 otherwise,
batches of 8 in file order (multiple-choice and other questions batched separately, as the
starter kit does), stop at EOS. (b) shoptune's local backend: constrained multiple choice,
task-type limits, length-sorted batches. (c) the same with the prefix cache (the prompts' shared
preamble run once; `shoptune eval --prefix-cache`): its answers are compared with (b)'s one by
one. With --adapter (a PEFT folder): (a) and (c) again with the adapter unmerged (as peft
serves it) and merged into the weights (what `shoptune eval` does with one adapter).
All arms are scored by the same exact rules. Prints questions/s, ratios and scores; writes
docs/results/eval_speed.json. What each part contributes: (b)/(a) batching + constrained
decoding + task limits, (c)/(b) prefix reuse, merged/unmerged the adapter merge.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shoptune import machine
from shoptune._io import write_json
from shoptune.data.loaders import load_records
from shoptune.decoding import STARTER_KIT_PREFIX, build_prompts
from shoptune.tasks import plan_for
from shoptune.eval.backends import LocalBackend
from shoptune.eval.scoring import score_outputs, summarize
from shoptune.models import load


@torch.inference_mode()
def naive(model, tok, records, batch_size=8):
    outs = [None] * len(records)
    for is_mc in (True, False):
        idx = [i for i, r in enumerate(records) if r.is_multiple_choice == is_mc]
        for k in range(0, len(idx), batch_size):
            b = idx[k:k + batch_size]
            enc = tok([STARTER_KIT_PREFIX + records[i].input_field for i in b], return_tensors="pt",
                      padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=1 if is_mc else 100, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, t in zip(b, texts):
                outs[i] = t
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="data/shopbench-dev/development.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--adapter", type=Path, help="also measure with this PEFT adapter")
    ap.add_argument("--out", default="docs/results/eval_speed.json")
    args = ap.parse_args()
    recs = load_records(args.data)
    prompts, plans = build_prompts(recs, "starter-kit"), [plan_for(r) for r in recs]

    def arm(fn) -> tuple[dict, list[str]]:
        torch.manual_seed(0)
        t = time.perf_counter()
        outs = fn()
        sec = time.perf_counter() - t
        sc = summarize(score_outputs(recs, outs), n_boot=200)
        return {"seconds": round(sec, 2), "questions_per_s": round(len(recs) / sec, 3),
                "overall": round(sc["overall"], 4), "tracks": sc["tracks"]}, outs

    def local(model, tok, prefix: bool):
        return lambda: LocalBackend(model, tok, batch_size=args.batch_size, prefix_cache=prefix).run(prompts, plans)

    model, tok = load(args.model)
    res = {"command": "benchmarks/eval_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                             vars(args).items() if v is not None),
           "machine": machine.describe(), "questions": len(recs),
           "model": args.model, "dtype": str(model.dtype), "threads": torch.get_num_threads()}
    res["naive"], _ = arm(lambda: naive(model, tok, recs))
    res["shoptune"], outs_b = arm(local(model, tok, False))
    res["shoptune_prefix_cache"], outs_c = arm(local(model, tok, True))
    res["prefix_cache_same_answers"] = sum(x == y for x, y in zip(outs_b, outs_c))
    res["speedup"] = round(res["naive"]["seconds"] / res["shoptune"]["seconds"], 2)
    res["speedup_prefix_cache"] = round(res["naive"]["seconds"] / res["shoptune_prefix_cache"]["seconds"], 2)
    res["prefix_cache_vs_no_cache"] = round(res["shoptune"]["seconds"] / res["shoptune_prefix_cache"]["seconds"], 3)
    res["score_delta"] = round(res["shoptune"]["overall"] - res["naive"]["overall"], 4)
    if args.adapter:
        from shoptune.eval.runner import _local_model
        unmerged, tok = load(args.model, adapter=str(args.adapter))  # a PeftModel, as peft serves it
        unmerged.eval()
        res["adapter"] = {"path": str(args.adapter)}
        res["adapter"]["naive_unmerged"], _ = arm(lambda: naive(unmerged, tok, recs))
        res["adapter"]["shoptune_unmerged"], outs_u = arm(local(unmerged, tok, True))
        merged, tok = _local_model(args.model, str(args.adapter), merge=True, dtype="auto")  # as eval does
        res["adapter"]["naive_merged"], _ = arm(lambda: naive(merged, tok, recs))
        res["adapter"]["shoptune_merged"], outs_m = arm(local(merged, tok, True))
        a = res["adapter"]
        a["merged_same_answers"] = sum(x == y for x, y in zip(outs_u, outs_m))  # rounding may flip near ties
        a["speedup_vs_naive_unmerged"] = round(a["naive_unmerged"]["seconds"] / a["shoptune_merged"]["seconds"], 2)
        a["merge_gain"] = round(a["shoptune_unmerged"]["seconds"] / a["shoptune_merged"]["seconds"], 2)
    for k in ("naive", "shoptune", "shoptune_prefix_cache"):
        print(f"{k:24s} {res[k]['questions_per_s']:.3f} q/s  score {res[k]['overall']:.4f}")
    print(f"ratio: {res['speedup']:.2f}x ({res['speedup_prefix_cache']:.2f}x with the prefix cache; "
          f"{res['prefix_cache_same_answers']}/{len(recs)} answers equal), score {res['score_delta']:+.4f}")
    if args.adapter:
        print(json.dumps(res["adapter"], indent=1))
    write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
