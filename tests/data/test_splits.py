from shoptune.data.loaders import load_records
from shoptune.data.splits import split_records
from tests.conftest import mc, write_jsonl


def _recs(tmp_path, n, name):
    return load_records(write_jsonl(tmp_path / name, [mc(f"Question number {i}") for i in range(n)]))


def test_splits_are_deterministic_and_sized(tmp_path):
    recs = _recs(tmp_path, 2000, "a.jsonl")
    a = split_records(recs, seed=0, validation=0.1, test=0.2)
    b = split_records(list(reversed(recs)), seed=0, validation=0.1, test=0.2)
    assert {k: {r.id for r in v} for k, v in a.items()} == {k: {r.id for r in v} for k, v in b.items()}
    assert 300 < len(a["test"]) < 500 and 130 < len(a["validation"]) < 270
    c = split_records(recs, seed=1, validation=0.1, test=0.2)
    assert {r.id for r in c["test"]} != {r.id for r in a["test"]}


def test_splits_stable_when_file_grows(tmp_path):
    small = split_records(_recs(tmp_path, 500, "s.jsonl"))
    big = split_records(_recs(tmp_path, 1500, "b.jsonl"))
    for name in small:
        assert {r.id for r in small[name]} <= {r.id for r in big[name]}


def test_duplicate_questions_share_a_split(tmp_path):
    recs = load_records(write_jsonl(tmp_path / "d.jsonl", [mc("Same  question?", gold=g) for g in (0, 1, 2)]
                                    + [mc("same question", gold=3)]))
    parts = split_records(recs, validation=0.3, test=0.3)
    assert sum(1 for v in parts.values() if v) == 1
