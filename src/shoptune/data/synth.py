"""Teacher-LLM data synthesis steered by the examples shown (arXiv 2504.08002's sample-output
engineering), with validation, de-duplication, decontamination, provenance and resume.

    shoptune data synth configs/synth/qpr_ranking.yaml --out runs/synth/qpr_ranking.jsonl \\
        --teacher-url http://127.0.0.1:8000/v1 --teacher-model smollm2-135m

A spec (YAML, :class:`SynthSpec`) names the target task card, a pool of real examples, how many
rows to make and the characteristics to steer: difficulty (``hard``: pool examples the student
model gets wrong, scored with the evaluation engine; ``easy``: ones it gets right), answer
length (``short`` / ``medium`` / ``long``: the pool's answer-length terciles) and language (of
the question). The instruction sent to the teacher is the same for every row; a characteristic
is steered only by *which* pool examples are shown. Job ``i`` draws its characteristics and
examples from a seeded generator of ``(seed, i)``, so a run is reproducible and resumable.

Each generated row goes through (1) the format (``<question>``/``<answer>``), (2) the loaders'
record checks (:func:`~shoptune.data.loaders.check_fields`), (3) the task type's own parser and
metric: the gold, written as a training answer and parsed back by the ShopBench parser, must
score 1 (option count and gold index for multiple choice, 5 candidates with ShopBench relevance
weights for ranking, valid numbers for retrieval, entities present in the text for NER), (4) exact and near
duplicates against the pool and the rows kept so far, (5) decontamination against every
evaluation set (exact, near, 13-gram; :mod:`shoptune.data.dedup`). Rejected rows go to
``FILE.rejected.jsonl`` with the reason.

A shop's own task (a card with named ``inputs``: label, labels, json, number, text) is
synthesized from its card: the pool defaults to the card's own files, read through it; the
teacher is told the task, its inputs and the answer's rule (:func:`own_instruction`) and shown
rows rendered from their named inputs and gold answers; a reply is parsed back into named inputs
and an answer the output type coerces and the card validates (a label of ``labels``, JSON valid
against ``schema``). Its rows are records of the task itself (with ``inputs``), read back through
its card. Without a student, a label task's difficulty is its rows' label margin in embedding
space (:func:`label_difficulty`; hard rows are shown one confusable label pair).

Files (all append-only, one JSON object a line, fsync'd): ``FILE.jsonl`` (kept rows with
``extra.provenance``), ``FILE.rejected.jsonl``, ``FILE.cache.jsonl`` (teacher answers keyed by a
hash of the request). A killed run started again re-reads them: jobs already decided are
skipped, answers already received are taken from the cache; nothing is asked twice.
The request and token budgets cover ``FILE`` over all its runs (every request is on record in
the cache). ``FILE.report.json``: kept/rejected by reason, answer lengths, option positions, and the
steering check (the student's score on rows made from hard vs easy examples).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoptune.data.teacher import (AppendLog, BudgetExhausted, JobRefused, Teacher, TeacherError,
                                   TeacherFailed, read_log)
from shoptune.records import Record
from shoptune.tasks import TaskName

DEFAULT_INSTRUCTION = ("Below are examples of one task from an online-shopping benchmark. Write "
                       "one new example of the same task: a new question and its correct answer, "
                       "in exactly the same format. Reply with the new example only.")
DIFFICULTY = ("hard", "easy", "any")
LENGTH = ("short", "medium", "long", "any")


class SynthError(ValueError):
    """A one-line problem with the spec, the pool or the teacher (no traceback for users)."""


Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Characteristics(BaseModel):
    """Weights of each value; a row's value is drawn by weight, then shown examples match it."""
    model_config = ConfigDict(extra="forbid")
    difficulty: dict[Literal[DIFFICULTY], Weight] = {"any": 1.0}  # type: ignore[valid-type]
    length: dict[Literal[LENGTH], Weight] = {"any": 1.0}  # type: ignore[valid-type]
    language: dict[str, Weight] = {"any": 1.0}  # ISO 639-1 (en, de, ja, zh, ...; py3langid) or any

    @field_validator("difficulty", "length", "language")
    @classmethod
    def _some_weight(cls, v: dict) -> dict:
        if not any(w > 0 for w in v.values()):
            raise ValueError("needs a value with a weight above 0")
        return v

    def steers_difficulty(self) -> bool:
        return any(k != "any" and w > 0 for k, w in self.difficulty.items())


class StudentSpec(BaseModel):
    """Who decides "hard": a predictions.jsonl of `shoptune eval` on the pool (id, score), or a
    model the evaluation engine runs (local, or any OpenAI-compatible server)."""
    model_config = ConfigDict(extra="forbid")
    predictions: str | None = None
    model: str | None = None
    adapter: str | None = None
    backend: Literal["local", "openai"] = "local"
    base_url: str | None = None
    api_key_env: str | None = None
    protocol: str = "starter-kit"
    hard_below: float = 0.5  # a pool example is hard when the student scores below this


class SynthSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: TaskName  # the target task card: task type, metric, capability
    # task name of the rows made (default synth_<task>; an own task's: the task itself)
    output_task: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_]*$", max_length=64)
    pool: list[str] = []  # files/folders of real examples (an own task's default: its card's files)
    pool_tasks: list[TaskName] = []  # default: rows of ``task`` (all rows when the pool has none)
    pool_split: Literal["train", "validation", "test"] | None = None
    pool_split_test: float = 0.05  # the deterministic split's settings (as mixtures and suites)
    pool_split_validation: float = 0.02
    pool_limit: int | None = Field(default=None, ge=1)
    rows: int = Field(ge=1)
    shots: int = Field(default=3, ge=1, le=16)
    characteristics: Characteristics = Characteristics()
    student: StudentSpec | None = None
    decontaminate_against: list[str] = []
    ngram: int = Field(default=13, ge=0)
    dedup_threshold: float = Field(default=0.9, gt=0, le=1)
    instruction: str | None = None  # None: DEFAULT_INSTRUCTION (an own task: own_instruction)
    temperature: float = Field(default=0.8, ge=0, le=2)
    max_tokens: int = Field(default=512, ge=1)
    seed: int = 0
    concurrency: int = Field(default=4, ge=1, le=256)
    max_requests: int | None = Field(default=None, ge=1)  # budget: HTTP requests (retries count)
    max_total_tokens: int | None = Field(default=None, ge=1)  # budget: prompt + completion tokens
    max_jobs: int | None = Field(default=None, ge=1)  # give up after this many rows asked for
    retries: int = Field(default=6, ge=0)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=30.0, ge=0)
    timeout_s: float = Field(default=300.0, gt=0)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "SynthSpec":
        """The spec in ``path`` with top-level ``overrides``; SynthError names file, line and
        field of each problem (one line each)."""
        from shoptune.configfile import ConfigError, read_yaml, validate
        p = Path(path)
        try:
            data, lines = read_yaml(p, "synthesis spec")
            return validate(cls, {**data, **(overrides or {})}, str(p), lines,
                            [(k,) for k in overrides or {}])
        except OSError as e:
            raise SynthError(f"{p}: cannot read spec: {e.strerror or e}") from None
        except ConfigError as e:
            raise SynthError(str(e)) from None


# --------------------------------------------------------------------------- characteristics

_KANA = re.compile(r"[\u3040-\u30ff]")


def language_of(text: str) -> str:
    """The ISO 639-1 language of a question (py3langid's 97-language model); text with kana is
    Japanese (the model takes kanji-heavy Japanese for Chinese)."""
    import py3langid

    lang = py3langid.classify(text)[0]
    return "ja" if lang == "zh" and _KANA.search(text) else lang


def answer_string(rec: Record, card=None) -> str:
    """The gold as the teacher sees and writes it (parsed back by :func:`parse_answer`; an own
    task's: what training teaches the model to write, read back by its output type)."""
    gold = rec.output_field
    if card is not None and card.own:
        return card.output_type.answer_text(gold, rec.metric, card)
    if rec.task_type == "multiple-choice":
        return str(gold).strip().lower() if rec.metric == "bool" else str(gold)
    if rec.task_type in ("retrieval", "ranking", "named_entity_recognition"):
        return json.dumps(gold, ensure_ascii=False)
    return str(gold).strip()


def length_thresholds(pool: Sequence[Record], card=None) -> tuple[float, float]:
    import numpy as np
    lens = [len(answer_string(r, card)) for r in pool] or [0]
    return float(np.percentile(lens, 100 / 3)), float(np.percentile(lens, 200 / 3))


def length_bucket(n: int, thresholds: tuple[float, float]) -> str:
    return "short" if n <= thresholds[0] else "long" if n > thresholds[1] else "medium"


# --------------------------------------------------------------------------- prompt and parse

def render_example(rec: Record, card=None) -> str:
    """A pool row as the teacher sees it: ``<question>`` and ``<answer>``; an own task's row: each
    named input in its own tag (``<title>``), then the answer (:func:`answer_tag`)."""
    if card is not None and card.own:
        parts = [f"<{f.name}>\n{_cell(rec.inputs[f.name]).strip(chr(10))}\n</{f.name}>"
                 for f in card.input_fields]
        tag = answer_tag(card)
        return ("<example>\n" + "\n".join(parts)
                + f"\n<{tag}>\n{answer_string(rec, card)}\n</{tag}>\n</example>")
    return (f"<example>\n<question>\n{rec.input_field.strip(chr(10))}\n</question>\n"
            f"<answer>\n{answer_string(rec)}\n</answer>\n</example>")


def build_prompt(instruction: str, shown: Sequence[Record], card=None) -> str:
    return instruction.strip() + "\n\n" + "\n\n".join(render_example(r, card) for r in shown) + "\n"


# --------------------------------------------------------------------------- own tasks

# What an own task's answer is, as the instruction tells the teacher (the same for every row).
ANSWER_RULES = {"label": "exactly one of: {labels}",
                "labels": "a JSON list of the labels that apply (possibly none), from: {labels}",
                "json": "a JSON object valid against this JSON Schema: {schema}",
                "number": "a number", "generation": "text"}


def answer_tag(card) -> str:
    """The tag of an own task's answer: ``answer`` (``output`` when an input is called answer)."""
    return "output" if any(f.name == "answer" for f in card.input_fields) else "answer"


def own_instruction(card) -> str:
    """The instruction for an own task's rows: what the task is (its card's description), its
    inputs' tags and descriptions, and the rule its answer follows (the labels, the schema)."""
    fields = "; ".join(f"<{f.name}>" + (f" ({f.description.rstrip('.')})" if f.description else "")
                       for f in card.input_fields)
    rule = ANSWER_RULES[card.task_type].format(
        labels=", ".join(card.labels or []),
        schema=json.dumps(card.schema_, ensure_ascii=False) if card.schema_ is not None else "")
    return (f"Below are examples of one task of an online shop: {card.description.strip().rstrip('.')}. "
            f"Each example gives {fields}, and in <{answer_tag(card)}> the correct answer: {rule}. "
            f"Write one new example of the same task, with new inputs and their correct answer, in "
            f"exactly the same format. Reply with the new example only.")


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _tagged(name: str, text: str) -> str | None:
    m = re.search(rf"<{re.escape(name)}>\s*?\n?(.*?)\n?\s*</{re.escape(name)}>", text, re.DOTALL)
    return m.group(1).strip() if m else None


