"""Derived task formats: turn labelled data the toolkit already has into the formats the
benchmark asks for.

    shoptune data derive ranking ec-guide/MCQ/QPRP.json ec-guide/MCQ/QPRJ.json --out runs/derive/qpr_ranking.jsonl
    shoptune data derive mcq ec-guide/Generation/RTS.json --out runs/derive/rts_mcq.jsonl --difficulty hard

**Ranking** (ShopBench task12's layout: a query, 5 numbered candidates, gold = the candidates'
relevance weights, NDCG): query-product judgements are read from EC-Guide's query-product files.
``MCQ/QPRP.json`` holds three layouts: "Given the query 'Q', which of the following product best
{exact|substitute|complement|irrelevant} it?" (only the gold option's relation is known), the
ESCI relevance-level questions (``query:"Q". product:"P"`` with the four ESCI descriptions as
options) and the short-label ones (``"Q" and "P"`` with narrowing / substitute / complement /
irrelevant; "narrowing" is ESCI's exact). ``MCQ/QPRJ.json`` asks "is P a substitute for Q?":
"yes" is a substitute judgement, "no" leaves the relation unknown and is not used. The weights are
ShopBench's: exact 1, substitute 0.1, complement 0.01, irrelevant 0.

One question per query (a query with more than 5 judged products gives several). A question
needs two different weights among its candidates (with one weight every order has NDCG 1).
Judged products of the same query are the hard candidates; when fewer than 5 are judged, the
rest are *fillers*: products judged for other queries that share no word with this query,
taken as irrelevant (weight 0). That is an assumption (recorded per row: ``filler``); ``--fill
0`` turns it off and shows how few questions the judgements alone support.

**Multiple choice**: each generation row becomes a question with its own answer and
``options - 1`` distractors: the answers of other rows of the same task. ``hard`` picks the
answers nearest to the gold in all-MiniLM-L6-v2 embedding space (near-identical ones, cosine >=
``max_similarity``, are skipped: they may be correct too), ``easy`` picks at random.

A row of a shop's own ``label`` task (``output: label``) becomes a question whose options are its
gold label and ``options - 1`` other labels of its card, numbered in ShopBench's layout: the
card's prompt without its label list, "Which of the following is the correct answer?", the
options, "Answer: ". ``hard`` takes the labels the row is most easily confused with: the labels
whose rows' inputs lie nearest to this row's inputs (cosine to the label's centroid in the same
embedding space; a label without rows: its name's embedding); ``easy`` takes other labels at
random. A card with fewer labels than ``options`` gives questions with all its labels.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shoptune.data.dedup import normalize
from shoptune.records import Record

# ------------------------------------------------------------------------------------ ranking

GAINS = {"exact": 1.0, "substitute": 0.1, "complement": 0.01, "irrelevant": 0.0}
RANKING_TASK = "derived_qpr_ranking"
# ShopBench task12's two prompt layouts, byte for byte (development.json).
RANKING_TEMPLATES = (
    "A user has made a query with keyword '{query}'. Given the following numbered list of 5 "
    "products, please rank the products according their relevance with the query. \n"
    "Product List: \n{products}\nYou should output a permutation of 1 to 5. There should be a "
    "comma separating two numbers. Each product and its number should appear only once in the "
    "output. Only respond with the ranking results. Do not say any word or explanations.\n"
    "Output: ",
    "You are an intelligent shopping assistant that can rank products based on their relevance "
    "to the query. The following numbered list contains 5 products. Please rank the products "
    "according to their relevance with the query '{query}'. \nProduct List: \n{products}\n"
    "You should output a permutation of 1 to 5. There should be a comma separating two numbers. "
    "Each product and its number should appear only once in the output. Only respond with the "
    "ranking results. Do not say any word or explanations.\nOutput: ",
)


def ranking_boilerplate(n: int = 13) -> set[int]:
    """The word n-grams of the templates' fixed wording (task12's own): not a leak of any one
    question, however few questions a file holds."""
    from shoptune.data.dedup import text_ngrams
    return text_ngrams((part for t in RANKING_TEMPLATES for part in re.split(r"\{\w+\}", t)), n)


_REL_MCQ = re.compile(r"^Given the query '(.*)', which of the following product best "
                      r"(exact|substitute|complement|irrelevant) it\?$")
_ESCI_MCQ = re.compile(r'query:"(.*)"\. product:"(.*)"\n')
_SHORT_MCQ = re.compile(r'\n "(.*)" and "(.*)"\n')
_QPRJ = re.compile(r"Query: (.*)\n Product: (.*)\n")
_OPTION = re.compile(r"^(\d+)\. (.*)$", re.MULTILINE)
_ESCI_TEXT = (("irrelevant", "irrelevant"), ("substitute", "substitute"),
              ("in combination", "complement"), ("satisfies all", "exact"))
_SHORT_LABEL = {"narrowing": "exact", "substitute": "substitute", "complement": "complement",
                "irrelevant": "irrelevant"}


@dataclass(frozen=True, slots=True)
class Judgement:
    query: str
    product: str
    relation: str  # exact | substitute | complement | irrelevant
    source: str  # the record it came from


def judgements(records: Iterable[Record]) -> tuple[list[Judgement], Counter]:
    """(query, product, relation) judgements found in query-product records, and a count of
    what each record gave (``layout:...`` or ``skipped:...``)."""
    out, seen = [], Counter()
    for r in records:
        text, gold = r.input_field, r.output_field
        opts = dict(_OPTION.findall(text))
        first = text.split("\n", 1)[0]
        if (m := _REL_MCQ.match(first)) and str(gold) in opts:
            out.append(Judgement(m.group(1), opts[str(gold)].strip(), m.group(2), r.source))
            seen["layout:best-relation mcq"] += 1
        elif (m := _ESCI_MCQ.search(text)) and str(gold) in opts:
            rel = next((lab for key, lab in _ESCI_TEXT if key in opts[str(gold)]), None)
            if rel is None:
                seen["skipped:unknown ESCI option"] += 1
                continue
            out.append(Judgement(m.group(1), m.group(2).strip(), rel, r.source))
            seen["layout:esci-level mcq"] += 1
        elif (m := _SHORT_MCQ.search(text)) and opts.get(str(gold), "").strip() in _SHORT_LABEL:
            out.append(Judgement(m.group(1), m.group(2).strip(),
                                 _SHORT_LABEL[opts[str(gold)].strip()], r.source))
            seen["layout:short-label mcq"] += 1
        elif (m := _QPRJ.search(text)) and isinstance(gold, str):
            if gold.strip().lower() == "yes" and "substitute" in text:
                out.append(Judgement(m.group(1), m.group(2).strip(), "substitute", r.source))
                seen["layout:substitute yes/no (yes)"] += 1
            else:
                seen["skipped:substitute yes/no answered no (relation unknown)"] += 1
        else:
            seen["skipped:not a query-product judgement"] += 1
    return out, seen


def _words(text: str) -> set[str]:
    return set(normalize(text).split())


def derive_ranking(records: Iterable[Record], *, fill: int = 3, candidates: int = 5,
                   seed: int = 0, task: str = RANKING_TASK,
                   capability: str = "user_behavior_alignment") -> tuple[list[Record], dict]:
    """ShopBench-layout ranking questions from query-product judgements, and a report that says
    how many questions the judgements support (with and without fillers)."""
    if candidates != 5:
        raise ValueError("ShopBench ranking questions have exactly 5 candidates")
    if not 0 <= fill <= candidates - 1:
        raise ValueError(f"--fill {fill}: 0-{candidates - 1} (a question needs a judged product)")
    js, layouts = judgements(records)
    by_query: dict[str, dict[str, Judgement]] = defaultdict(dict)
    conflicts = 0
    for j in js:
        q = j.query.strip()
        prev = by_query[q].get(j.product)
        if prev and prev.relation != j.relation:
            conflicts += 1  # the stronger relation wins (exact > substitute > complement > irr.)
            if GAINS[prev.relation] >= GAINS[j.relation]:
                continue
        by_query[q][j.product] = j
    products = sorted({p for d in by_query.values() for p in d})
    rng = random.Random(seed)
    out: list[Record] = []
    supports = Counter()  # k -> questions possible with at most k fillers
    dropped = Counter()
    for query in sorted(by_query):
        judged = sorted(by_query[query].values(), key=lambda j: j.product)
        rng_q = random.Random(f"{seed}\x00{query}")
        rng_q.shuffle(judged)
        for start in range(0, len(judged), candidates):
            group = judged[start:start + candidates]
            need = candidates - len(group)
            levels = {GAINS[j.relation] for j in group} | ({0.0} if need else set())
            if len(levels) >= 2:
                for k in range(need, candidates):
                    supports[k] += 1
            if need > fill:
                dropped["too few judged products (more fillers needed than --fill)"] += 1
                continue
            if len(levels) < 2:
                dropped["one relevance level (every order scores 1)"] += 1
                continue
            qwords = _words(query)
            fillers: list[str] = []
            taken = {j.product for j in group}
            for _ in range(200):
                if len(fillers) == need:
                    break
                p = products[rng.randrange(len(products))]
                if p in taken or p in by_query[query] or qwords & _words(p):
                    continue
                fillers.append(p)
                taken.add(p)
            if len(fillers) < need:
                dropped["no filler found"] += 1
                continue
            cands = [(j.product, GAINS[j.relation], j.relation, j.source) for j in group]
            cands += [(p, 0.0, "filler", None) for p in fillers]
            rng_q.shuffle(cands)
            listing = "\n".join(f"{i}. {c[0]}" for i, c in enumerate(cands, 1))
            template = RANKING_TEMPLATES[rng_q.randrange(len(RANKING_TEMPLATES))]
            text = template.replace("{query}", query).replace("{products}", listing)
            gold = [int(c[1]) if c[1] in (0.0, 1.0) else c[1] for c in cands]
            out.append(Record(
                input_field=text, output_field=gold, task_type="ranking", metric="ndcg", task=task,
                capability=capability, source="derive:ranking",
                extra={"derived": {"from": "query-product judgements", "query": query,
                                   "relations": [c[2] for c in cands],
                                   "judged_from": [c[3] for c in cands], "fillers": need,
                                   "seed": seed}}))
    report = {
        "judgements": len(js), "judgement_conflicts": conflicts,
        "relations": dict(Counter(j.relation for d in by_query.values() for j in d.values())),
        "records": dict(sorted(layouts.items())),
        "queries": len(by_query),
        "judged_products_per_query": {str(k): v for k, v in
                                      sorted(Counter(len(d) for d in by_query.values()).items())},
        # questions with two relevance levels the judgements support, by the fillers allowed
        # (0: all 5 candidates judged for the query, no assumption)
        "supported": {f"max_{k}_fillers": supports[k] for k in range(candidates)},
        "fill": fill, "questions": len(out),
        "fillers_per_question": dict(sorted(Counter(r.extra["derived"]["fillers"] for r in out).items())),
        "dropped": dict(dropped),
    }
    return out, report


# ------------------------------------------------------------------------------------ mcq

_TRAILER = re.compile(r"\n?\s*(Output|Answer|Response|Title|Summary)\s*[:：]\s*$", re.IGNORECASE)
MCQ_HEADER = "Which of the following is the correct output?"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def mcq_question(input_field: str, options: Sequence[str], header: str = MCQ_HEADER) -> str:
    """The generation prompt without its trailing "Output:" line, then numbered options."""
    stem = _TRAILER.sub("", input_field.rstrip()).rstrip()
    listing = "\n".join(f"{i}. {_one_line(o)}" for i, o in enumerate(options))
    return f"{stem}\n{header}\n{listing}\nAnswer: "


def _embed(texts: Sequence[str]):
    from shoptune.eval.metrics import encoder, minilm_path
    return encoder(minilm_path()).encode(list(texts), convert_to_numpy=True,
                                          normalize_embeddings=True, batch_size=64)


def inputs_text(rec: Record) -> str:
    """What the encoder sees of a row: an own task's input values, one a line (its prompt's fixed
    wording would make every row alike), else its question text."""
    if rec.inputs is None:
        return rec.input_field
    return "\n".join(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                     for v in rec.inputs.values())


def label_space(records: Sequence[Record], labels: Sequence[str], embed=_embed):
    """Where a label task's rows lie among its labels: ``(S, C)``. ``C[j]`` is label ``j``'s
    centroid, the unit mean of the input embeddings of its rows (a label no row has: the embedding
    of its name); ``S[i, j]`` is the cosine of row ``i``'s inputs with ``C[j]``, row ``i`` left
    out of its own label's centroid (the only row of its label: that label's name)."""
    import numpy as np

    X = np.asarray(embed([inputs_text(r) for r in records]), dtype=np.float64)
    names = np.asarray(embed(list(labels)), dtype=np.float64)
    index = {lab: j for j, lab in enumerate(labels)}
    g = np.array([index[r.output_field] for r in records], dtype=int)
    sums = np.zeros((len(labels), names.shape[1]))
    np.add.at(sums, g, X)
    counts = np.bincount(g, minlength=len(labels))
    C = np.where(counts[:, None] > 0, sums, names)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    S = X @ C.T
    rest = sums[g] - X  # each row's own label without it
    norm = np.linalg.norm(rest, axis=1)
    S[np.arange(len(g)), g] = np.where(counts[g] > 1, (X * rest).sum(1) / np.maximum(norm, 1e-12),
                                       (X * names[g]).sum(1))
    return S, C


LABEL_MCQ_HEADER = "Which of the following is the correct answer?"


def _picked(rows: Sequence[Record], task: str, seed: int, limit: int | None) -> list[int]:
    """The rows (indices, in file order) a task's questions are made from: all, or ``limit`` of
    them drawn with a seeded generator."""
    rng = random.Random(f"{seed}\x00{task}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    return sorted(order[:limit] if limit else order)


def _label_stem(card):
    """The card without its label list: lines that only list ``{labels}`` are dropped (the options
    list them now); elsewhere ``{labels}`` becomes "the options below"."""
    lines = []
    for line in card.prompt.splitlines():
        if "{labels}" in line:
            if not re.search(r"\{(?!labels\})[a-z_][a-z0-9_]*\}", line):
                continue
            line = line.replace("{labels}", "the options below")
        lines.append(line)
    return card.model_copy(update={"prompt": "\n".join(lines)})


def label_mcq(rows: Sequence[Record], *, options: int, difficulty: str, seed: int,
              limit: int | None, embed=_embed) -> tuple[list[Record], Counter]:
    """Multiple-choice questions from the rows of one ``label`` task: the gold label among other
    labels of its card (``hard``: the labels nearest the row's inputs, see :func:`label_space`;
    ``easy``: random), gold position drawn uniformly (seeded)."""
    from shoptune import tasks

    task = rows[0].task
    card = tasks.find_card(task)
    skipped: Counter = Counter()
    if card is None or card.output != "label":
        skipped[f"{task}: no task card with output: label"] += len(rows)
        return [], skipped
    labels = list(card.labels)
    n = min(options, len(labels))
    usable = [r for r in rows if r.inputs is not None and r.output_field in labels]
    if len(usable) < len(rows):
        skipped[f"{task}: rows without inputs or with a label not on the card"] += len(rows) - len(usable)
    if n < 2:
        skipped[f"{task}: its card has fewer than 2 labels"] += len(usable)
    if n < 2 or not usable:
        return [], skipped
    sims, _ = label_space(usable, labels, embed)
    stem = _label_stem(card)
    out = []
    for i in _picked(usable, task, seed, limit):
        r = usable[i]
        g = labels.index(r.output_field)
        cand = [j for j in range(len(labels)) if j != g]
        if difficulty == "hard":
            picks = sorted(cand, key=lambda j: (-float(sims[i, j]), labels[j]))[:n - 1]
        else:
            picks = random.Random(f"{seed}\x00{r.id}").sample(cand, n - 1)
        opts = [labels[j] for j in picks]
        gold = random.Random(f"{seed}\x00gold\x00{r.id}").randrange(n)
        opts.insert(gold, r.output_field)
        out.append(Record(
            input_field=mcq_question(stem.render(r.inputs), opts, LABEL_MCQ_HEADER), output_field=gold,
            task_type="multiple-choice", metric="accuracy", task=f"{task}_mcq",
            capability=r.capability, source=f"derive:mcq:{r.source}", is_multiple_choice=True,
            extra={"derived": {"from": r.id, "from_task": task, "difficulty": difficulty,
                               "distractors": "labels", "options": opts,
                               "distractor_similarity": [round(float(sims[i, j]), 4) for j in picks],
                               "seed": seed}}))
    return out, skipped


def derive_mcq(records: Sequence[Record], *, options: int = 4, difficulty: str = "hard",
               max_similarity: float = 0.9, seed: int = 0, limit: int | None = None,
               embed=_embed) -> tuple[list[Record], dict]:
    """Multiple-choice versions of generation rows (distractors: other rows' answers of the same
    task, nearest in embedding space for ``hard``, random for ``easy``) and of own ``label``
    rows (distractors: other labels of the card, see :func:`label_mcq`)."""
    import numpy as np

    if difficulty not in ("hard", "easy"):
        raise ValueError(f"difficulty {difficulty!r}: hard or easy")
    if not 2 <= options <= 10:
        raise ValueError("options must be 2-10 (ShopBench multiple choice answers one digit)")
    by_task: dict[str, list[Record]] = defaultdict(list)
    by_label_task: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.task_type == "generation" and isinstance(r.output_field, str) and r.output_field.strip():
            by_task[r.task].append(r)
        elif r.task_type == "label":
            by_label_task[r.task].append(r)
    out: list[Record] = []
    skipped = Counter()
    for task in sorted(by_task):
        rows = by_task[task]
        answers = [_one_line(r.output_field) for r in rows]
        keys = [normalize(a) for a in answers]
        # distinct answers only: a distractor must differ from the gold
        uniq = sorted(set(keys))
        if len(uniq) < options:
            skipped[f"{task}: fewer than {options} distinct answers"] += len(rows)
            continue
        first_of = {}
        for i, k in enumerate(keys):
            first_of.setdefault(k, i)
        emb = embed([answers[first_of[k]] for k in uniq])
        pos = {k: i for i, k in enumerate(uniq)}
        for i in _picked(rows, task, seed, limit):
            r = rows[i]
            gi = pos[keys[i]]
            sims = emb @ emb[gi]
            cand = [j for j in range(len(uniq)) if j != gi and sims[j] < max_similarity]
            if len(cand) < options - 1:
                skipped["too few distinct distractors"] += 1
                continue
            if difficulty == "hard":
                cand.sort(key=lambda j: (-float(sims[j]), uniq[j]))
                picks = cand[:options - 1]
            else:
                picks = random.Random(f"{seed}\x00{r.id}").sample(cand, options - 1)
            opts = [answers[first_of[uniq[j]]] for j in picks]
            gold = random.Random(f"{seed}\x00gold\x00{r.id}").randrange(options)
            opts.insert(gold, answers[i])
            out.append(Record(
                input_field=mcq_question(r.input_field, opts), output_field=gold,
                task_type="multiple-choice", metric="accuracy", task=f"{task}_mcq",
                capability=r.capability, source=f"derive:mcq:{r.source}", is_multiple_choice=True,
                extra={"derived": {"from": r.id, "from_task": task, "difficulty": difficulty,
                                   "distractor_similarity": [round(float(sims[j]), 4) for j in picks],
                                   "seed": seed}}))
    for task in sorted(by_label_task):
        made, why = label_mcq(by_label_task[task], options=options, difficulty=difficulty,
                              seed=seed, limit=limit, embed=embed)
        out += made
        skipped.update(why)
    if not out:  # nothing to write: say why instead of an empty file
        if not by_task and not by_label_task:
            types = Counter(r.task_type for r in records)
            raise ValueError(f"no generation rows to make multiple-choice questions from "
                             f"({len(records)} rows; task types: "
                             f"{', '.join(f'{k}={v}' for k, v in types.items()) or 'none'}), and "
                             f"no rows of a label task")
        raise ValueError("no multiple-choice question could be made: "
                         + "; ".join(f"{k} ({v} rows)" for k, v in skipped.items()))
    sims_all = [s for r in out for s in r.extra["derived"]["distractor_similarity"]]
    report = {"rows": len(out), "difficulty": difficulty, "options": options,
              "tasks": dict(Counter(r.task for r in out)),
              "gold_positions": dict(sorted(Counter(r.output_field for r in out).items())),
              "distractor_similarity_mean": round(float(np.mean(sims_all)), 4) if sims_all else None,
              "skipped": dict(skipped)}
    return out, report


def card_yaml(name: str, *, capability: str, task_type: str, metric: str, description: str,
              file: str | None, like=None) -> str:
    """A task card for derived or synthesized rows (``SHOPTUNE_TASKS_PATH`` finds it); ``like``:
    an own task's card, copied under ``name`` (inputs, output, labels or schema, prompt) with
    ``file`` as its source."""
    import yaml
    if like is not None and like.own:
        card = like.model_dump(mode="json", by_alias=True, exclude_none=True,
                               exclude={"source", "tags", "description", "name"})
        return yaml.safe_dump({"name": name, **card, "description": description,
                               "source": {"files": [file]}, "tags": [*like.tags, "derived"]},
                              sort_keys=False, allow_unicode=True)
    return yaml.safe_dump({"name": name, "version": 1, "capability": capability,
                           "task_type": task_type, "metric": metric, "description": description,
                           "source": {"dataset": "custom", "file": file}, "tags": ["derived"]},
                          sort_keys=False, allow_unicode=True)
