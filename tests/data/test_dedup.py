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