def parse_own(text: str, card) -> tuple[dict, str]:
    """(named inputs, answer string) from the teacher's reply for an own task; each input read as
    its card type says (a number, a JSON list...); SynthReject otherwise."""
    from shoptune.data.loaders import _input_value

    inputs = {}
    for f in card.input_fields:
        value = _tagged(f.name, text or "")
        if not value:
            raise SynthReject("format", f"no <{f.name}>...</{f.name}> in the reply" if value is None
                              else f"empty <{f.name}>")
        try:
            inputs[f.name] = _input_value(value, f.type, True)
        except ValueError as e:
            raise SynthReject(f"invalid:{f.name}", str(e)) from None
    tag = answer_tag(card)
    answer = _tagged(tag, text or "")
    if not answer:
        raise SynthReject("format", f"no <{tag}>...</{tag}> in the reply" if answer is None
                          else f"empty <{tag}>")
    return inputs, answer


_Q = re.compile(r"<question>\s*?\n?(.*?)\n?\s*</question>", re.DOTALL)
_A = re.compile(r"<answer>\s*?\n?(.*?)\n?\s*</answer>", re.DOTALL)


def parse_generated(text: str) -> tuple[str, str]:
    """(question, answer string) from the teacher's reply; SynthReject('format') otherwise."""
    q, a = _Q.search(text or ""), _A.search(text or "")
    if not q or not a:
        raise SynthReject("format", "no <question>...</question> and <answer>...</answer> in the reply")
    question, answer = q.group(1).strip("\n"), a.group(1).strip()
    if not question.strip() or not answer:
        raise SynthReject("format", "empty question or answer")
    return question, answer


def parse_answer(task_type: str, metric: str, answer: str):
    """The answer string -> output_field of the task type (SynthReject('answer') if it is not)."""
    if task_type == "multiple-choice":
        if metric == "bool":
            return answer.strip().lower()
        if not re.fullmatch(r"\d+", answer.strip()):
            raise SynthReject("answer", f"multiple choice answer must be an option number, got {answer[:40]!r}")
        return int(answer.strip())
    if task_type in ("retrieval", "ranking", "named_entity_recognition"):
        try:
            return json.loads(answer)
        except json.JSONDecodeError as e:
            raise SynthReject("answer", f"not a JSON list: {e.msg}") from None
    return answer


class SynthReject(Exception):
    def __init__(self, reason: str, detail: str = "", **info):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.info = reason, detail, info


# ShopBench's relevance weights (dev task12 golds): exact 1, substitute 0.1, complement 0.01,
# irrelevant 0 (shoptune.data.derive.GAINS)
RELEVANCE_LEVELS = (1, 0.1, 0.01, 0)
_LISTED = re.compile(r"^\s*(\d+)\.\s", re.MULTILINE)


def check_row(rec: Record, card=None) -> None:
    """Validate a generated row as the task's own data would be (an own task's: against its
    ``card``, the labels or the schema); SynthReject names why not."""
    from shoptune.data.loaders import check_fields
    from shoptune.eval.metrics import COUNT_METRICS, METRIC_FNS, micro_f1
    from shoptune import tasks
    from shoptune.tasks.outputs import output_for
    from shoptune.tasks.outputs.choice import option_numbers

    row = {"input_field": rec.input_field, "output_field": rec.output_field,
           "task_type": rec.task_type, "metric": rec.metric}
    problems = check_fields(row, card)
    if problems:
        f, m = problems[0]
        raise SynthReject(f"invalid:{f}", m)
    tt, gold, text = rec.task_type, rec.output_field, rec.input_field
    if tt == "multiple-choice" and rec.metric != "bool":
        opts = option_numbers(text)
        if len(opts) < 2 or opts != list(range(len(opts))):
            raise SynthReject("parser:options", f"options must be numbered 0..n-1 (n >= 2), found {opts}")
        if gold not in opts:
            raise SynthReject("parser:gold", f"gold {gold} is not one of the options 0-{opts[-1]}")
    elif tt == "ranking":
        listed = [int(x) for x in _LISTED.findall(text)]
        if listed != [1, 2, 3, 4, 5] or len(gold) != 5:
            raise SynthReject("parser:candidates", f"ranking needs candidates 1-5 and 5 weights, "
                                                   f"found candidates {listed} and {len(gold)} weights")
        if rec.metric == "ndcg" and sorted(gold) == [1, 2, 3, 4, 5]:
            raise SynthReject("parser:gold", f"gold {gold} is a ranking (a permutation of 1-5), not "
                                             f"relevance weights per candidate")
        if rec.metric == "ndcg" and (bad := [g for g in gold if g not in RELEVANCE_LEVELS]):
            raise SynthReject("parser:gold", f"relevance weights must be ShopBench's levels "
                                             f"{list(RELEVANCE_LEVELS)}, found {bad}")
        if len(set(gold)) < 2:
            raise SynthReject("parser:gold", "all candidates equally relevant (every order scores 1)")
    elif tt == "retrieval":
        listed = [int(x) for x in _LISTED.findall(text)]
        bad = [g for g in gold if g not in listed]
        if bad:
            raise SynthReject("parser:gold", f"gold numbers {bad} are not listed candidates")
    elif tt == "named_entity_recognition":
        missing = [g for g in gold if g.lower() not in text.lower()]
        if missing:
            raise SynthReject("parser:entities", f"entities not in the text: {missing[:3]}")
    if tt != "generation":  # the gold, answered as training teaches, must score perfectly
        out, card = output_for(tt, rec.metric), card or tasks.find_card(rec.task)
        parsed = out.parse(out.answer_text(gold, rec.metric, card), rec.metric, card)
        value = METRIC_FNS[rec.metric](parsed, gold)
        if rec.metric in COUNT_METRICS:  # (tp, fp, fn): perfect is nothing extra, nothing missed
            perfect, score = value[1] == value[2] == 0, micro_f1([value])
        else:
            perfect, score = value >= 1 - 1e-9, value
        if not perfect:
            raise SynthReject("parser:roundtrip", f"the gold answer parses to {parsed!r}, scoring {score:.3f}")


