"""The one record type every part of shoptune passes around.

A record is a ShopBench question (``input_field``, ``output_field``, ``task_type``, ``metric``,
``is_multiple_choice``; optionally the original ``task_name`` and ``track``) plus the tags shoptune
adds: ``task`` (the task card name), ``capability``, ``source`` (file and line) and a stable ``id``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

# ShopBench's task types, then a shop's own output types (see shoptune.tasks.outputs).
TASK_TYPES = ("multiple-choice", "retrieval", "ranking", "named_entity_recognition", "generation",
              "label", "labels", "json", "number")
METRICS = ("accuracy", "hit rate@3", "rougel", "sent-transformer", "multilingual-sent-transformer",
           "micro f1", "ndcg", "bleu", "jp-bleu", "bool", "macro f1", "field f1", "valid json")
CAPABILITIES = ("concept_understanding", "knowledge_reasoning", "user_behavior_alignment",
                "multilingual")
# ShopBench track names -> capability (track 1-4).
TRACK_TO_CAPABILITY = {
    "amazon-kdd-cup-24-understanding-shopping-concepts": "concept_understanding",
    "amazon-kdd-cup-24-shopping-knowledge-reasoning": "knowledge_reasoning",
    "amazon-kdd-cup-24-user-behavior-alignment": "user_behavior_alignment",
    "amazon-kdd-cup-24-multi-lingual-abilities": "multilingual",
}
CAPABILITY_TO_TRACK = {v: k for k, v in TRACK_TO_CAPABILITY.items()}


def content_id(task: str, input_field: str, output_field: Any) -> str:
    """Stable id from content: the same question keeps its id when files are reordered or grow."""
    gold = json.dumps(output_field, ensure_ascii=False, sort_keys=True)
    h = hashlib.sha1(f"{task}\x00{input_field}\x00{gold}".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


@dataclass(slots=True)
class Record:
    input_field: str
    output_field: Any
    task_type: str
    metric: str
    task: str
    capability: str
    source: str  # "path:line" (JSON lines / CSV) or "path#index" (JSON arrays)
    id: str = ""
    is_multiple_choice: bool = False
    task_name: str | None = None  # ShopBench's own task name (task1..), when it has one
    track: str | None = None
    extra: dict = field(default_factory=dict)
    inputs: dict | None = None  # an own task's named inputs (input_field: its card's prompt over them)

    def __post_init__(self) -> None:
        if not self.id:
            self.id = content_id(self.task, self.input_field, self.output_field)

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        if d["inputs"] is None:
            d.pop("inputs")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        return cls(**{k: d[k] for k in cls.__slots__ if k in d})
