"""Exact and near-duplicate removal, and decontamination against evaluation sets.

Near duplicates use MinHash + LSH (``datasketch``) over character 5-grams of a record's *content*:
the question with its task's template lines (lines shared by many rows of the task, such as the
instruction or "Answer:") removed, so two different questions with one long shared template are
not mistaken for copies. Every removal is reported with its reason and what it duplicates.

Decontamination also runs the long n-gram overlap check of GPT-3 (Brown et al. 2020, App. C) and
lm-evaluation-harness: an evaluation question overlaps the training data when one of its
normalised word 13-grams occurs in a training row (question + answer). It catches a leak
rewritten into another template (a generation row's products and explanation turned into a
multiple-choice question), which whole-question near-duplicate checks miss. As in GPT-3,
13-grams found in more than ``max_doc_freq`` (10) training rows are ignored (boilerplate), and
both sides are taken without their task's template lines (instructions shared by many rows of a
task, as for near duplicates); questions with fewer than 13
words have no 13-grams and are left to the exact and near-duplicate checks. N-grams are 64-bit
rolling hashes of per-word hashes (numpy), so full EC-Guide (52k rows) takes a few seconds.
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash
from datasketch import MinHash, MinHashLSH

from shoptune.records import Record

_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _WS.sub(" ", _PUNCT.sub(" ", text)).strip()


def _template_lines(records: Sequence[Record], min_count: int = 3, min_frac: float = 0.01) -> set[str]:
    """Lines shared by many rows of a collection: instructions, "Answer:", fixed options."""
    counts: Counter[str] = Counter()
    for r in records:
        counts.update({normalize(x) for x in r.input_field.splitlines()})
    cutoff = max(min_count, min_frac * len(records))
    return {line for line, c in counts.items() if c >= cutoff}


def content(rec: Record, template: set[str]) -> str:
    lines = [normalize(x) for x in rec.input_field.splitlines()]
    kept = [x for x in lines if x and x not in template]
    return " ".join(kept) if kept else " ".join(x for x in lines if x)


def _minhash(text: str, num_perm: int, k: int = 5) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1, hashfunc=xxhash.xxh32_intdigest)
    grams = {text[i:i + k] for i in range(max(1, len(text) - k + 1))}
    m.update_batch([g.encode("utf-8", "surrogatepass") for g in grams])
    return m


def _templates_by_task(records: Sequence[Record]) -> dict[str, set[str]]:
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    return {t: _template_lines(rs) for t, rs in by_task.items()}


def dedup(records: Iterable[Record], *, threshold: float = 0.9, num_perm: int = 64,
          near: bool = True) -> tuple[list[Record], list[dict]]:
    """Drop exact duplicates (same normalised question and answer) and near duplicates (content
    Jaccard >= ``threshold`` within a task). Returns (kept, removal report rows)."""
    records = list(records)
    templates = _templates_by_task(records) if near else {}
    seen_exact: dict[tuple, Record] = {}
    lsh: dict[str, MinHashLSH] = {}
    hashes: dict[str, tuple[MinHash, Record]] = {}
    kept, removed = [], []
    for r in records:
        key = (r.task, normalize(r.input_field),
               json.dumps(r.output_field, ensure_ascii=False, sort_keys=True))
        if key in seen_exact:
            first = seen_exact[key]
            removed.append({"id": r.id, "task": r.task, "source": r.source,
                            "reason": "exact-duplicate", "of": first.id, "of_source": first.source})
            continue
        seen_exact[key] = r
        if near:
            # Question content plus answer: one question with several distinct answers is kept.
            m = _minhash(content(r, templates[r.task]) + " || " + normalize(key[2]), num_perm)
            if r.task not in lsh:
                lsh[r.task] = MinHashLSH(threshold=threshold, num_perm=num_perm)
            index = lsh[r.task]
            sims = ((hashes[h][0].jaccard(m), h) for h in index.query(m))
            best = max(sims, default=None)
            if best and best[0] >= threshold:
                first = hashes[best[1]][1]
                removed.append({"id": r.id, "task": r.task, "source": r.source,
                                "reason": "near-duplicate", "of": first.id,
                                "of_source": first.source, "similarity": round(best[0], 4)})
                continue
            key_id = str(len(kept))
            index.insert(key_id, m)
            hashes[key_id] = (m, r)
        kept.append(r)
    return kept, removed


NGRAM = 13
MAX_DOC_FREQ = 10
_P = np.uint64(1099511628211)  # FNV prime: rolling-hash multiplier (arithmetic mod 2**64)


class _WordHasher:
    """Normalised words -> 64-bit hashes (cached), and the word n-gram hashes of a text."""

    def __init__(self):
        self.cache: dict[str, int] = {}

    def words(self, text: str) -> list[str]:
        return normalize(text).split()

    def grams(self, words: list[str], n: int) -> np.ndarray:
        if len(words) < n:
            return np.empty(0, dtype=np.uint64)
        c = self.cache
        w = np.fromiter((c[x] if x in c else c.setdefault(x, xxhash.xxh64_intdigest(x.encode("utf-8", "surrogatepass"))) for x in words),
                        dtype=np.uint64, count=len(words))
        k = len(words) - n + 1
        h = np.zeros(k, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for j in range(n):
                h = h * _P + w[j:j + k]
        return h


def training_text(rec: Record, template: set[str] = frozenset()) -> str:
    """What a training row shows the model, without its task's template lines: question + answer."""
    gold = rec.output_field
    ans = gold if isinstance(gold, str) else " ".join(map(str, gold)) if isinstance(gold, list) else str(gold)
    return content(rec, template) + " " + ans


