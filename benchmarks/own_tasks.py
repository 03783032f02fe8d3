"""The worked example measured: a shop's two own tasks from their CSVs, base vs tuned, and what
the answer constraint costs and buys.

    .venv/bin/python benchmarks/own_tasks.py [--work runs/own-bench] [--out docs/results/own_tasks.json]

1. As a user would (the CLI, in a scratch folder): `tasks new` for both example CSVs
   (examples/own-tasks), `data split --validation 0 --test 0.3`, `eval` of the base model on both
   test splits, `train examples/own-tasks/train.yaml` (the fixed budget: 60 LoRA steps), `eval`
   of the tuned adapter, `eval compare` (paired differences with 95% CIs, per task). Each step is
   timed. Settings are the committed train.yaml's, fixed before any score was seen.
2. The base model on the JSON task's test questions, in one process: decoded with the grammar
   (as served) and without it (same prompts, same token budget): the valid-JSON rate as the
   model wrote it (json.loads and the schema, nothing closed) and after closing at the budget.
3. The grammar's cost per generated token on the built-in engine: the grammar processor alone
   (fill the token mask, apply it to a row of logits) per generated token of the constrained
   answers, against the model's own decode step (greedy, batch 1, same run), and the end-to-end
   seconds per generated token with and without the grammar.
Writes the JSON record (machine, commands, numbers) that docs/results/own_tasks.md cites.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own-tasks"
TASKS = {"product_category": ("products.csv", ["--label", "category"]),
         "product_attributes": ("attributes.csv", ["--json", "attributes"])}


def run(cmd: list[str], cwd: Path, env: dict, log: list) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", *cmd], cwd=cwd, env=env,
                       capture_output=True, text=True)
    sec = time.perf_counter() - t
    log.append({"command": "shoptune " + shlex.join(cmd), "seconds": round(sec, 1)})
    print(f"{sec:7.1f} s  shoptune {shlex.join(cmd)}", flush=True)
    if r.returncode:
        raise SystemExit(f"failed: shoptune {shlex.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return sec


def pipeline(work: Path, env: dict) -> dict:
    steps: list = []
    for f in ("products.csv", "attributes.csv", "train.yaml"):
        shutil.copy(EXAMPLE / f, work / f)
    for name, (f, answer) in TASKS.items():
        run(["tasks", "new", name, "--from", f, "--input", "title", *answer], work, env, steps)
        run(["data", "split", "--task", name, "--out", f"data/{name}", "--validation", "0", "--test", "0.3"],
            work, env, steps)
    data = [x for name in TASKS for x in ("--data", f"data/{name}/test.jsonl")]
    run(["eval", *data, "--model", "smollm2-135m", "--out", "runs/base"], work, env, steps)
    run(["train", "train.yaml", "--out", "runs/tuned"], work, env, steps)
    run(["eval", *data, "--model", "smollm2-135m", "--adapter", "runs/tuned/adapter", "--out", "runs/tuned-eval"],
        work, env, steps)
    run(["eval", "compare", "runs/base", "runs/tuned-eval", "--json", "runs/compare.json"], work, env, steps)
    base = json.loads((work / "runs/base/scores.json").read_text())
    tuned = json.loads((work / "runs/tuned-eval/scores.json").read_text())
    compare = json.loads((work / "runs/compare.json").read_text())
    run_json = json.loads((work / "runs/tuned/run.json").read_text())
    return {"steps": steps,
            "base": {t: base["tasks"][t] for t in TASKS}, "tuned": {t: tuned["tasks"][t] for t in TASKS},
            "compare": compare, "train": {"metrics": run_json.get("metrics"),
                                          "wall_time_s": run_json.get("wall_time_s"),
                                          "mixture": (run_json.get("mixture") or {}).get("tasks")}}


def grammar_arms(work: Path) -> dict:
    import torch

    from shoptune.decoding import GrammarProcessor, build_prompts
    from shoptune.eval.backends import LocalBackend
    from shoptune.models import load
    from shoptune.tasks import _json, get_card, plan_for
    from shoptune.data.loaders import load_records

    os.environ["SHOPTUNE_TASKS_PATH"] = str(work / "tasks")
    from shoptune import tasks
    tasks.reload()
    card = get_card("product_attributes")
    recs = load_records([str(work / "data/product_attributes/test.jsonl")])
    model, tok = load("smollm2-135m")
    prompts = build_prompts(recs, "starter-kit")
    plans = [plan_for(r) for r in recs]
    free = [dataclasses.replace(p, grammar=None) for p in plans]
    out = {"questions": len(recs), "max_new_tokens": plans[0].max_new_tokens, "dtype": str(model.dtype)}
    backend = LocalBackend(model, tok)
    constrained: list[str] = []
    for arm, ps in (("grammar", plans), ("no_grammar", free)):
        t = time.perf_counter()
        texts = backend.run(prompts, ps)
        constrained = constrained or texts
        sec = time.perf_counter() - t
        n_tokens = sum(len(tok.encode(x, add_special_tokens=False)) for x in texts)
        strict = sum(_json.parse(x, card.schema_, close_truncated=False) is not None
                     and _strict_json(x) for x in texts)
        closed = sum(_json.parse(x, card.schema_) is not None for x in texts)
        out[arm] = {"seconds": round(sec, 2), "generated_tokens": n_tokens,
                    "s_per_token": round(sec / max(n_tokens, 1), 4),
                    "valid_as_written": strict, "valid_after_closing": closed,
                    "valid_as_written_rate": round(strict / len(recs), 4),
                    "valid_after_closing_rate": round(closed / len(recs), 4),
                    "examples": texts[:3]}
        print(f"{arm:10s} {sec:7.1f} s  {n_tokens} tokens  valid as written {strict}/{len(recs)}, "
              f"after closing {closed}/{len(recs)}", flush=True)
    # the processor alone: replay each constrained answer's tokens through it, per token
    answers = [tok.encode(x, add_special_tokens=False) for x in constrained]
    vocab = model.config.vocab_size
    steps, t_proc = 0, 0.0
    for ids in answers:
        proc = GrammarProcessor(tok, [plans[0].grammar], prompt_len=1)
        seq = torch.tensor([[1]])
        for tid in ids + [tok.eos_token_id]:
            scores = torch.zeros(1, vocab)
            t = time.perf_counter()
            proc(seq, scores)
            t_proc += time.perf_counter() - t
            steps += 1
            seq = torch.cat([seq, torch.tensor([[tid]])], 1)
    enc = tok(prompts[0], return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm
        t = time.perf_counter()
        g = model.generate(**enc, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        decode = (time.perf_counter() - t) / (g.shape[1] - enc["input_ids"].shape[1])
    out["per_token"] = {"processor_ms": round(1000 * t_proc / steps, 3), "tokens": steps,
                        "model_decode_step_ms_batch1": round(1000 * decode, 2),
                        "processor_share_of_a_step": round(t_proc / steps / decode, 4),
                        "end_to_end_s_per_token_ratio": round(out["grammar"]["s_per_token"] /
                                                              out["no_grammar"]["s_per_token"], 3)}
    print(json.dumps(out["per_token"]), flush=True)
    return out


def _strict_json(text: str) -> bool:
    try:
        json.loads(text.strip())
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("runs/own-bench"), help="scratch folder (made new)")
    ap.add_argument("--out", type=Path, default=Path("docs/results/own_tasks.json"))
    ap.add_argument("--skip-pipeline", action="store_true", help="only the grammar arms (needs --work)")
    args = ap.parse_args()
    from shoptune import machine
    from shoptune._io import write_json

    work = args.work.resolve()
    if not args.skip_pipeline:
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"{work}: not empty (give a new --work folder)")
        work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SHOPTUNE_TASKS_PATH": str(work / "tasks")}
    res = {"command": "benchmarks/own_tasks.py " + shlex.join(sys.argv[1:]), "machine": machine.describe(),
           "date": time.strftime("%Y-%m-%d")}
    if not args.skip_pipeline:
        res["pipeline"] = pipeline(work, env)
    res["grammar"] = grammar_arms(work)
    prev = json.loads(args.out.read_text()) if args.skip_pipeline and args.out.exists() else {}
    write_json(args.out, {**prev, **res})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
