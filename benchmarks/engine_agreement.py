"""Do the task endpoint's answers through llama.cpp equal the built-in engine's? (#12)

    flock /tmp/shoptune-heavy.lock .venv/bin/python benchmarks/engine_agreement.py \
        [--adapter DIR] [--limit N] [--outtype bf16]

Every ShopBench development question is answered twice with the same constrained decoding:
(a) in-process, as `shoptune eval` and the built-in engine's task endpoint do (LocalBackend,
greedy, transformers), and (b) through `shoptune serve --upstream` -> llama.cpp `llama-server`
on the same weights exported by `shoptune export gguf` (the eval openai backend, which sends each
question to the gateway's task endpoint). Reports the share of equal answers (target >= 95%),
both all-around scores, and for every difference how close a call it was for the in-process
model (see ``gap``: a near tie is a small gap that bf16 rounding in llama.cpp can flip).
Writes docs/results/engine_agreement.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from shoptune._io import write_json
from shoptune.data.loaders import load_records
from shoptune.decoding import NumberListProcessor, build_prompts, choice_token_ids
from shoptune.tasks import finish, plan_for
from shoptune.eval.backends import LocalBackend, OpenAIBackend
from shoptune.eval.scoring import score_outputs, summarize
from shoptune.models import load
from shoptune.serve.gguf import export_gguf, llama_server_path
from shoptune.serve.testing import LlamaServerProcess, ServerProcess

DEV = Path("data/shopbench-dev/development.json")


@torch.inference_mode()
def gap(model, tok, prompt: str, plan, ours: str, theirs: str) -> dict:
    """How close a call the difference is, measured with the in-process model.

    Multiple choice: the logit of our option minus theirs. Generation: answers are compared after
    ``finish`` (leading blank lines stripped, first line kept), so the step where the two raw
    generations part cannot be read off the answers; instead our greedy path is replayed token by
    token (same constraint) and the smallest top-1 minus top-2 logit margin up to the token where
    our answer passes the first differing character is reported: a small value is a near tie that
    bf16 rounding in another engine can flip, a large one is a real disagreement."""
    ids = tok.encode(prompt, add_special_tokens=False)
    if plan.kind == "choice":
        logits = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
        score = {c: max(logits[t].item() for t in choice_token_ids(tok, c)) for c in plan.choices}
        return {"where": "option", "gap": round(score[ours] - score.get(theirs, float("-inf")), 4)}
    common = 0
    while common < min(len(ours), len(theirs)) and ours[common] == theirs[common]:
        common += 1
    kwargs = {}
    if plan.numeric:
        from transformers import LogitsProcessorList
        kwargs["logits_processor"] = LogitsProcessorList([NumberListProcessor(
            tok, len(ids), plan.max_value, plan.count, plan.unique)])
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=plan.max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id, **kwargs)
    gen = out.sequences[0, len(ids):].tolist()
    margins, upto = [], len(gen)
    for step, scores in enumerate(out.scores):
        top = scores[0].float().topk(2).values
        margins.append((top[0] - top[1]).item())
        if len(finish(tok.decode(gen[:step + 1], skip_special_tokens=True), plan)) > common:
            upto = step + 1
            break
    k = min(range(upto), key=lambda i: margins[i]) if margins else 0
    return {"where": f"character {common}, step {k} of {upto}", "gap": round(margins[k], 4) if margins else None,
            "replayed": finish(tok.decode(gen, skip_special_tokens=True), plan) == ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", type=Path, help="a trained PEFT adapter (default: the base model)")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--outtype", default="bf16", help="GGUF weights: bf16 | f32")
    ap.add_argument("--dtype", default="auto", help="in-process model: auto | bf16 | fp32")
    ap.add_argument("--out", default="docs/results/engine_agreement.json")
    a = ap.parse_args()
    if llama_server_path() is None:
        sys.exit("no llama-server: run `flock /tmp/shoptune-heavy.lock make llama-server` first")
    records = load_records([str(DEV)])[:a.limit]
    prompts = build_prompts(records, "starter-kit")
    plans = [plan_for(r) for r in records]

    model, tok = load("smollm2-135m", adapter=a.adapter, dtype=a.dtype)  # unmerged, as the built-in engine serves it
    t0 = time.time()
    local = LocalBackend(model, tok).run(prompts, plans)
    local_s = time.time() - t0

    tmp = Path(tempfile.mkdtemp(prefix="engine_agreement-"))
    m = export_gguf("smollm2-135m", [f"tuned={a.adapter}"] if a.adapter else [], tmp / "gguf",
                    outtype=a.outtype)
    ls = LlamaServerProcess(tmp / "gguf" / m["base"], [tmp / "gguf" / f for f in m["adapters"].values()],
                            tmp / "llama.log", slots=8)
    try:
        gw = ServerProcess(["--upstream", ls.url], tmp / "gateway.log")
        try:
            backend = OpenAIBackend("tuned" if a.adapter else "smollm2-135m", base_url=gw.url + "/v1",
                                    concurrency=8, protocol="starter-kit")
            t0 = time.time()
            remote = backend.run(prompts, plans, records=records)
            remote_s = time.time() - t0
            assert backend.tasks_used == len(records), "some questions did not go to the task endpoint"
        finally:
            gw.stop()
    finally:
        ls.stop()

    diffs = []
    for i, (x, y) in enumerate(zip(local, remote)):
        if x != y:
            diffs.append({"task": records[i].task, "task_type": records[i].task_type, "builtin": x,
                          "llama_cpp": y, **gap(model, tok, prompts[i], plans[i], x, y)})
    s_local = summarize(score_outputs(records, local), n_boot=200)
    s_remote = summarize(score_outputs(records, remote), n_boot=200)
    res = {"command": " ".join(sys.argv), "questions": len(records), "adapter": str(a.adapter),
           "outtype": a.outtype, "dtype": str(model.dtype).replace("torch.", ""), "equal": len(records) - len(diffs),
           "agreement": round(1 - len(diffs) / len(records), 4),
           "all_around": {"builtin": s_local["overall"], "llama_cpp_via_gateway": s_remote["overall"]},
           "seconds": {"builtin_local": round(local_s, 1), "gateway_llama_cpp": round(remote_s, 1)},
           "largest_gap": max((abs(d["gap"]) for d in diffs if d["gap"] is not None), default=0.0),
           "gaps_below_1": sum(d["gap"] is not None and abs(d["gap"]) < 1 for d in diffs),
           "differences": diffs}
    write_json(Path(a.out), res)
    print(json.dumps({k: v for k, v in res.items() if k != "differences"}, indent=1))
    for d in diffs:
        print(d)


if __name__ == "__main__":
    main()
