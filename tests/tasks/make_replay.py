"""Write tests/tasks/data/replay.json.gz: what the shipped tasks look like to the model and how
their answers score, recorded once with the code before the task-card redesign (#32), so a test
replays every question through today's code and demands the same bytes and the same scores.

    python tests/tasks/make_replay.py --predictions runs/replay-core/predictions.jsonl

For every question of the core suite (ShopBench dev + the EC-Guide test sample): the sha1 of its
prompt under each protocol (starter-kit, chat with the model's template, fewshot), its decoding
plan, and for several outputs (the base model's real output from a core-suite run, the gold
written as an answer, a wrong answer, an empty one) the parsed answer and the score.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from dataclasses import asdict
from pathlib import Path

OUT = Path(__file__).parent / "data" / "replay.json.gz"


def gold_text(rec) -> str:
    g = rec.output_field
    if isinstance(g, list):
        return ", ".join(map(str, g))
    return str(g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--predictions", required=True, help="predictions.jsonl of a core-suite run")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    from shoptune.decoding import build_prompts

    from shoptune.tasks import plan_for
    from shoptune.eval.scoring import score_outputs
    from shoptune.eval.suite import build_suite
    from shoptune.models import load_tokenizer

    records, _ = build_suite("core")
    tok = load_tokenizer("smollm2-135m")
    prompts = {p: build_prompts(records, p, tok) for p in ("starter-kit", "chat", "fewshot")}
    preds = {}
    for line in Path(args.predictions).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        preds[row["id"]] = row["model_output"]
    missing = [r.id for r in records if r.id not in preds]
    if missing:
        raise SystemExit(f"{len(missing)} questions have no prediction (first {missing[0]})")
    outputs = {"model": [preds[r.id] for r in records], "gold": [gold_text(r) for r in records],
               "wrong": ["7, 3, 9" if isinstance(r.output_field, list) else "no idea" for r in records],
               "empty": ["" for _ in records]}
    scored = {}
    for kind, outs in outputs.items():
        rows = [r for r in records if r.metric != "multilingual-sent-transformer"]
        keep = [i for i, r in enumerate(records) if r.metric != "multilingual-sent-transformer"]
        scored[kind] = {row["id"]: [row["parsed"], row.get("counts") or row["score"]]
                        for row in score_outputs(rows, [outs[i] for i in keep])}
    questions = []
    for i, r in enumerate(records):
        questions.append({
            "id": r.id, "task": r.task, "task_name": r.task_name, "source": r.source,
            "prompt_sha1": {p: hashlib.sha1(prompts[p][i].encode("utf-8", "surrogatepass")).hexdigest()
                            for p in prompts},
            "plan": asdict(plan_for(r)),
            "outputs": {k: outputs[k][i] for k in outputs},
            "scored": {k: scored[k].get(r.id) for k in outputs},
        })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(args.out, "wt", encoding="utf-8") as fh:
        json.dump({"suite": "core", "n": len(questions), "questions": questions}, fh, ensure_ascii=False)
    print(f"{args.out}: {len(questions)} questions")


if __name__ == "__main__":
    main()
