"""Training examples: the same prompt the evaluator and server send, then the answer + EOS.

The answer is written the way the task's parser reads it back (its output type's
``answer_text``): an option digit, "3, 1, 7" for retrieval, the gold ranking as a permutation
("1, 4, 3, 2, 5", best first) for ranking, comma-separated entities for NER, the text for
generation, the label, or JSON in the schema's key order. Loss is on answer tokens only.
"""
from __future__ import annotations

from shoptune.decoding import build_prompts
from shoptune.records import Record
from shoptune.tasks import answer_text

IGNORE = -100


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
