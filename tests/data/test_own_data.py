"""Data a shop does not have yet, for its own task: `data synth` from an own card and a few seed
rows (a scripted teacher on loopback), and `data derive mcq` turning a label task into ShopBench
multiple choice (hand-worked embeddings, and the worked example's products.csv)."""
import csv
import hashlib
import json
import re
import threading

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from shoptune import tasks
from shoptune.cli import app
from shoptune.data.derive import derive_mcq, label_space
from shoptune.data.loaders import load_records
from shoptune.tasks.outputs.choice import option_numbers
from shoptune.data.synth import (SynthSpec, label_difficulty, label_margins, load_pool, make_pool,
                                 run_synth, side_paths)
from shoptune.eval.scoring import score_outputs
from shoptune.tasks.new import make
from tests.data.scripted_teacher import ScriptedServer, prompt_of

from tests.conftest import EXAMPLE_TASKS as EXAMPLE

CATEGORIES = ["Beauty & Personal Care", "Electronics", "Grocery", "Home & Kitchen",
              "Sports & Outdoors", "Toys & Games"]


def example(fields: dict, answer: str) -> str:
    tags = "".join(f"<{k}>\n{v}\n</{k}>\n" for k, v in fields.items())
    return f"<example>\n{tags}<answer>\n{answer}\n</answer>\n</example>"


def scripted(defects, good):
    """Replies: the first distinct prompts get one defect each (in arrival order), then
    ``good(prompt, shown, h)``; ``shown`` is the (title, answer) pairs the prompt shows."""
    seen, prompts, lock = {}, [], threading.Lock()

    def reply(body):
        p = prompt_of(body)
        with lock:
            kind = seen.setdefault(p, defects[len(seen)] if len(seen) < len(defects) else None)
            prompts.append(p)
        shown = list(zip(re.findall(r"<title>\n(.*?)\n</title>", p),
                         re.findall(r"<answer>\n(.*?)\n</answer>", p, re.S)))
        h = hashlib.sha256(f"{p}{body.get('seed')}".encode()).hexdigest()[:6]  # (one per job)
        return 200, kind(shown, h) if kind else good(shown, h)
    return reply, prompts


# ----------------------------------------------------------------------------- synth

def test_synth_a_label_task_from_its_csv_steered_to_confusable_examples(own):
    make("product_category", EXAMPLE / "products.csv", inputs=["title"], label="category")
    pairs = {(r["title"], r["category"]) for r in csv.DictReader(open(EXAMPLE / "products.csv"))}
    defects = [lambda s, h: "A new product: Blue kettle -> Home & Kitchen",
               lambda s, h: example({"title": f"{h} Oak Bookshelf {h}"}, "Furniture"),
               lambda s, h: example({"title": f"{h} {s[0][0]} {h}"}, s[0][1].lower()),
               lambda s, h: example({"title": s[0][0]}, s[0][1])]
    # a good row: a new title after the first shown example's, with its label
    reply, prompts = scripted(defects, lambda s, h: example({"title": f"{h} {s[0][0]} {h}"}, s[0][1]))
    srv = ScriptedServer(reply)
    spec = SynthSpec(task="product_category", rows=8, shots=3, concurrency=2, backoff_s=0.01,
                     pool_limit=60,  # seed rows: 60 of the card's CSV
                     characteristics={"difficulty": {"hard": 1, "easy": 1}})
    out = own / "synth" / "cat.jsonl"
    try:
        rep = run_synth(spec, out, teacher_url=srv.url, teacher_model="t", api_key="k", quiet=True)
    finally:
        srv.stop()
    rejected = [json.loads(x) for x in side_paths(out)["rejected"].read_text().splitlines()]
    assert rep["kept"] == 8 and rep["output_task"] == "product_category"
    assert sorted(r["reason"] for r in rejected) == ["duplicate-exact", "format", "invalid:output_field",
                                                     "invalid:output_field"]
    details = sorted(r["detail"] for r in rejected if r["reason"] == "invalid:output_field")
    assert details[0].startswith("'Furniture' is not one of the labels: 'Beauty & Personal Care'")
    assert "(did you mean" in details[1]
    # the teacher is told the label set and shown rows of the CSV by their named input and gold
    for p in prompts:
        assert "exactly one of: " + ", ".join(CATEGORIES) + "." in p
        blocks = re.findall(r"<example>\n<title>\n(.*?)\n</title>\n<answer>\n(.*?)\n</answer>\n</example>", p)
        assert len(blocks) == 3 and set(blocks) <= pairs
    # the rows are the task's own records: they read back through its card, and validate
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    back = load_records([str(out)])
    assert [(r.inputs, r.output_field, r.task) for r in back] == [
        (k["inputs"], k["output_field"], "product_category") for k in kept]
    assert all(r.output_field in CATEGORIES and r.inputs["title"] for r in back)
    assert back[0].input_field.startswith(f"title: {back[0].inputs['title']}\nAnswer with exactly one of:")
    res = CliRunner().invoke(app, ["data", "validate", str(out)])
    assert res.exit_code == 0 and "ok: 8 valid rows" in res.output, res.output
    # steering without a student: hard rows are shown the pool's lowest-margin half, easy ones the
    # rest, and the rows made from hard examples lie nearer the boundary (measured)
    card = tasks.get_card("product_category")
    pool = make_pool(spec, load_pool(spec, card), None, card)
    assert rep["pool"]["difficulty"] == {"hard": 30, "easy": 30}
    for row in kept:
        prov = row["extra"]["provenance"]
        assert {pool.difficulty[i] for i in prov["shown"]} == {prov["characteristic"]["difficulty"]}
    steer = rep["steering"]["difficulty"]
    assert steer["hard"]["n"] + steer["easy"]["n"] == 8 and min(steer["hard"]["n"], steer["easy"]["n"]) >= 2
    assert steer["hard"]["label_margin"] < steer["easy"]["label_margin"]


