import json

import pytest

from shoptune.data.loaders import DataValidationError, load_records
from shoptune.tasks.outputs.choice import option_numbers
from shoptune.data.validate import validate_records
from tests.conftest import DEV, EC_GUIDE, mc, needs_shared, write_jsonl


@needs_shared
def test_shopbench_dev_loads_and_tags_all_tracks():
    recs = load_records(DEV)
    assert len(recs) == 96
    assert {r.capability for r in recs} == {"concept_understanding", "knowledge_reasoning",
                                            "user_behavior_alignment", "multilingual"}
    r = recs[0]
    assert (r.task, r.task_name, r.source) == ("shopbench_task1", "task1", f"{DEV}:line 1")
    assert len({x.id for x in recs}) == 96


@needs_shared
def test_ec_guide_mixed_file_is_split_by_type_and_metric():
    recs = load_records(EC_GUIDE / "MCQ" / "ACR.json")
    tasks = {r.task for r in recs}
    assert tasks == {"ecguide_acr_mcq", "ecguide_acr_gen"}
    assert sum(r.task == "ecguide_acr_mcq" for r in recs) == 1356
    assert recs[0].source.endswith("ACR.json#0")


def test_ids_are_stable_and_content_based(tmp_path):
    a = load_records(write_jsonl(tmp_path / "a.jsonl", [mc("A"), mc("B")]))
    b = load_records(write_jsonl(tmp_path / "b.jsonl", [mc("Z"), mc("B"), mc("A")]))
    assert {r.id for r in a} <= {r.id for r in b}


def test_json_array_and_jsonl_agree(tmp_path):
    rows = [mc("A"), mc("B", gold=3)]
    (tmp_path / "arr.json").write_text(json.dumps(rows, indent=2))
    a = load_records(tmp_path / "arr.json")
    b = load_records(write_jsonl(tmp_path / "l.jsonl", rows))
    assert [r.id for r in a] == [r.id for r in b]
    assert a[1].source.endswith("#1") and b[1].source.endswith(":line 2")


def test_shopping_mmlu_layout(tmp_path):
    d = tmp_path / "data" / "multiple_choice"
    d.mkdir(parents=True)
    row = {k: v for k, v in mc().items() if k not in ("task_name",)}
    (d / "query_relation_dataset.json").write_text(json.dumps([row]))
    (tmp_path / "data" / "generation").mkdir()
    with open(tmp_path / "data" / "generation" / "title_dataset.csv", "w", newline="") as fh:
        import csv
        w = csv.writer(fh)
        w.writerow(["input_field", "output_field", "task_type", "metric", "track"])
        w.writerow(["Write a title", "A title", "generation", "rougel",
                    "amazon-kdd-cup-24-multi-lingual-abilities"])
        w.writerow(["Pick\n0. a\n1. b\nAnswer:", "1", "multiple-choice", "accuracy",
                    "amazon-kdd-cup-24-multi-lingual-abilities"])
    recs = load_records(tmp_path / "data")
    assert sorted(r.task for r in recs) == ["query_relation", "title", "title"]
    csv_mc = [r for r in recs if r.task_type == "multiple-choice" and r.task == "title"][0]
    assert csv_mc.output_field == 1 and csv_mc.capability == "multilingual"