def side_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    return {k: Path(f"{stem}.{k}.jsonl") for k in ("rejected", "cache")} | {
        "report": Path(f"{stem}.report.json"), "student": Path(f"{stem}.student")}


# --------------------------------------------------------------------------- pool and student

def load_pool(spec: SynthSpec, card=None) -> list[Record]:
    """The pool's rows of the task. An own task's pool (default: the files its card names) is
    read through its card, so a CSV with the shop's own columns is a pool as it is."""
    from shoptune.data.loaders import iter_records
    from shoptune.data.splits import split_of

    own = card is not None and card.own
    paths = spec.pool or ([str(p) for p in card.source_files()] if own else [])
    if not paths:
        raise SynthError("pool: name the files of real examples" + (
            f" (task {card.name}'s card names no source.files)" if own else ""))
    issues: list = []
    read_as = card.name if own and not spec.pool_tasks else None
    rows = [r for r in iter_records(paths, issues=issues, task=read_as)
            if spec.pool_split is None or split_of(r, test=spec.pool_split_test,
                                                   validation=spec.pool_split_validation) == spec.pool_split]
    tasks = spec.pool_tasks or ([spec.task] if any(r.task == spec.task for r in rows) else [])
    if tasks:
        rows = [r for r in rows if r.task in tasks]
    if spec.pool_limit and len(rows) > spec.pool_limit:
        pick = sorted(random.Random(spec.seed).sample(range(len(rows)), spec.pool_limit))
        rows = [rows[i] for i in pick]
    if not rows:
        why = (f" ({len(issues)} invalid row(s); first: {issues[0]})" if issues else "")
        raise SynthError(f"pool {paths}: no valid rows" + (f" of {tasks}" if tasks else "") + why)
    return rows


def student_scores(spec: SynthSpec, records: Sequence[Record], out_dir: Path,
                   quiet: bool = True) -> dict[str, float]:
    """Per record id: the student's score (the evaluation engine's per-question score)."""
    st = spec.student
    if st.predictions:
        return _read_scores(Path(st.predictions))
    if not st.model:
        raise SynthError("student: give predictions (a predictions.jsonl) or model")
    from shoptune._io import write_jsonl
    from shoptune.eval.runner import evaluate

    pred = out_dir / "eval" / "predictions.jsonl"
    ids = [r.id for r in records]
    if pred.exists():  # resume: the same questions were scored already
        rows = read_log(pred)
        if [r["id"] for r in rows] == ids:
            return {r["id"]: float(r["score"]) for r in rows}
    data = out_dir / "questions.jsonl"
    write_jsonl(data, (dict(r.to_dict(), id=r.id) for r in records))
    key = os.environ.get(st.api_key_env, "EMPTY") if st.api_key_env else "EMPTY"
    evaluate(model=st.model, adapter=st.adapter, data=[str(data)], out=out_dir / "eval",
             backend=st.backend, base_url=st.base_url, api_key=key, protocol=st.protocol,
             quiet=quiet, n_boot=10, overwrite=True)  # (its own earlier scores, for other questions)
    return {r["id"]: float(r["score"]) for r in read_log(pred)}


def _read_scores(path: Path) -> dict[str, float]:
    """id -> score of a predictions.jsonl (`shoptune eval`), read only; one line per bad row."""
    if not path.exists():
        raise SynthError(f"student.predictions {path}: no such file")
    out = {}
    for n, row in enumerate(read_log(path), 1):
        if not isinstance(row.get("id"), str):
            raise SynthError(f"{path}:{n}: id: missing (a predictions.jsonl of `shoptune eval` has "
                             f"id and score per question)")
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise SynthError(f"{path}:{n}: score: must be a number, got {score!r}")
        out[row["id"]] = float(score)
    return out


# --------------------------------------------------------------------------- plan

