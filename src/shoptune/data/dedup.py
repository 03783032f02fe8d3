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
13-grams found in more than ``max_doc_freq`` (10) training rows are ignored (boilerplate; a few
rows at a time are checked against boilerplate learnt elsewhere: ``ignore_ngrams``), and
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


def template_lines(records: Sequence[Record], min_count: int = 3, min_frac: float = 0.01) -> set[str]:
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


def minhash(text: str, num_perm: int, k: int = 5) -> MinHash:
    m = MinHash(num_perm=num_perm, seed=1, hashfunc=xxhash.xxh32_intdigest)
    grams = {text[i:i + k] for i in range(max(1, len(text) - k + 1))}
    m.update_batch([g.encode("utf-8", "surrogatepass") for g in grams])
    return m


def _templates_by_task(records: Sequence[Record]) -> dict[str, set[str]]:
    by_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_task[r.task].append(r)
    return {t: template_lines(rs) for t, rs in by_task.items()}


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
            m = minhash(content(r, templates[r.task]) + " || " + normalize(key[2]), num_perm)
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
    """The word ``n``-gram hashes found in more than ``max_doc_freq`` of ``records`` (boilerplate;
    for a small collection pass a smaller ``max_doc_freq``, see :func:`pool_doc_freq`).

    Checking a few new rows at a time (``data synth``) cannot see how common a 13-gram is among
    rows like them; the pool they imitate can: pass this set as ``ignore`` to
    :func:`ngram_overlap` / :func:`decontaminate`."""
    hasher, df = _WordHasher(), Counter()
    templates = _templates_by_task(records)
    for r in records:
        df.update(set(hasher.grams(hasher.words(training_text(r, templates[r.task])), n).tolist()))
    return {g for g, c in df.items() if c > max_doc_freq}


class EvalIndex:
    """Evaluation sets indexed once for decontamination: normalised questions (exact), MinHash
    LSH of their content (near) and their word ``ngram``-grams (0: none). :func:`decontaminate`
    and :func:`ngram_overlap` build one per call; ``data synth`` keeps one for a whole run and
    checks each new row against it."""

    def __init__(self, evals: dict[str, Sequence[Record]], *, threshold: float = 0.8,
                 num_perm: int = 64, ngram: int = NGRAM):
        self.evals, self.threshold, self.num_perm, self.n = evals, threshold, num_perm, ngram
        self.hasher = _WordHasher()
        self.exact: dict[str, list[tuple[str, Record]]] = {}  # every eval set holding the question
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.hashes: dict[str, tuple[MinHash, str, Record]] = {}
        self.grams: dict[int, list[tuple[str, int, int]]] = defaultdict(list)  # gram -> (set, i, pos)
        self.ewords: dict[tuple[str, int], list[str]] = {}
        for name, recs in evals.items():
            template = template_lines(recs)
            templates = _templates_by_task(recs)
            for i, e in enumerate(recs):
                same = self.exact.setdefault(normalize(e.input_field), [])
                if all(n != name for n, _ in same):
                    same.append((name, e))
                key = f"{name}\x00{i}"
                m = minhash(content(e, template), num_perm)
                self.lsh.insert(key, m)
                self.hashes[key] = (m, name, e)
                if ngram:
                    words = self.hasher.words(eval_text(e, templates[e.task]))
                    self.ewords[(name, i)] = words
                    for pos, g in enumerate(self.hasher.grams(words, ngram).tolist()):
                        refs = self.grams[g]
                        if not refs or refs[-1][:2] != (name, i):
                            refs.append((name, i, pos))

    def match(self, rec: Record, template: set[str]) -> dict | None:
        """The removal row when ``rec``'s question is an evaluation question, exactly or nearly."""
        hit = self.exact.get(normalize(rec.input_field))
        if hit:
            (name, e), *others = hit
            return {"id": rec.id, "task": rec.task, "source": rec.source,
                    "reason": "contaminated-exact", "eval_set": name, "of": e.id,
                    "of_source": e.source, "also": [[n2, e2.id] for n2, e2 in others]}
        m = minhash(content(rec, template), self.num_perm)
        sims = sorted(((self.hashes[k][0].jaccard(m), k) for k in self.lsh.query(m)), reverse=True)
        if sims and sims[0][0] >= self.threshold:
            _, name, e = self.hashes[sims[0][1]]
            return {"id": rec.id, "task": rec.task, "source": rec.source,
                    "reason": "contaminated-near", "eval_set": name, "of": e.id,
                    "of_source": e.source, "similarity": round(sims[0][0], 4),
                    "also": [[self.hashes[k][1], self.hashes[k][2].id]
                             for j, k in sims[1:] if j >= self.threshold]}
        return None

    def ngram_hits(self, rec: Record, template: set[str], ignore: set[int] = frozenset()) -> set[int]:
        """The hashes of ``rec``'s training-text n-grams found in an evaluation question."""
        if not self.n:
            return set()
        grams = self.hasher.grams(self.hasher.words(training_text(rec, template)), self.n)
        return {g for g in grams.tolist() if g in self.grams and g not in ignore}

    def shared_ngrams(self, min_questions: int = 2) -> set[int]:
        """N-grams found in ``min_questions`` or more questions of one evaluation task: the
        task's own wording (a prompt template whose variable part shares its line), not a leak
        of any one question."""
        out = set()
        for g, refs in self.grams.items():
            per_task = Counter((name, self.evals[name][i].task) for name, i, _ in refs)
            if any(c >= min_questions for c in per_task.values()):
                out.add(g)
        return out

    def removal(self, rec: Record, hits: set[int]) -> dict:
        """The removal row of an n-gram overlap (the evaluation questions its ``hits`` occur in)."""
        refs = [ref for g in sorted(hits) for ref in self.grams[g]]
        seen, uniq = set(), []
        for name, i, pos in refs:
            if (name, i) not in seen:
                seen.add((name, i))
                uniq.append((name, i, " ".join(self.ewords[(name, i)][pos:pos + self.n])))
        name, i, gram = uniq[0]
        e = self.evals[name][i]
        return {"id": rec.id, "task": rec.task, "source": rec.source,
                "reason": f"contaminated-{self.n}gram", "eval_set": name, "of": e.id,
                "of_source": e.source, "ngram": gram,
                "also": [[n2, self.evals[n2][i2].id] for n2, i2, _ in uniq[1:]]}