JSON_ROWS = [{"t": "Acme red kettle 1.7 L", "a": {"brand": "Acme", "colors": ["red"]}},
             {"t": "Zed blue mug", "a": {"brand": "Zed", "colors": ["blue"]}},
             {"t": "Nova desk lamp", "a": {"brand": "Nova", "colors": []}}]


@pytest.mark.parametrize("kind, file, option, bad, reason, good, gold", [
    ("labels", "title,tags\nRed kettle,kitchen|electric\nOak desk,office\nUSB lamp,office|electric\n",
     {"labels": "tags"}, '["kitchen", "garden"]', "invalid:output_field", '["office", "electric"]',
     ["office", "electric"]),
    ("json", JSON_ROWS, {"json_col": "a"}, '{"brand": "Nova", "colors": "teal"}', "invalid:output_field",
     '{"colors": ["teal"], "brand": "Nova"}', {"brand": "Nova", "colors": ["teal"]}),
    ("number", "title,price\nRed kettle,19.99\nOak desk,120\nMug,4.5\n", {"target": "price"},
     "about 20", "invalid:output_field", "12.5", 12.5),
    ("text", "title,blurb\nRed kettle,Boils fast.\nOak desk,Solid oak.\nMug,Holds tea.\n",
     {"target": "blurb"}, None, "format", "Keeps drinks hot.", "Keeps drinks hot."),
])
def test_synth_every_own_output_type_checks_the_gold_against_the_card(own, kind, file, option, bad,
                                                                      reason, good, gold):
    if isinstance(file, list):
        src = own / "rows.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in file))
    else:
        src = own / "rows.csv"
        src.write_text(file)
    made = make("shop_task", src, inputs=["t" if isinstance(file, list) else "title"], **option)
    field = made.card.inputs[0].name
    assert made.card.output == kind
    first = (lambda s, h: example({field: f"New item {h}"}, bad)) if bad else (
        lambda s, h: f"<example>\n<answer>\n{good}\n</answer>\n</example>")  # no input tag
    reply, prompts = scripted([first], lambda s, h: example({field: f"New item {h}"}, good))
    srv = ScriptedServer(reply)
    out = own / "s.jsonl"
    try:
        rep = run_synth(SynthSpec(task="shop_task", rows=2, shots=2, concurrency=1, backoff_s=0.01),
                        out, teacher_url=srv.url, teacher_model="t", api_key="k", quiet=True)
    finally:
        srv.stop()
    assert rep["kept"] == 2 and rep["rejected_by_reason"] == {reason: 1}
    assert f"<{field}>\n" in prompts[0] and f"\n</{field}>\n<answer>\n" in prompts[0]
    back = load_records([str(out)])
    assert [r.output_field for r in back] == [gold, gold] and {r.task for r in back} == {"shop_task"}
    assert all(re.fullmatch(r"New item [0-9a-f]{6}", r.inputs[field]) for r in back)
    if kind == "json":  # written as training writes it: in the schema's key order
        assert tasks.answer_text(back[0]) == '{"brand": "Nova", "colors": ["teal"]}'


