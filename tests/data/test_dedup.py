import json

from shoptune.data.dedup import decontaminate, dedup, normalize
from shoptune.data.loaders import load_records
from tests.conftest import DEV, mc, needs_shared, write_jsonl

TEMPLATE = ("You are a helpful online shop assistant and a linguist. A customer on an online shopping "
            "platform has made the following query. Please extract phrases from the query that "
            "correspond to the entity type 'brand'. Please directly output the entity.\nQuery: {q}\nOutput: ")
LONG = "nike air zoom pegasus 39 road running shoes for men black white size 10 wide fit"
QUERIES = [LONG, "asus zenbook laptop sleeve", "lego star wars falcon",
           "samsung galaxy s21 case", "dewalt cordless drill 20v", "kindle paperwhite cover"]


def ner(q, gold):
    return {"input_field": TEMPLATE.format(q=q), "output_field": gold, "task_type":
            "named_entity_recognition", "metric": "micro f1", "task_name": "task4",
            "track": "amazon-kdd-cup-24-understanding-shopping-concepts"}


def test_normalize():
    assert normalize("  Hello,\tWORLD!! ") == "hello world"


def test_exact_and_near_duplicates_removed_but_template_sharing_kept(tmp_path):
    rows = [ner(q, [q.split()[0]]) for q in QUERIES]
    rows += [ner(QUERIES[0], ["nike"]),  # exact copy
             ner(LONG.replace("size 10", "size 11"), ["nike"]),  # near copy (one edit)
             ner(QUERIES[1].upper(), ["asus"])]  # normalises to an exact copy
    recs = load_records(write_jsonl(tmp_path / "t.jsonl", rows))
    kept, removed = dedup(recs, threshold=0.8)
    assert len(kept) == len(QUERIES)  # distinct queries sharing a long template all survive
    reasons = sorted(r["reason"] for r in removed)
    assert reasons == ["exact-duplicate", "exact-duplicate", "near-duplicate"]
    near = [r for r in removed if r["reason"] == "near-duplicate"][0]
    assert near["of"] == recs[0].id and near["similarity"] >= 0.8


@needs_shared
def test_planted_dev_question_is_decontaminated(tmp_path):
    dev = load_records(DEV)
    planted_exact = dict(ner("some fresh query", ["x"]), input_field=dev[10].input_field)
    edited = dev[20].input_field.replace("Blue", "Navy Blue", 1)
    assert edited != dev[20].input_field
    planted_near = {"input_field": edited, "output_field": dev[20].output_field,
                    "task_type": dev[20].task_type, "metric": dev[20].metric,
                    "task_name": "task99", "track": dev[20].track}
    rows = [ner(q, [q.split()[0]]) for q in QUERIES] + [planted_exact, planted_near]
    train = load_records(write_jsonl(tmp_path / "train.jsonl", rows))
    kept, removed = decontaminate(train, {"dev": dev})
    assert len(kept) == len(QUERIES)
    by_reason = {r["reason"]: r for r in removed}
    assert by_reason["contaminated-exact"]["of"] == dev[10].id
    assert by_reason["contaminated-exact"]["eval_set"] == "dev"
    assert by_reason["contaminated-near"]["of"] == dev[20].id


def test_dedup_cli_writes_report(tmp_path):
    from typer.testing import CliRunner

    from shoptune.cli import app
    rows = [ner(q, [q.split()[0]]) for q in QUERIES] + [ner(QUERIES[2], ["lego"])]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    ev = write_jsonl(tmp_path / "ev.jsonl", [ner(QUERIES[3], ["samsung"])])
    res = CliRunner().invoke(app, ["data", "dedup", str(src), "--against", str(ev),
                                   "--out", str(tmp_path / "clean.jsonl")])
    assert res.exit_code == 0, res.output
    clean = [json.loads(x) for x in (tmp_path / "clean.jsonl").read_text().splitlines()]
    removed = [json.loads(x) for x in (tmp_path / "clean.removed.jsonl").read_text().splitlines()]
    assert len(clean) == len(QUERIES) - 1
    assert sorted(r["reason"] for r in removed) == ["contaminated-exact", "exact-duplicate"]


# ----------------------------------------------------------------------------- 13-gram overlap

PRODUCTS = ("Anker PowerCore 10000 portable charger ultra compact high speed charging battery pack",
            "Amazon Basics USB-C to lightning cable MFi certified white six feet braided")
EXPLANATION = ("People who buy a compact power bank usually also need a certified fast charging "
               "cable so they can top up their phone anywhere while travelling")


def gen_row(products, explanation):
    return {"input_field": "Given the products a user bought, explain why they were bought together.\n"
            + "\n".join(f"Product {i + 1}: {p}" for i, p in enumerate(products)) + "\nExplanation: ",
            "output_field": explanation, "task_type": "generation", "metric": "sent-transformer",
            "task_name": "task1", "track": "amazon-kdd-cup-24-understanding-shopping-concepts"}


def leaked_mcq(products, explanation):
    """The same products and explanation, rewritten into a multiple-choice question."""
    q = (f"A customer bought '{products[0]}' together with '{products[1]}'. "
         "Which statement best explains the purchase?")
    opts = [explanation, "They are gifts for two different people in the household",
            "The customer is comparing two brands before returning one", "It was a mistake"]
    return {"input_field": q + "\n" + "\n".join(f"{i}. {o}" for i, o in enumerate(opts)) + "\nAnswer: ",
            "output_field": 0, "task_type": "multiple-choice", "metric": "accuracy",
            "is_multiple_choice": True, "task_name": "task2",
            "track": "amazon-kdd-cup-24-understanding-shopping-concepts"}