def text_ngrams(texts: Iterable[str], n: int = NGRAM) -> set[int]:
    """The word ``n``-gram hashes of fixed texts (e.g. the parts of a prompt template between its
    placeholders): boilerplate to pass as ``ignore_ngrams``, however few rows use it."""
    hasher = _WordHasher()
    return {g for t in texts for g in hasher.grams(hasher.words(t), n).tolist()}


def pool_doc_freq(n_rows: int, share: float = 0.1) -> int:
    """``max_doc_freq`` for boilerplate learnt from ``n_rows`` examples: GPT-3's 10 rows, or
    ``share`` of a smaller collection, at least 1 (so a 13-gram in 2 of 8 rows is wording the
    task repeats, not one question's content)."""
    return max(1, min(MAX_DOC_FREQ, int(share * n_rows)))


def ngram_overlap(train: Sequence[Record], evals: dict[str, Sequence[Record]], *, n: int = NGRAM,
                  max_doc_freq: int = MAX_DOC_FREQ, ignore: set[int] = frozenset(),
                  index: EvalIndex | None = None) -> Overlap:
    """Which training rows share a word ``n``-gram with which evaluation questions (``ignore``:
    n-gram hashes known to be boilerplate, see :func:`common_ngrams`; ``index``: the evaluation
    sets already indexed with this ``n``)."""
    index = index or EvalIndex(evals, ngram=n)
    matched: dict[int, set[int]] = {}
    df: Counter[int] = Counter()
    train_templates = _templates_by_task(train)
    for ti, r in enumerate(train):
        hit = index.ngram_hits(r, train_templates[r.task], ignore)
        if hit:
            matched[ti] = hit
            df.update(hit)
    out = Overlap(n, evals)
    for ti, hit in matched.items():
        refs = [ref for g in sorted(hit) if df[g] <= max_doc_freq for ref in index.grams[g]]
        if not refs:
            continue
        seen = set()
        for name, i, pos in refs:
            if (name, i) not in seen:
                seen.add((name, i))
                out.eval_hits[name].add(i)
                out.train_hits.setdefault(ti, []).append(
                    (name, i, " ".join(index.ewords[(name, i)][pos:pos + n])))
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
                  template_lines: set[str] = frozenset(),
                  index: EvalIndex | None = None) -> tuple[list[Record], list[dict]]:
    """Drop training records whose question appears in any evaluation set: exactly (normalised
    question), nearly (content Jaccard >= ``threshold``, any task) or as a shared word
    ``ngram``-gram (13; 0 turns it off). Returns (kept, report).

    ``ignore_ngrams`` / ``template_lines``: boilerplate learnt from a larger collection than
    ``train``; ``index``: the evaluation sets indexed once (:class:`EvalIndex`)."""
    train = list(train)
    index = index or EvalIndex(evals, threshold=threshold, num_perm=num_perm, ngram=ngram)
    templates = _templates_by_task(train)
    if template_lines:
        templates = {t: lines | set(template_lines) for t, lines in templates.items()}
    kept, removed = [], []
    for r in train:
        hit = index.match(r, templates[r.task])
        if hit:
            removed.append(hit)
        else:
            kept.append(r)
    if not ngram:
        return kept, removed
    ov = ngram_overlap(kept, evals, n=ngram, max_doc_freq=max_doc_freq, ignore=ignore_ngrams,
                       index=index)
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
