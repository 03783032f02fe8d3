"""Training examples: the same prompt the evaluator and server send, then the answer + EOS.

The answer is written the way the ShopBench parsers read it back: an option digit, "3, 1, 7" for
retrieval, the gold ranking as a permutation ("1, 4, 3, 2, 5", best first) for ranking,
comma-separated entities for NER, the text for generation. Loss is on answer tokens only.
"""
from __future__ import annotations

from shoptune.decoding import build_prompts
from shoptune.records import Record

IGNORE = -100


def answer_text(rec: Record) -> str:
    gold = rec.output_field
    if rec.task_type == "multiple-choice":
        return str(gold).strip().lower() if rec.metric == "bool" else str(gold)
    if rec.task_type == "retrieval":
        return ", ".join(str(g) for g in gold)
    if rec.task_type == "ranking":
        order = sorted(range(len(gold)), key=lambda i: (-gold[i], i))
        return ", ".join(str(i + 1) for i in order)
    if rec.task_type == "named_entity_recognition":
        return ", ".join(gold)
    return str(gold).strip()


def encode_example(prompt: str, answer: str, tok, max_length: int) -> dict:
    """input_ids = prompt + answer + eos; labels mask the prompt. Long prompts are cut from the
    left so the answer always survives."""
    p = tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    a = a[:max_length - 1]
    p = p[-(max_length - len(a)):] if len(p) + len(a) > max_length else p
    return {"input_ids": p + a, "labels": [IGNORE] * len(p) + a, "length": len(p) + len(a)}


def encode_records(records: list[Record], tok, *, protocol: str, max_length: int,
                   task_index: dict[str, int]) -> list[dict]:
    prompts = build_prompts(records, protocol, tok)
    out = []
    for rec, prompt in zip(records, prompts):
        ex = encode_example(prompt, answer_text(rec), tok, max_length)
        ex["task_id"] = task_index[rec.task]
        out.append(ex)
    return out