def test_user_csv_with_column_mapping_and_task_card(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text('question,answer\n"Query: red shoes nike",[\'nike\']\n"Query: asus tablet","[""asus""]"\n')
    recs = load_records(p, task="ecguide_ner", mapping={"input_field": "question",
                                                        "output_field": "answer"})
    assert [r.output_field for r in recs] == [["nike"], ["asus"]]
    assert recs[0].task_type == "named_entity_recognition" and recs[0].capability == "concept_understanding"


def test_streams_large_jsonl_lazily(tmp_path):
    from shoptune.data.loaders import iter_records
    p = write_jsonl(tmp_path / "big.jsonl", (mc(f"Q{i}") for i in range(20000)))
    it = iter_records(p)
    first = next(it)
    assert first.input_field.startswith("Q0")


def test_option_numbers_need_zero_start():
    assert option_numbers("Q\n0. a\n1. b\n3. c\nAnswer:") == [0, 1, 3]
    assert option_numbers("Great!\n1. fits\n2. cheap\n") == []


# ---------------------------------------------------------------- malformed input: >= 15 kinds

BAD = {
    "bad_json": ('{"input_field": "x", ', None, "invalid JSON"),
    "not_an_object": ('[1, 2]', None, "expected a JSON object"),
    "missing_input": (mc(input_field=None) | {"input_field": None}, "input_field", "must be a string"),
    "missing_output": ({k: v for k, v in mc().items() if k != "output_field"}, "output_field", "missing"),
    "empty_input": (mc() | {"input_field": "   "}, "input_field", "is empty"),
    "unknown_task_type": (mc() | {"task_type": "essay"}, "task_type", "unknown task type 'essay'"),
    "unknown_metric": (mc() | {"metric": "f2"}, "metric", "unknown metric 'f2'"),
    "metric_type_mismatch": (mc() | {"metric": "ndcg"}, "metric", "does not apply"),
    "mc_gold_string": (mc() | {"output_field": "1"}, "output_field", "needs an int option"),
    "mc_gold_bool": (mc() | {"output_field": True}, "output_field", "needs an int option"),
    "mc_option_out_of_range": (mc(gold=4), "output_field", "option index 4 out of range (options 0-3)"),
    "is_mc_mismatch": (mc() | {"is_multiple_choice": False}, "is_multiple_choice", "is False"),
    "retrieval_not_list": (mc() | {"task_type": "retrieval", "metric": "hit rate@3", "output_field": 3,
                                  "is_multiple_choice": False}, "output_field", "non-empty list of ints"),
    "retrieval_duplicates": (mc() | {"task_type": "retrieval", "metric": "hit rate@3",
                                    "output_field": [1, 1], "is_multiple_choice": False},
                             "output_field", "duplicates"),
    "ranking_negative": (mc() | {"task_type": "ranking", "metric": "ndcg", "output_field": [1, -0.5],
                                "is_multiple_choice": False}, "output_field", "relevance weights"),
    "ner_not_strings": (mc() | {"task_type": "named_entity_recognition", "metric": "micro f1",
                               "output_field": ["a", 2], "is_multiple_choice": False},
                        "output_field", "list of strings"),
    "generation_not_string": (mc() | {"task_type": "generation", "metric": "rougel", "output_field": 5,
                                     "is_multiple_choice": False}, "output_field", "needs a string"),
    "bool_not_yes_no": (mc() | {"metric": "bool", "output_field": "maybe"}, "output_field", "'yes' or 'no'"),
    "no_capability": ({k: v for k, v in mc().items() if k not in ("track", "task_name")}, "track",
                      "cannot tell the capability"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_malformed_row_names_file_line_and_field(tmp_path, kind):
    bad, field, msg = BAD[kind]
    p = write_jsonl(tmp_path / "d.jsonl", [mc("ok"), bad])
    n_ok, issues = validate_records(p)
    assert n_ok == 1 and len(issues) == 1, issues
    i = issues[0]
    assert (i.file, i.loc, i.field) == (str(p), "line 2", field)
    assert msg in i.message
    where = f"{p}:2: {field}: " if field else f"{p}:2: "  # path:LINE: field: reason
    assert str(i) == where + i.message
    with pytest.raises(DataValidationError, match=f"d.jsonl:2: {field + ': ' if field else ''}"):
        load_records(p)


def test_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n  \n")
    n, issues = validate_records(p)
    assert n == 0 and issues[0].message == "file is empty"


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "u.jsonl"
    p.write_bytes(json.dumps(mc("a")).encode() + b"\n" + b'{"input_field": "caf\xe9"}\n')
    n, issues = validate_records(p)
    assert n == 1 and issues[0].loc == "line 2" and "invalid UTF-8" in issues[0].message


def test_invalid_utf8_in_json_array(tmp_path):
    p = tmp_path / "u.json"
    p.write_bytes(b'[\n{"input_field": "ok"},\n{"input_field": "caf\xe9"}\n]')
    _, issues = validate_records(p)
    assert issues[0].loc == "line 3"


def test_json_array_issue_names_the_line_the_element_starts_on(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([mc("A"), mc("B", gold=7)], indent=2))
    _, issues = validate_records(p)
    assert issues[0].loc == "index 1"
    start = [n for n, x in enumerate(p.read_text().splitlines(), 1) if x == "  {"][1]  # 2nd "{"
    assert str(issues[0]).startswith(f"{p}:{start}: output_field: option index 7 out of range")


def test_duplicate_explicit_ids(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [mc("a", id="q1"), mc("b", id="q2"), mc("c", id="q1")])
    n, issues = validate_records(p)
    assert n == 2 and issues[0].field == "id" and "first at" in issues[0].message
    assert issues[0].loc == "line 3"


def test_missing_path_says_how_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="shoptune data fetch"):
        load_records(tmp_path / "nope.json")


def test_errors_are_collected_and_summarised(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [mc(gold=9)] * 25)
    with pytest.raises(DataValidationError) as e:
        load_records(p)
    assert len(e.value.issues) == 25 and "... and 5 more" in str(e.value)


@needs_shared
def test_real_ec_guide_defects_are_found():
    # PRP labels its options 0,1,3 but 333 golds say 2; SAP has 9 string golds.
    _, issues = validate_records(EC_GUIDE / "MCQ" / "PRP.json")
    assert len(issues) == 333
    _, issues = validate_records(EC_GUIDE / "MCQ" / "SAP.json")
    assert sum("needs an int option" in i.message for i in issues) == 9