def test_synth_cli_output_task_gets_a_copy_of_the_own_card(own, monkeypatch):
    src = own / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in JSON_ROWS))
    make("attrs", src, inputs=["t"], json_col="a")
    reply, _ = scripted([], lambda s, h: example({"t": f"Item {h}"}, '{"brand": "Q", "colors": []}'))
    srv = ScriptedServer(reply)
    spec = own / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "attrs", "output_task": "attrs_synth", "rows": 2, "shots": 2}))
    try:
        res = CliRunner().invoke(app, ["data", "synth", str(spec), "--out", "d/s.jsonl",
                                       "--teacher-url", srv.url, "--quiet"])
    finally:
        srv.stop()
    assert res.exit_code == 0, res.output
    assert "kept 2 of 2" in res.output and "task card -> d/cards/attrs_synth.yaml" in " ".join(res.output.split())
    copy, orig = tasks.load_card(own / "d" / "cards" / "attrs_synth.yaml"), tasks.get_card("attrs")
    assert (copy.output, copy.schema_, copy.inputs, copy.prompt) == (orig.output, orig.schema_, orig.inputs,
                                                                     orig.prompt)
    assert copy.source_files() == [own / "d" / "s.jsonl"]
    monkeypatch.setenv("SHOPTUNE_TASKS_PATH", str(own / "d" / "cards"))
    tasks.reload()
    back = load_records(["d/s.jsonl"])
    assert {r.task for r in back} == {"attrs_synth"} and back[0].output_field == {"brand": "Q", "colors": []}
    res = CliRunner().invoke(app, ["data", "validate", "d/s.jsonl"])
    assert res.exit_code == 0 and "ok: 2 valid rows" in res.output, res.output


def test_synth_spec_without_a_pool_is_one_line(own):
    spec = own / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "ecguide_qprp", "rows": 2}))
    res = CliRunner().invoke(app, ["data", "synth", str(spec), "--out", "o.jsonl",
                                   "--teacher-url", "http://127.0.0.1:9/v1", "--quiet"])
    assert res.exit_code == 1 and "pool: name the files of real examples" in res.output
    assert "Traceback" not in res.output and not (own / "o.jsonl").exists()


# ----------------------------------------------------------------------------- label geometry

VECS = {"x0": (1.0, 0.0), "x1": (0.6, 0.8), "x2": (0.0, 1.0),  # the rows' inputs
        "A": (1.0, 0.0), "B": (0.0, 1.0), "C": (-1.0, 0.0)}  # the label names


def fake_embed(texts):
    return np.array([VECS[t] for t in texts])


def abc_rows(own):
    (own / "tasks").mkdir()
    (own / "tasks" / "abc.yaml").write_text(
        "name: abc\nversion: 1\ncapability: concept_understanding\ndescription: d\n"
        "inputs: [{name: title}]\noutput: label\nlabels: [A, B, C]\n"
        "prompt: \"Item: {title}\\nAnswer with exactly one of: {labels}.\\nAnswer:\"\n")
    tasks.reload()
    card = tasks.get_card("abc")
    return card, [card.record({"title": t}, g, source=f"f:line {i}") for i, (t, g) in
                  enumerate([("x0", "A"), ("x1", "A"), ("x2", "B")], 2)]