def test_13gram_catches_a_leak_rewritten_into_another_template(tmp_path):
    clean = [gen_row(("Logitech wireless mouse", "Logitech mouse pad"), "Both are desk accessories."),
             gen_row(("Pampers size 3 diapers", "Huggies wipes"), "Parents buy baby care items together.")]
    train = load_records(write_jsonl(tmp_path / "train.jsonl", clean + [gen_row(PRODUCTS, EXPLANATION)]))
    ev = load_records(write_jsonl(tmp_path / "eval.jsonl", [leaked_mcq(PRODUCTS, EXPLANATION)]))
    # the whole-question checks miss it: different template, different wording around the content
    kept_old, removed_old = decontaminate(train, {"eval": ev}, ngram=0)
    assert len(kept_old) == 3 and removed_old == []
    kept, removed = decontaminate(train, {"eval": ev})
    assert [r.id for r in kept] == [train[0].id, train[1].id]
    (rem,) = removed
    assert rem["reason"] == "contaminated-13gram" and rem["id"] == train[2].id
    assert rem["eval_set"] == "eval" and rem["of"] == ev[0].id
    assert len(rem["ngram"].split()) == 13 and rem["ngram"] in normalize(train[2].input_field + " " + EXPLANATION)
    from shoptune.data.dedup import contamination_summary
    assert contamination_summary({"eval": ev}, removed) == {"eval": {"questions": 1, "overlapping": 1}}


def test_13gram_needs_13_consecutive_words_and_ignores_boilerplate(tmp_path):
    from shoptune.data.dedup import ngram_overlap
    twelve = " ".join(PRODUCTS[0].split()[:12])  # 12 shared words: not an overlap
    rows = [gen_row((twelve + " extra", "other thing"), "A short unrelated explanation.")]
    boiler = "please note that all prices include sales tax and shipping is free for prime members"
    rows += [gen_row((f"item {chr(97 + i)}", "thing"), boiler) for i in range(11)]  # 13-gram in 11 rows
    train = load_records(write_jsonl(tmp_path / "train.jsonl", rows))
    ev = load_records(write_jsonl(tmp_path / "eval.jsonl", [
        leaked_mcq((PRODUCTS[0], "x"), "none of these"), leaked_mcq(("y", "z"), boiler)]))
    ov = ngram_overlap(train, {"eval": ev})
    assert ov.train_hits == {} and ov.summary()["eval_sets"]["eval"]["overlapping"] == 0
    ov = ngram_overlap(train, {"eval": ev}, max_doc_freq=11)  # boilerplate counted when allowed
    assert sorted(ov.train_hits) == list(range(1, 12)) and ov.eval_hits["eval"] == {1}


def test_dedup_cli_reports_overlap_per_eval_set(tmp_path):
    from typer.testing import CliRunner

    from shoptune.cli import app
    src = write_jsonl(tmp_path / "t.jsonl", [gen_row(PRODUCTS, EXPLANATION), gen_row(("a", "b"), "c d")])
    ev = write_jsonl(tmp_path / "ev.jsonl", [leaked_mcq(PRODUCTS, EXPLANATION), leaked_mcq(("q", "r"), "s")])
    res = CliRunner().invoke(app, ["data", "dedup", str(src), "--against", str(ev),
                                   "--out", str(tmp_path / "clean.jsonl")])
    assert res.exit_code == 0, res.output
    assert f"{ev}: 1 of 2 questions overlap the training data" in " ".join(res.output.split())
    removed = [json.loads(x) for x in (tmp_path / "clean.removed.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in removed] == ["contaminated-13gram"]


def test_overlap_is_counted_in_every_eval_set_holding_the_question(tmp_path):
    """A suite that contains the development set (suite:core holds all of ShopBench dev): a
    training row copying a dev question, exactly or nearly, overlaps both evaluation sets."""
    from shoptune.data.dedup import contamination_summary
    train = load_records(write_jsonl(tmp_path / "train.jsonl", [
        ner(QUERIES[1], ["asus"]), ner(LONG.replace("size 10", "size 11"), ["nike"]),
        ner(QUERIES[4], ["dewalt"]), ner(QUERIES[2], ["lego"])]))
    dev = load_records(write_jsonl(tmp_path / "dev.jsonl", [ner(q, [q.split()[0]]) for q in QUERIES[:2]]
                                   + [ner(QUERIES[3], ["samsung"])]))
    suite = load_records(write_jsonl(tmp_path / "suite.jsonl", [ner(QUERIES[5], ["kindle"])]
                                     + [ner(q, [q.split()[0]]) for q in QUERIES[:2]]))
    kept, removed = decontaminate(train, {"dev": dev, "suite": suite}, ngram=0)
    assert [r.id for r in kept] == [train[2].id, train[3].id]
    by_reason = {r["reason"]: r for r in removed}
    def matched(r):
        return sorted([[r["eval_set"], r["of"]], *r["also"]])
    assert matched(by_reason["contaminated-exact"]) == [["dev", dev[1].id], ["suite", suite[2].id]]
    assert matched(by_reason["contaminated-near"]) == [["dev", dev[0].id], ["suite", suite[1].id]]
    assert contamination_summary({"dev": dev, "suite": suite}, removed) == {
        "dev": {"questions": 3, "overlapping": 2}, "suite": {"questions": 3, "overlapping": 2}}