def eval_text(rec: Record, template: set[str]) -> str:
    """An evaluation question without its task's template lines, plus a text answer."""
    gold = rec.output_field
    return content(rec, template) + (" " + gold if isinstance(gold, str) else "")


class Overlap:
    """Result of :func:`ngram_overlap`: per training row index, the evaluation questions it
    overlaps ((eval set, eval index, the shared 13-gram)); per evaluation set, which questions."""

    def __init__(self, n: int, evals: dict[str, Sequence[Record]]):
        self.n, self.evals = n, evals
        self.train_hits: dict[int, list[tuple[str, int, str]]] = {}
        self.eval_hits: dict[str, set[int]] = {name: set() for name in evals}

    def summary(self) -> dict:
        return {"ngram": self.n, "contaminated_training_rows": len(self.train_hits),
                "eval_sets": {name: {"questions": len(recs), "overlapping": len(self.eval_hits[name]),
                                     "ids": sorted(recs[i].id for i in self.eval_hits[name])}
                              for name, recs in self.evals.items()}}


def common_ngrams(records: Sequence[Record], *, n: int = NGRAM,
                  max_doc_freq: int = MAX_DOC_FREQ) -> set[int]:
    """The word ``n``-gram hashes found in more than ``max_doc_freq`` of ``records`` (boilerplate).

    Checking a few new rows at a time (``data synth``) cannot see how common a 13-gram is among
    rows like them; the pool they imitate can: pass this set as ``ignore`` to
    :func:`ngram_overlap` / :func:`decontaminate`."""
    hasher, df = _WordHasher(), Counter()
    templates = _templates_by_task(records)
    for r in records:
        df.update(set(hasher.grams(hasher.words(training_text(r, templates[r.task])), n).tolist()))
    return {g for g, c in df.items() if c > max_doc_freq}


def ngram_overlap(train: Sequence[Record], evals: dict[str, Sequence[Record]], *, n: int = NGRAM,
                  max_doc_freq: int = MAX_DOC_FREQ, ignore: set[int] = frozenset()) -> Overlap:
    """Which training rows share a word ``n``-gram with which evaluation questions (``ignore``:
    n-gram hashes known to be boilerplate, see :func:`common_ngrams`)."""
    hasher = _WordHasher()
    index: dict[int, list[tuple[str, int, int]]] = defaultdict(list)  # gram -> (set, eval i, pos)
    ewords: dict[tuple[str, int], list[str]] = {}
    for name, recs in evals.items():
        templates = _templates_by_task(recs)
        for i, e in enumerate(recs):
            words = hasher.words(eval_text(e, templates[e.task]))
            ewords[(name, i)] = words
            for pos, g in enumerate(hasher.grams(words, n).tolist()):
                refs = index[g]
                if not refs or refs[-1][:2] != (name, i):
                    refs.append((name, i, pos))
    matched: dict[int, set[int]] = {}
    df: Counter[int] = Counter()
    train_templates = _templates_by_task(train)
    for ti, r in enumerate(train):
        grams = hasher.grams(hasher.words(training_text(r, train_templates[r.task])), n)
        if grams.size:
            hit = {g for g in grams.tolist() if g in index and g not in ignore}
            if hit:
                matched[ti] = hit
                df.update(hit)
    out = Overlap(n, evals)
    for ti, hit in matched.items():
        refs = [ref for g in sorted(hit) if df[g] <= max_doc_freq for ref in index[g]]
        if not refs:
            continue
        seen = set()
        for name, i, pos in refs:
            if (name, i) not in seen:
                seen.add((name, i))
                out.eval_hits[name].add(i)
                out.train_hits.setdefault(ti, []).append(
                    (name, i, " ".join(ewords[(name, i)][pos:pos + n])))
    return out