def _draw(rng: random.Random, weights: dict[str, float]) -> str:
    keys = sorted(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


@dataclass
class Pool:
    rows: list[Record]
    difficulty: dict[str, str]  # id -> hard/easy (empty: no student)
    length: dict[str, str]
    language: dict[str, str]
    thresholds: tuple[float, float]
    # a label task steered without a student: id -> {its label, the label nearest its inputs},
    # and the label centroids the margins were measured against (see label_difficulty)
    pair: dict[str, frozenset] = field(default_factory=dict)
    centroids: object = None

    def eligible(self, cell: dict[str, str]) -> list[Record]:
        return [r for r in self.rows
                if cell["difficulty"] in ("any", self.difficulty.get(r.id))
                and cell["length"] in ("any", self.length[r.id])
                and cell["language"] in ("any", self.language[r.id])]


def label_margins(rows: Sequence[Record], card, centroids=None):
    """Per row of a label task: its margin (cosine of its inputs to its label's centroid minus
    to the nearest other label's; low or negative = near the decision boundary) and that nearest
    label; and the centroids (:func:`shoptune.data.derive.label_space`; given ``centroids``, the
    rows are measured against those, e.g. rows made against the pool's)."""
    import numpy as np

    from shoptune.data.derive import _embed, inputs_text, label_space

    labels = list(card.labels)
    if centroids is None:
        sims, centroids = label_space(rows, labels, _embed)
    else:
        sims = np.asarray(_embed([inputs_text(r) for r in rows]), dtype=np.float64) @ centroids.T
    g = np.array([labels.index(r.output_field) for r in rows], dtype=int)
    own = sims[np.arange(len(g)), g].copy()
    sims[np.arange(len(g)), g] = -np.inf
    near = sims.argmax(1)
    return own - sims.max(1), [labels[j] for j in near], centroids


def label_difficulty(rows: Sequence[Record], card) -> tuple[dict, dict, object]:
    """A label task's pool steered without a student: the half of the rows with the lowest
    margins (:func:`label_margins`) is ``hard``, the other half ``easy``; and each row's label
    pair (its own, the one its inputs lie nearest)."""
    margins, near, centroids = label_margins(rows, card)
    order = sorted(range(len(rows)), key=lambda i: (float(margins[i]), rows[i].id))
    hard = set(order[:max(1, len(rows) // 2)])
    diff = {r.id: "hard" if i in hard else "easy" for i, r in enumerate(rows)}
    pair = {r.id: frozenset((r.output_field, near[i])) for i, r in enumerate(rows)}
    return diff, pair, centroids


def question_text(rec: Record) -> str:
    """The text a row's language is told from: an own task's inputs, else the question."""
    from shoptune.data.derive import inputs_text
    return inputs_text(rec)


def make_pool(spec: SynthSpec, rows: list[Record], scores: dict[str, float] | None,
              card=None) -> Pool:
    th = length_thresholds(rows, card)
    diff, pair, centroids = {}, {}, None
    if scores is not None:
        diff = {r.id: ("hard" if scores[r.id] < spec.student.hard_below else "easy")
                for r in rows if r.id in scores}
    elif (spec.characteristics.steers_difficulty() and card is not None and card.own
          and card.output == "label" and len(rows) > 1):
        diff, pair, centroids = label_difficulty(rows, card)
    pool = Pool(rows, diff, {r.id: length_bucket(len(answer_string(r, card)), th) for r in rows},
                {r.id: language_of(question_text(r)) for r in rows}, th, pair, centroids)
    ch = spec.characteristics
    if ch.steers_difficulty() and not diff:
        if scores is None:
            raise SynthError("characteristics.difficulty needs a student (spec: student: ...; an "
                             "own label task without one: a pool of at least 2 rows)")
        src = spec.student.predictions or "the student's predictions"
        raise SynthError(f"student.predictions {src}: none of its {len(scores)} ids is a pool row "
                         f"(pool ids look like {rows[0].id!r}; score the same pool file with "
                         f"`shoptune eval`)")
    problems = []
    for name, values in (("difficulty", ch.difficulty), ("length", ch.length),
                         ("language", ch.language)):
        for v, w in values.items():
            if w > 0 and v != "any":
                cell = {"difficulty": "any", "length": "any", "language": "any", name: v}
                if not pool.eligible(cell):
                    have = Counter(getattr(pool, name).values())
                    problems.append(f"{name}={v}: no pool example (pool has {dict(have)})")
    if problems:
        raise SynthError("cannot steer: " + "; ".join(problems))
    return pool


@dataclass(frozen=True)
class Job:
    index: int
    cell: dict
    shown: tuple[Record, ...]
    prompt: str
    seed: int
    key: str  # hash of everything the teacher is asked: the cache key


def plan_job(spec: SynthSpec, pool: Pool, index: int, teacher_model: str, card=None) -> Job:
    """Row ``index``'s characteristics, shown examples and request (an own task's examples are
    rendered from its named inputs; a hard row of a label task steered without a student is shown
    examples of one confusable label pair where the pool has enough)."""
    rng = random.Random(f"{spec.seed}\x00job\x00{index}")
    ch = spec.characteristics
    cell = {"difficulty": _draw(rng, ch.difficulty), "length": _draw(rng, ch.length),
            "language": _draw(rng, ch.language)}
    cands = pool.eligible(cell)
    if not cands:  # this combination is absent: keep the rarest-first characteristics
        for relax in ("language", "length", "difficulty"):
            cell_r = dict(cell, **{relax: "any"})
            if pool.eligible(cell_r):
                cell, cands = dict(cell, relaxed=relax), pool.eligible(cell_r)
                break
    if pool.pair and cell["difficulty"] == "hard" and "relaxed" not in cell:
        anchor = cands[rng.randrange(len(cands))]
        near = [r for r in cands if pool.pair[r.id] == pool.pair[anchor.id]]
        if len(near) >= spec.shots:
            cands = near
    shown = tuple(rng.sample(cands, min(spec.shots, len(cands))))
    own = card is not None and card.own
    prompt = build_prompt(spec.instruction or (own_instruction(card) if own else DEFAULT_INSTRUCTION),
                          shown, card)
    seed = rng.randrange(2**31)
    blob = json.dumps([teacher_model, prompt, spec.temperature, spec.max_tokens, seed])
    return Job(index, cell, shown, prompt, seed, hashlib.sha256(blob.encode()).hexdigest()[:24])


# --------------------------------------------------------------------------- accept / reject

class Gate:
    """Exact/near duplicates against the pool and kept rows, then decontamination against the
    evaluation sets (indexed once for the run)."""

    def __init__(self, spec: SynthSpec, pool: Sequence[Record], evals: dict[str, Sequence[Record]]):
        from datasketch import MinHashLSH

        from shoptune.data.dedup import EvalIndex, common_ngrams, pool_doc_freq, template_lines

        self.spec, self.evals = spec, evals
        self.template = template_lines(pool)
        self.index = EvalIndex(evals, ngram=spec.ngram) if evals else None
        # 13-grams that are the task's wording, not one question's content: common in the pool
        # (more than 10 rows, or 10% of a small pool) or shared by two questions of one
        # evaluation task (a template whose query sits on the same line as its fixed words)
        self.ignore = set()
        if spec.ngram and evals:
            self.ignore = (common_ngrams(pool, n=spec.ngram, max_doc_freq=pool_doc_freq(len(pool)))
                           | self.index.shared_ngrams())
        self.exact: dict[str, str] = {}
        self.lsh = MinHashLSH(threshold=spec.dedup_threshold, num_perm=64)
        self.hashes: dict[str, tuple] = {}
        for r in pool:
            self.add(r, f"pool:{r.id}")

    def _content(self, rec: Record) -> str:
        from shoptune.data.dedup import content
        return content(rec, self.template)

    def add(self, rec: Record, label: str) -> None:
        from shoptune.data.dedup import minhash, normalize
        self.exact.setdefault(normalize(rec.input_field), label)
        key = str(len(self.hashes))
        m = minhash(self._content(rec), 64)
        self.lsh.insert(key, m)
        self.hashes[key] = (m, label)

    def check(self, rec: Record) -> None:
        from shoptune.data.dedup import minhash, normalize
        if (of := self.exact.get(normalize(rec.input_field))):
            raise SynthReject("duplicate-exact", f"same question as {of}", of=of)
        m = minhash(self._content(rec), 64)
        sims = [(self.hashes[k][0].jaccard(m), self.hashes[k][1]) for k in self.lsh.query(m)]
        best = max(sims, default=None)
        if best and best[0] >= self.spec.dedup_threshold:
            raise SynthReject("duplicate-near", f"content Jaccard {best[0]:.2f} with {best[1]}",
                              of=best[1])
        if self.index is None:
            return
        x = self.index.match(rec, self.template)
        if x is None and (hits := self.index.ngram_hits(rec, self.template, self.ignore)):
            x = self.index.removal(rec, hits)
        if x:
            raise SynthReject(x["reason"], f"{x['eval_set']} question {x['of']}"
                              + (f" ({self.spec.ngram}-gram: {x['ngram']!r})" if "ngram" in x else ""),
                              of=x["of"], eval_set=x["eval_set"])


def output_task_of(spec: SynthSpec, card) -> str:
    """The task of the rows made: ``output_task``, else ``synth_<task>`` (an own task: the task
    itself, its rows read back through its own card)."""
    return spec.output_task or (card.name if card.own else f"synth_{card.name}")


def make_record(spec: SynthSpec, card, job: Job, text: str) -> Record:
    """The row the teacher's reply makes, checked; an own task's (``card`` named as the output
    task) from its named inputs, its gold coerced by the output type (a label of the card, JSON
    valid against its schema) and read back through the card."""
    if card.own:
        from shoptune.tasks.outputs import GoldError
        inputs, answer = parse_own(text, card)
        try:
            gold = card.output_type.coerce(answer, card)
        except GoldError as e:
            raise SynthReject("invalid:output_field", str(e)) from None
        rec = card.record(inputs, gold, source=f"synth:job {job.index}")
        check_row(rec, card)
        return rec
    question, answer = parse_generated(text)
    gold = parse_answer(card.task_type, card.metric, answer)
    rec = Record(input_field=question, output_field=gold, task_type=card.task_type,
                 metric=card.metric, task=output_task_of(spec, card),
                 capability=card.capability, source=f"synth:job {job.index}",
                 is_multiple_choice=card.task_type == "multiple-choice")
    check_row(rec)
    return rec


# --------------------------------------------------------------------------- the run

def run_synth(spec: SynthSpec, out: str | Path, *, teacher_url: str, teacher_model: str,
              api_key: str, quiet: bool = False, check_steering: bool = True,
              console=None) -> dict:
    """Generate ``spec.rows`` rows into ``out`` (resuming what is there); return the report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from shoptune._io import write_json
    from shoptune.tasks import get_card

    t0 = time.time()
    out = Path(out)
    paths = side_paths(out)
    try:
        card = get_card(spec.task)
    except KeyError as e:
        raise SynthError(str(e).strip("'\"")) from None
    # an own task's rows are rows of the task itself (or of a copy of its card named output_task)
    out_card = card.model_copy(update={"name": output_task_of(spec, card)}) if card.own else card
    # 1. the pool, the student's view of it, the evaluation sets
    pool_rows = load_pool(spec, card)
    scores = None
    if spec.student and spec.characteristics.steers_difficulty():
        scores = student_scores(spec, pool_rows, paths["student"] / "pool", quiet=quiet)
    pool = make_pool(spec, pool_rows, scores, card)
    evals = _eval_sets(spec.decontaminate_against)
    # 2. what earlier runs decided (append-only files) and the teacher's cached answers
    kept_rows, rejected_rows, spent = _read_run(out, paths)
    cache = {c["key"]: c for c in spent if "text" in c}  # answers; other rows: requests spent
    done = {r["extra"]["provenance"]["job"] for r in kept_rows} | {r["job"] for r in rejected_rows}
    gate = Gate(spec, pool_rows, evals)
    for r in kept_rows:
        gate.add(Record.from_dict(r), f"synth:job {r['extra']['provenance']['job']}")
    teacher = Teacher(teacher_url, teacher_model, api_key, retries=spec.retries,
                      backoff_s=spec.backoff_s, max_backoff_s=spec.max_backoff_s,
                      timeout_s=spec.timeout_s, max_requests=spec.max_requests,
                      max_total_tokens=spec.max_total_tokens)
    # The budget covers the whole output file, resumes included: every request ever sent for it
    # (answers, retries, seed re-asks, refused and failed jobs) is in FILE.cache.jsonl.
    teacher.requests = sum(c.get("attempts", 1) for c in spent)
    teacher.tokens = sum(c.get("usage", 0) for c in spent)
    session = {"requests_before": teacher.requests, "cache_hits": 0, "teacher_errors": 0,
               "refused_in_a_row": 0}
    max_jobs = spec.max_jobs or 10 * spec.rows
    kept_log, rej_log, cache_log = AppendLog(out), AppendLog(paths["rejected"]), AppendLog(paths["cache"])
    stop_reason = None

    def ask(job: Job) -> dict:
        if job.key in cache:
            session["cache_hits"] += 1
            return cache[job.key]
        try:
            ans = teacher.ask(job.prompt, temperature=spec.temperature, max_tokens=spec.max_tokens,
                              seed=job.seed)
        except (BudgetExhausted, TeacherFailed, JobRefused) as e:
            if e.sent:  # requests without an answer still count against the budget on resume
                cache_log.write({"job": job.index, "attempts": e.sent, "usage": 0,
                                 "error": str(e)[:200]})
            raise
        entry = {"key": job.key, "job": job.index, **ans}
        cache_log.write(entry)
        return entry

    def decide(job: Job, entry: dict) -> None:
        prov = {"teacher_model": teacher_model, "teacher_reply_model": entry.get("model"),
                "prompt_hash": job.key, "shown": [r.id for r in job.shown], "seed": job.seed,
                "characteristic": job.cell, "job": job.index, "spec_seed": spec.seed}
        try:
            try:
                rec = make_record(spec, out_card, job, entry["text"])
                gate.check(rec)
            except (TypeError, ValueError, KeyError, IndexError) as e:  # a reply nothing foresaw
                raise SynthReject("invalid:other", f"{type(e).__name__}: {e}") from None
        except SynthReject as e:
            row = {"job": job.index, "reason": e.reason, "detail": e.detail, **e.info,
                   "text": entry["text"], "prompt_hash": job.key, "shown": prov["shown"],
                   "characteristic": job.cell}
            rej_log.write(row)
            rejected_rows.append(row)
            return
        rec.extra = {"provenance": prov}
        row = rec.to_dict()
        kept_log.write(row)
        kept_rows.append(row)
        gate.add(rec, f"synth:job {job.index}")

    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
    next_job, inflight = 0, {}
    cols = [TextColumn("synth {task.fields[name]}"), BarColumn(),
            TextColumn("kept {task.completed:.0f}/{task.total:.0f}"),
            TextColumn("rejected {task.fields[rejected]}"), TextColumn("requests {task.fields[requests]}"),
            TimeElapsedColumn()]
    try:
        with Progress(*cols, disable=quiet, console=console) as bar, \
                ThreadPoolExecutor(spec.concurrency) as ex:
            pid = bar.add_task("synth", total=spec.rows, completed=min(len(kept_rows), spec.rows),
                               name=card.name, rejected=len(rejected_rows), requests=teacher.requests)
            while True:
                while (stop_reason is None and len(inflight) < spec.concurrency
                       and len(kept_rows) + len(inflight) < spec.rows and next_job < max_jobs):
                    if next_job not in done:
                        job = plan_job(spec, pool, next_job, teacher_model, card)
                        inflight[ex.submit(ask, job)] = job
                    next_job += 1
                if not inflight:
                    break
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job = inflight.pop(fut)
                    try:
                        entry = fut.result()
                    except BudgetExhausted as e:
                        stop_reason = stop_reason or str(e)
                        continue
                    except TeacherFailed as e:  # the cause to report, even after a budget stop
                        session["teacher_errors"] += 1
                        if session["teacher_errors"] == 1:
                            stop_reason = str(e)
                        continue
                    except JobRefused as e:  # a 400 about this request: reject the job
                        session["refused_in_a_row"] += 1
                        if session["refused_in_a_row"] >= REFUSED_IN_A_ROW:
                            raise TeacherError(f"teacher {teacher_url} refused {REFUSED_IN_A_ROW} "
                                               f"requests in a row: {e}") from None
                        row = {"job": job.index, "reason": "teacher:400", "detail": str(e)[:300],
                               "text": None, "prompt_hash": job.key,
                               "shown": [r.id for r in job.shown], "characteristic": job.cell}
                        rej_log.write(row)
                        rejected_rows.append(row)
                        continue
                    session["refused_in_a_row"] = 0
                    if len(kept_rows) < spec.rows:
                        decide(job, entry)
                bar.update(pid, completed=min(len(kept_rows), spec.rows), rejected=len(rejected_rows),
                           requests=teacher.requests)
    finally:
        for log in (kept_log, rej_log, cache_log):
            log.close()
    if stop_reason is None and len(kept_rows) < spec.rows:
        stop_reason = f"gave up after {max_jobs} jobs (max_jobs)"
    report = make_report(spec, card, pool, kept_rows, rejected_rows, teacher=teacher,
                         session=session, stop_reason=stop_reason, wall_s=time.time() - t0,
                         teacher_url=teacher_url, teacher_model=teacher_model, out=out)
    if check_steering and spec.student and kept_rows and pool.difficulty:
        report["steering"]["difficulty"] = steering_check(spec, kept_rows, paths["student"] / "synth",
                                                          quiet=quiet)
    elif pool.centroids is not None and kept_rows:
        report["steering"]["difficulty"] = margin_check(card, pool, kept_rows)
    write_json(paths["report"], report)
    return report


REFUSED_IN_A_ROW = 5  # this many 400s in a row is the request shape, not one job: stop


def _read_run(out: Path, paths: dict[str, Path]) -> tuple[list[dict], list[dict], list[dict]]:
    """(kept, rejected, cache rows) of an earlier run on ``out``; a file `data synth` did not
    write is named with its first foreign line."""
    kept = read_log(out, own=True)
    for n, r in enumerate(kept, 1):
        prov = (r.get("extra") or {}).get("provenance") if isinstance(r.get("extra"), dict) else None
        if not isinstance(prov, dict) or not isinstance(prov.get("job"), int):
            raise SynthError(f"{out}:{n}: extra.provenance.job: missing; this file was not written "
                             f"by `data synth` (resume appends to --out): choose another --out")
    rejected = read_log(paths["rejected"], own=True)
    cache = read_log(paths["cache"], own=True)
    for path, rows in ((paths["rejected"], rejected), (paths["cache"], cache)):
        for n, r in enumerate(rows, 1):
            if not isinstance(r.get("job"), int):
                raise SynthError(f"{path}:{n}: job: missing; not a `data synth` log")
    return kept, rejected, cache


def _eval_sets(names: Sequence[str]) -> dict[str, list[Record]]:
    from shoptune.data.loaders import load_records
    from shoptune.eval.suite import load_eval_set
    return {a: load_eval_set(a) if a.startswith("suite:") else load_records([a]) for a in names}


def make_report(spec, card, pool: Pool, kept: list[dict], rejected: list[dict], *, teacher,
                session, stop_reason, wall_s, teacher_url, teacher_model, out) -> dict:
    import numpy as np

    recs = [Record.from_dict(r) for r in kept]
    lens = [len(answer_string(r, card)) for r in recs]
    by_cell = defaultdict(list)
    for r, n in zip(kept, lens):
        by_cell[r["extra"]["provenance"]["characteristic"]["length"]].append(n)
    lang_cells = defaultdict(Counter)
    for r, rec in zip(kept, recs):
        lang_cells[r["extra"]["provenance"]["characteristic"]["language"]][language_of(question_text(rec))] += 1

    def dist(xs):
        return ({"n": len(xs), "mean": round(float(np.mean(xs)), 1),
                 "p50": float(np.percentile(xs, 50)), "p90": float(np.percentile(xs, 90))}
                if xs else {"n": 0})

    return {
        "out": str(out), "task": card.name, "output_task": output_task_of(spec, card),
        "teacher": {"url": teacher_url, "model": teacher_model, "seed_sent": teacher.send_seed},
        "rows_wanted": spec.rows, "kept": len(kept), "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejected).most_common()),
        "requests": {"total": teacher.requests, "this_session": teacher.requests - session["requests_before"],
                     "retried_by_status": dict(teacher.retried), "cache_hits": session["cache_hits"],
                     "failed_jobs": session["teacher_errors"]},
        "tokens": teacher.tokens, "stopped": stop_reason, "wall_s": round(wall_s, 2),
        "answer_length_chars": {"all": dist(lens), "by_length_cell": {k: dist(v) for k, v in by_cell.items()},
                                "pool_terciles": [round(x, 1) for x in pool.thresholds]},
        "option_positions": (dict(sorted(Counter(r.output_field for r in recs).items()))
                             if card.task_type == "multiple-choice" and card.metric != "bool" else None),
        "cells": dict(Counter(json.dumps(r["extra"]["provenance"]["characteristic"], sort_keys=True)
                              for r in kept)),
        "steering": {"language": {k: dict(v) for k, v in lang_cells.items()},
                     "length": {k: dist(v).get("mean") for k, v in by_cell.items()}},
        "pool": {"rows": len(pool.rows), "difficulty": dict(Counter(pool.difficulty.values())),
                 "length": dict(Counter(pool.length.values())),
                 "language": dict(Counter(pool.language.values()))},
        "spec": spec.model_dump(),
    }


def steering_check(spec: SynthSpec, kept: list[dict], out_dir: Path, quiet: bool = True) -> dict:
    """The student's mean score on rows made from hard vs easy examples (measured, not assumed)."""
    if not spec.student.model:
        return {"skipped": "the student is given as predictions only: give student.model to "
                           "score the rows made"}
    recs = [Record.from_dict(r) for r in kept]
    scores = student_scores(spec.model_copy(update={"student": spec.student.model_copy(
        update={"predictions": None})}), recs, out_dir, quiet=quiet)
    by = defaultdict(list)
    for r, row in zip(recs, kept):
        by[row["extra"]["provenance"]["characteristic"]["difficulty"]].append(scores[r.id])
    return {k: {"n": len(v), "student_score": round(sum(v) / len(v), 4)} for k, v in sorted(by.items())}


def margin_check(card, pool: Pool, kept: list[dict]) -> dict:
    """A label task steered without a student: the mean label margin (:func:`label_margins`,
    against the pool's label centroids) of the rows made from hard vs easy examples; lower is
    nearer the decision boundary (measured, not assumed)."""
    recs = [Record.from_dict(r) for r in kept]
    margins, _, _ = label_margins(recs, card, pool.centroids)
    by = defaultdict(list)
    for m, row in zip(margins, kept):
        by[row["extra"]["provenance"]["characteristic"]["difficulty"]].append(float(m))
    return {k: {"n": len(v), "label_margin": round(sum(v) / len(v), 4)} for k, v in sorted(by.items())}
