"""Evaluation speed: the starter-kit protocol done naively vs `shoptune eval`, same run.

    .venv/bin/python benchmarks/eval_speed.py [--data data/shopbench-dev/development.json]

(a) naive: fixed prefix, greedy `generate`, 1 new token for multiple choice and 100 otherwise,
batches of 8 in file order (multiple-choice and other questions batched separately, as the
starter kit does), stop at EOS. (b) shoptune's local backend: constrained multiple choice,
task-type limits, length-sorted batches. Both are scored by the same exact rules.
Prints questions/s for both, the ratio and both scores; writes docs/results/eval_speed.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shoptune._io import write_json
from shoptune.data.loaders import load_records
from shoptune.decoding import STARTER_KIT_PREFIX, build_prompts, plan_for
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
    ap.add_argument("--out", default="docs/results/eval_speed.json")
    args = ap.parse_args()
    recs = load_records(args.data)
    model, tok = load(args.model)
    torch.manual_seed(0)
    t = time.perf_counter()
    outs_a = naive(model, tok, recs)
    ta = time.perf_counter() - t
    sa = summarize(score_outputs(recs, outs_a), n_boot=200)
    t = time.perf_counter()
    outs_b = LocalBackend(model, tok, batch_size=args.batch_size).run(
        build_prompts(recs, "starter-kit"), [plan_for(r) for r in recs])
    tb = time.perf_counter() - t
    sb = summarize(score_outputs(recs, outs_b), n_boot=200)
    res = {"questions": len(recs), "model": args.model, "dtype": str(model.dtype),
           "threads": torch.get_num_threads(),
           "naive": {"seconds": round(ta, 2), "questions_per_s": round(len(recs) / ta, 3),
                     "overall": round(sa["overall"], 4), "tracks": sa["tracks"]},
           "shoptune": {"seconds": round(tb, 2), "questions_per_s": round(len(recs) / tb, 3),
                        "overall": round(sb["overall"], 4), "tracks": sb["tracks"]},
           "speedup": round(ta / tb, 2), "score_delta": round(sb["overall"] - sa["overall"], 4)}
    print(f"naive:    {res['naive']['questions_per_s']:.3f} q/s  score {sa['overall']:.4f}")
    print(f"shoptune: {res['shoptune']['questions_per_s']:.3f} q/s  score {sb['overall']:.4f}")
    print(f"ratio: {res['speedup']:.2f}x faster, score {res['score_delta']:+.4f}")
    write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