def contamination_summary(evals: dict[str, Sequence[Record]], removed: Sequence[dict]) -> dict:
    """Per evaluation set: how many of its questions overlap the training data (any check)."""
    out = {}
    for name, recs in evals.items():
        hit = {r["of"] for r in removed if r.get("eval_set") == name}
        hit |= {x[1] for r in removed for x in r.get("also", ()) if x[0] == name}
        out[name] = {"questions": len(recs), "overlapping": len(hit)}
    return out


def decontaminate(train: Iterable[Record], evals: dict[str, Sequence[Record]], *,
                  threshold: float = 0.8, num_perm: int = 64, ngram: int = NGRAM,
                  max_doc_freq: int = MAX_DOC_FREQ, ignore_ngrams: set[int] = frozenset(),
                  template_lines: set[str] = frozenset()) -> tuple[list[Record], list[dict]]:
    """Drop training records whose question appears in any evaluation set: exactly (normalised
    question), nearly (content Jaccard >= ``threshold``, any task) or as a shared word
    ``ngram``-gram (13; 0 turns it off). Returns (kept, report).

    ``ignore_ngrams`` / ``template_lines``: boilerplate learnt from a larger collection than
    ``train`` (a synthesis pool), for checking a few rows at a time."""
    train = list(train)
    exact: dict[str, list[tuple[str, Record]]] = {}  # every eval set holding the question
    index = MinHashLSH(threshold=threshold, num_perm=num_perm)
    hashes: dict[str, tuple[MinHash, str, Record]] = {}
    for name, recs in evals.items():
        template = _template_lines(recs)
        for i, e in enumerate(recs):
            same = exact.setdefault(normalize(e.input_field), [])
            if all(n != name for n, _ in same):
                same.append((name, e))
            m = _minhash(content(e, template), num_perm)
            key = f"{name}\x00{i}"
            index.insert(key, m)
            hashes[key] = (m, name, e)
    templates = _templates_by_task(train)
    if template_lines:
        templates = {t: lines | set(template_lines) for t, lines in templates.items()}
    kept, removed = [], []
    for r in train:
        hit = exact.get(normalize(r.input_field))
        if hit:
            (name, e), *others = hit
            removed.append({"id": r.id, "task": r.task, "source": r.source,
                            "reason": "contaminated-exact", "eval_set": name,
                            "of": e.id, "of_source": e.source,
                            "also": [[n2, e2.id] for n2, e2 in others]})
            continue
        m = _minhash(content(r, templates[r.task]), num_perm)
        sims = sorted(((hashes[k][0].jaccard(m), k) for k in index.query(m)), reverse=True)
        if sims and sims[0][0] >= threshold:
            _, name, e = hashes[sims[0][1]]
            removed.append({"id": r.id, "task": r.task, "source": r.source,
                            "reason": "contaminated-near", "eval_set": name, "of": e.id,
                            "of_source": e.source, "similarity": round(sims[0][0], 4),
                            "also": [[hashes[k][1], hashes[k][2].id] for j, k in sims[1:] if j >= threshold]})
            continue
        kept.append(r)
    if not ngram:
        return kept, removed
    ov = ngram_overlap(kept, evals, n=ngram, max_doc_freq=max_doc_freq, ignore=ignore_ngrams)
    still = []
    for ti, r in enumerate(kept):
        hits = ov.train_hits.get(ti)
        if not hits:
            still.append(r)
            continue
        name, i, gram = hits[0]
        e = evals[name][i]
        removed.append({"id": r.id, "task": r.task, "source": r.source,
                        "reason": f"contaminated-{ngram}gram", "eval_set": name, "of": e.id,
                        "of_source": e.source, "ngram": gram,
                        "also": [[n2, evals[n2][i2].id] for n2, i2, _ in hits[1:]]})
    return still, removed
