"""A shop's own task: `tasks new` from its CSV/JSONL/JSON/Parquet, the card it writes, rows read
through the card, and every bad input as one line naming file:line and field (or card key)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoptune import tasks
from shoptune.data.loaders import DataValidationError, load_records, load_valid
from shoptune.tasks import CardError
from shoptune.tasks.new import NewTaskError, make

from tests.conftest import EXAMPLE_TASKS as EXAMPLE


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_label_task_from_a_csv_with_the_users_own_columns(own):
    f = write(own / "shop.csv", "Product Title,cat\nUSB-C charger 20W,Electronics\nOat flakes,Grocery\n"
                                "Frying pan,Home & Kitchen\nEarbuds,Electronics\n\"\",Grocery\nKettle,\n")
    made = make("product_category", f, inputs=["Product Title"], label="cat")
    card = made.card
    assert made.path == Path("tasks/product_category.yaml")
    assert card.output == "label" and card.labels == ["Electronics", "Grocery", "Home & Kitchen"]
    assert card.metrics == ("accuracy", "macro f1") and card.capability == "concept_understanding"
    assert [i.name for i in card.inputs] == ["product_title"]
    assert card.source.columns == {"product_title": "Product Title", "output": "cat"}
    assert made.rows == 4 and made.distribution == {"Electronics": 2, "Grocery": 1, "Home & Kitchen": 1}
    assert [str(i) for i in made.invalid] == [
        f"{f}:6: Product Title: is empty",
        f"{f}:7: cat: '' is not one of the labels: 'Electronics', 'Grocery', 'Home & Kitchen'"]
    # the card on disk is what every command reads (./tasks)
    loaded = tasks.get_card("product_category")
    assert loaded.prompt == ("Product Title: {product_title}\nAnswer with exactly one of: {labels}.\n"
                             "Answer:")
    recs, issues = load_valid([str(f)])  # no --task, no --map: the card names the file
    assert [r.output_field for r in recs] == ["Electronics", "Grocery", "Home & Kitchen", "Electronics"]
    r = recs[0]
    assert (r.task, r.task_type, r.metric, r.inputs) == ("product_category", "label", "accuracy",
                                                        {"product_title": "USB-C charger 20W"})
    assert r.input_field == ("Product Title: USB-C charger 20W\nAnswer with exactly one of: Electronics, "
                             "Grocery, Home & Kitchen.\nAnswer:")
    assert tasks.render(r) == r.input_field and tasks.answer_text(r) == "Electronics"
    assert len(issues) == 2
    # rows shoptune wrote (split, mix) read back the same
    back = own / "rows.jsonl"
    back.write_text("".join(json.dumps(x.to_dict()) + "\n" for x in recs))
    again = load_records([str(back)])
    assert [(x.inputs, x.output_field, x.id) for x in again] == [(x.inputs, x.output_field, x.id) for x in recs]


def test_json_labels_number_and_text_tasks_from_jsonl_json_and_parquet(own):
    rows = [{"t": "Acme red kettle 1.7 L", "a": {"brand": "Acme", "colors": ["red"], "size": "1.7 L"},
             "tags": "kitchen|electric", "price": "19.99", "blurb": "A kettle."},
            {"t": "Zed mug", "a": {"brand": "Zed", "colors": []}, "tags": ["kitchen"], "price": 4,
             "blurb": "A mug."}]
    jl = write(own / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    made = make("attrs", jl, inputs=["t"], json_col="a")
    s = made.card.schema_
    assert s == {"type": "object", "additionalProperties": False, "required": ["brand", "colors"],
                 "properties": {"brand": {"type": "string", "maxLength": 8},
                                "colors": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                           "maxItems": 2},
                                "size": {"type": "string", "maxLength": 10}}}
    assert made.card.metrics == ("field f1", "valid json") and made.rows == 2
    assert tasks.answer_text(load_records([str(jl)], task="attrs")[0]) == \
        '{"brand": "Acme", "colors": ["red"], "size": "1.7 L"}'
    made = make("tags", write(own / "p.json", json.dumps(rows)), inputs=["t"], labels="tags")
    assert made.card.labels == ["electric", "kitchen"] and made.card.metrics == ("micro f1",)
    assert [r.output_field for r in load_records([str(own / "p.json")], task="tags")] == \
        [["electric", "kitchen"], ["kitchen"]]  # (a set, in the labels' order)
    made = make("price", jl, inputs=["t"], target="price")
    assert made.card.output == "number" and made.notes[-1].startswith("output: number")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"t": r["t"], "blurb": r["blurb"]} for r in rows]), own / "p.parquet")
    made = make("blurb", own / "p.parquet", inputs=["t"], target="blurb")
    assert made.card.output == "text" and made.card.metric == "rougel" and made.rows == 2
    assert [r.source.rsplit(" ", 1)[-1] for r in load_records([str(own / "p.parquet")])] == ["1", "2"]


def test_a_split_of_new_data_against_an_existing_card_names_file_line_and_column(own):
    make("product_category", write(own / "a.csv", "title,cat\nx,A\ny,B\n"), inputs=["title"], label="cat")
    new = write(own / "b.csv", "title,cat\nz,C\nw,a\n,A\n")
    with pytest.raises(DataValidationError) as e:
        load_records([str(new)], task="product_category")
    assert [str(i) for i in e.value.issues] == [
        f"{new}:2: cat: 'C' is not one of the labels: 'A', 'B'",
        f"{new}:3: cat: 'a' is not one of the labels (did you mean 'A'?): 'A', 'B'",
        f"{new}:4: title: is empty"]
    missing = write(own / "c.csv", "name,cat\nz,A\n")
    with pytest.raises(DataValidationError, match=r"c.csv:2: title: missing column"):
        load_records([str(missing)], task="product_category")


def test_task_name_column_picks_own_cards_and_an_unknown_one_is_one_line(own):
    make("product_category", write(own / "a.csv", "title,cat\nx,A\ny,B\n"), inputs=["title"], label="cat")
    rows = own / "mixed.jsonl"
    rows.write_text(json.dumps({"task_name": "product_category", "title": "q", "cat": "A"}) + "\n"
                    + json.dumps({"task_name": "nope_task", "input_field": "q", "output_field": "x"}) + "\n")
    recs, issues = load_valid([str(rows)])
    assert [r.task for r in recs] == ["product_category"]
    assert [str(i) for i in issues] == [
        f"{rows}:2: task_name: 'nope_task' names no task card (`shoptune tasks ls` lists them; "
        "`shoptune tasks new` makes one), and the row has no track or capability column"]


@pytest.mark.parametrize("args, message", [
    (dict(inputs=["title"]), "give exactly one of --label COL, --labels COL, --json COL, --target COL"),
    (dict(inputs=["title"], label="cat", target="cat"), "got --label, --target"),
    (dict(inputs=["nope"], label="cat"), "no column 'nope' (columns: 'title', 'cat')"),
    (dict(inputs=["title"], label="title"), "'title' is also the answer column"),
    (dict(inputs=["title"], label="cat", capability="cooking"), "--capability 'cooking'"),
])
def test_tasks_new_refuses_bad_options_in_one_line(own, args, message):
    f = write(own / "a.csv", "title,cat\nx,A\ny,B\n")
    with pytest.raises(NewTaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make("t", f, **args)
    assert not (own / "tasks").exists()  # nothing half-written


def test_tasks_new_refuses_empty_files_one_label_shipped_names_and_foreign_cards(own):
    with pytest.raises(NewTaskError, match="no rows to read"):
        make("t", write(own / "e.csv", ""), inputs=["title"], label="cat")
    with pytest.raises(NewTaskError, match="holds 1 distinct label"):
        make("t", write(own / "one.csv", "title,cat\nx,A\ny,A\n"), inputs=["title"], label="cat")
    f = write(own / "a.csv", "title,cat\nx,A\ny,B\n")
    with pytest.raises(NewTaskError, match="'shopbench_task2' exists already"):
        make("shopbench_task2", f, inputs=["title"], label="cat")
    with pytest.raises(NewTaskError, match="task name 'Bad-Name'"):
        make("Bad-Name", f, inputs=["title"], label="cat")
    make("t", f, inputs=["title"], label="cat")
    with pytest.raises(NewTaskError, match="exists already"):
        make("t", f, inputs=["title"], label="cat")
    assert make("t", f, inputs=["title"], label="cat", overwrite=True).rows == 2
    mine = write(own / "tasks" / "u.yaml", "name: u\nnotes: my own file, not a card written by tasks new\n")
    with pytest.raises(NewTaskError, match="u.yaml was not written by `shoptune tasks new`"):
        make("u", f, inputs=["title"], label="cat", overwrite=True)
    assert "my own file" in mine.read_text()


def test_own_card_errors_name_file_line_and_key(own):
    (own / "tasks").mkdir()
    bad = write(own / "tasks" / "x.yaml", "name: x\nversion: 1\ncapability: concept_understanding\n"
                "description: d\ninputs: [{name: review}]\noutput: label\nlabels: [A, A]\n"
                "prompt: 'Review: {review} {colour}'\n")
    with pytest.raises(CardError) as e:
        tasks.all_cards()
    msg = str(e.value)
    assert msg.startswith(f"{bad}:") and "labels: label 'A' is listed twice" in msg
    assert "{colour} is not an input of the task" in msg
    bad.write_text("name: shopbench_task2\nversion: 1\ncapability: concept_understanding\ndescription: d\n"
                   "inputs: [{name: review}]\noutput: label\nlabels: [A, B]\nprompt: '{review}'\n")
    tasks.reload()
    with pytest.raises(CardError, match=r"x.yaml: name: 'shopbench_task2' is already the name of the "
                                        r"shipped task card"):
        tasks.all_cards()
    bad.write_text("name: x\nversion: 1\ncapability: concept_understanding\ndescription: d\n"
                   "inputs: [{name: review}]\noutput: json\nschema: {type: objekt}\nprompt: '{review}'\n")
    tasks.reload()
    with pytest.raises(CardError, match=r"x.yaml:\d+: .*schema: not a valid JSON Schema"):
        tasks.all_cards()
    bad.write_text("some: other yaml, not a card\n")  # other YAML in ./tasks is not a card
    tasks.reload()
    assert "x" not in tasks.all_cards()


def test_cli_tasks_new_prints_distribution_invalid_rows_and_next_commands(own):
    f = write(own / "shop.csv", "title,cat\nUSB-C charger,Electronics\nOats,Grocery\n,Grocery\n")
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", "tasks", "new", "shop_cat", "--from", str(f),
                        "--input", "title", "--label", "cat"], capture_output=True, text=True, cwd=own)
    assert r.returncode == 0, r.stderr
    assert "task card -> tasks/shop_cat.yaml" in r.stdout
    assert "rows: 2 valid, 1 invalid" in r.stdout and f"{f}:4: title: is empty" in r.stdout
    assert "Electronics" in r.stdout and "50%" in r.stdout
    assert "shoptune data split --task shop_cat --out data/shop_cat" in r.stdout
    r = subprocess.run([sys.executable, "-m", "shoptune.cli", "tasks", "new", "shop_cat", "--from", str(f),
                        "--input", "title", "--label", "cat"], capture_output=True, text=True, cwd=own)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "exists already" in r.stderr


def test_the_worked_example_files_make_their_tasks(own):
    made = make("product_category", EXAMPLE / "products.csv", inputs=["title"], label="category")
    assert made.rows == 240 and len(made.card.labels) == 6 and not made.invalid
    made = make("product_attributes", EXAMPLE / "attributes.csv", inputs=["title"], json_col="attributes")
    assert made.rows == 200 and made.card.schema_["required"] == ["brand", "colors", "materials"]


def test_a_task_name_is_a_source_for_mixtures_and_suites(own):
    from shoptune.eval.suite import build_suite
    from shoptune.train.mixture import MixtureConfig, build_mixture
    rows = "title,cat\n" + "".join(f"item {i},{'AB'[i % 2]}\n" for i in range(40))
    make("two", write(own / "a.csv", rows), inputs=["title"], label="cat")
    cfg = MixtureConfig(sources=["two"], split="train", split_validation=0, split_test=0.25, dedup=False)
    recs, manifest = build_mixture(cfg)
    assert {r.task for r in recs} == {"two"} and manifest["tasks"] == {"two": len(recs)}
    assert len(manifest["sources"]["two"]) == 16
    write(own / "suite.yaml", "name: mine\nparts:\n- name: test\n  sources: [two]\n  split: test\n"
                              "  split_validation: 0\n  split_test: 0.25\n")
    test, m = build_suite(own / "suite.yaml")
    assert test and not {r.id for r in test} & {r.id for r in recs}  # never trained on
    assert len(test) + len(recs) == 40 and m["task_types"] == {"label": len(test)}