def test_label_space_margins_and_difficulty_by_hand(own, monkeypatch):
    card, rows = abc_rows(own)
    S, C = label_space(rows, card.labels, fake_embed)
    # A's centroid: unit (1.6, 0.8) = (0.894427, 0.447214); B: its one row (0, 1); C: no row, its
    # name (-1, 0). Own label, leaving the row out: x0 against x1 = 0.6, x1 against x0 = 0.6, x2
    # (B's only row) against B's name = 1.
    assert C == pytest.approx(np.array([[0.894427, 0.447214], [0, 1], [-1, 0]]), abs=1e-6)
    assert S == pytest.approx(np.array([[0.6, 0.0, -1.0], [0.6, 0.8, -0.6], [0.447214, 1.0, 0.0]]), abs=1e-6)
    monkeypatch.setattr("shoptune.data.derive._embed", fake_embed)
    margins, near, _ = label_margins(rows, card)
    assert margins == pytest.approx([0.6, -0.2, 0.552786], abs=1e-6) and near == ["B", "B", "A"]
    diff, pair, _ = label_difficulty(rows, card)  # the lower half (1 of 3) is hard
    assert [diff[r.id] for r in rows] == ["easy", "hard", "easy"]
    assert {pair[r.id] for r in rows} == {frozenset("AB")}


# ----------------------------------------------------------------------------- derive mcq

def test_label_task_as_multiple_choice_by_hand(own):
    card, rows = abc_rows(own)
    hard, rep = derive_mcq(rows, options=2, difficulty="hard", embed=fake_embed)
    # the distractor is the other label nearest each row (S above without the row's own label)
    assert [[o for o in r.extra["derived"]["options"] if o != g] for r, g in zip(hard, "AAB")] == [
        ["B"], ["B"], ["A"]]
    assert [r.extra["derived"]["distractor_similarity"] for r in hard] == [[0.0], [0.8], [0.4472]]
    for r, row in zip(hard, rows):
        opts = r.extra["derived"]["options"]
        assert opts[r.output_field] == row.output_field and r.task == "abc_mcq"
        assert (r.task_type, r.metric, r.capability) == ("multiple-choice", "accuracy", "concept_understanding")
        assert r.input_field == (f"Item: {row.inputs['title']}\nWhich of the following is the correct "
                                 f"answer?\n0. {opts[0]}\n1. {opts[1]}\nAnswer: ")
    every, _ = derive_mcq(rows, options=4, difficulty="easy", embed=fake_embed)  # 3 labels: all of them
    assert all(sorted(r.extra["derived"]["options"]) == ["A", "B", "C"] for r in every)
    assert [option_numbers(r.input_field) for r in every] == [[0, 1, 2]] * 3


def test_derive_mcq_cli_on_the_worked_example_validates(own):
    products = own / "products.csv"  # the worked example's first 80 rows
    products.write_text("".join((EXAMPLE / "products.csv").read_text().splitlines(keepends=True)[:81]))
    make("product_category", products, inputs=["title"], label="category")
    out = own / "d" / "mcq.jsonl"
    res = CliRunner().invoke(app, ["data", "derive", "mcq", str(products), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote 80 multiple-choice rows (hard, 4 options" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["data", "validate", str(out)])
    assert res.exit_code == 0 and "ok: 80 valid rows" in res.output, res.output
    card = tasks.load_card(own / "d" / "cards" / "product_category_mcq.yaml")
    assert (card.task_type, card.metric) == ("multiple-choice", "accuracy")
    assert "distractors: other labels of its card" in card.description
    rows = load_records([str(out)])
    gold_of = {r["title"]: r["category"] for r in csv.DictReader(open(products))}
    for r in rows:
        title = re.match(r"title: (.*)\n", r.input_field)[1]
        opts = dict(re.findall(r"^(\d)\. (.*)$", r.input_field, re.M))
        assert opts[str(r.output_field)] == gold_of[title] and len(set(opts.values())) == 4
        assert set(opts.values()) <= set(CATEGORIES) and "exactly one of" not in r.input_field
    assert {s["score"] for s in score_outputs(rows, [str(r.output_field) for r in rows])} == {1.0}
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert len(rep["gold_positions"]) == 4
    recs = load_records([str(products)])
    _, easy = derive_mcq(recs, options=4, difficulty="easy")
    assert rep["distractor_similarity_mean"] > easy["distractor_similarity_mean"]
