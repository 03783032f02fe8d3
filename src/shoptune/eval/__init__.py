"""Evaluation with the exact KDD Cup 2024 ShopBench rules: parsers, metrics, scoring, backends."""
from shoptune.eval.metrics import METRIC_FNS, aggregate, micro_f1, score_batch
from shoptune.eval.parsers import PARSERS, parse
from shoptune.eval.scoring import score_outputs, summarize

__all__ = ["METRIC_FNS", "PARSERS", "aggregate", "micro_f1", "parse", "score_batch",
           "score_outputs", "summarize"]
