"""#31 items 4, 13-16, 33: every data file is read bounded. A row past a bound (too long, nested
too deep, a 5,000-digit integer, a lone surrogate) is one issue naming file:line:field and the
rows around it are read; a file that is not a regular file (FIFO, device, symlink loop) is named
as such; blank-line runs are skipped. In process, tiny files, no model."""
import json
import os
import threading

import pytest

from shoptune.data import loaders
from shoptune.data.loaders import data_files, iter_raw, load_valid
from shoptune.data.validate import validate_records
from tests.conftest import mc, write_jsonl


def issues_of(path):
    n, issues = validate_records(path)
    return n, [str(i) for i in issues]


@pytest.fixture()
def small_rows(monkeypatch):
    """Rows capped at 2,000 bytes: a "too long" row costs a few KB here, not 4 MiB."""
    monkeypatch.setenv("SHOPTUNE_MAX_ROW_BYTES", "2000")


def hostile_rows() -> list[tuple[str, str, str]]:
    """(JSON text of a row, its field, the message) for each bound, as a user's file holds it."""
    ok = json.dumps(mc("base"))[:-1]
    return [
        (ok + ', "extra": ' + "[" * 100_000 + "]" * 100_000 + "}", "extra", "nested deeper than 64 levels"),
        (ok + ', "output_field": ' + "[" * 70 + "1" + "]" * 70 + "}", "output_field",
         "nested deeper than 64 levels"),
        (ok + ', "n": ' + "9" * 5000 + "}", "n", "an integer of 5000 digits (at most 100)"),
        (json.dumps(mc("lone \ud800 surrogate")), "input_field",
         "a lone surrogate (e.g. \\ud800) in a string: not Unicode text"),
    ]


def test_jsonl_rows_past_a_bound_are_one_issue_each_and_the_rest_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPTUNE_MAX_ROW_BYTES", "300kib")
    rows = hostile_rows()
    text = "".join(r + "\n" + json.dumps(mc(f"Q{i}")) + "\n" for i, (r, _, _) in enumerate(rows))
    text += json.dumps(mc("long " * 70_000)) + "\n" + json.dumps(mc("last")) + "\n"
    p = tmp_path / "h.jsonl"
    p.write_text(text)
    n, issues = issues_of(p)
    want = [f"{p}:{2 * i + 1}: {field}: {msg}" for i, (_, field, msg) in enumerate(rows)]
    want.append(f"{p}:{2 * len(rows) + 1}: the row is larger than 300 KiB, the limit for one data "
                "row (SHOPTUNE_MAX_ROW_BYTES raises it)")
    assert issues == want and n == len(rows) + 1


def test_a_json_array_is_read_one_element_at_a_time_and_steps_over_a_deep_element(tmp_path, monkeypatch):
    # blocks of 7 bytes: every element, string (with brackets, quotes and UTF-8 of several
    # bytes) and number crosses a block boundary; the result must equal json.loads of the file
    monkeypatch.setattr(loaders, "_ARRAY_CHUNK", 7)
    good = [mc("brackets ] [ { } \" in a string é 中文 😀"), mc("plain", gold=2),
            mc("x") | {"output_field": 3, "extra": [[1, 2], {"a": [3.5e-3, None, True]}]}]
    deep = json.dumps(mc("deep"))[:-1] + ', "extra": ' + "[" * 3000 + "]" * 3000 + "}"
    text = "[\n" + ",\n".join([json.dumps(good[0]), deep, *map(json.dumps, good[1:])]) + "\n]\n"
    p = tmp_path / "a.json"
    p.write_text("\n" * 5000 + text)  # (and a blank-line run before it: not "empty")
    got = list(iter_raw(p))
    assert [r for _, r, i in got if i is None] == good
    (loc, _, issue), = [x for x in got if x[2] is not None]
    assert loc == "index 1" and str(issue) == f"{p}:5003: extra: nested deeper than 64 levels"


@pytest.mark.parametrize("block", [1 << 20, 512])
def test_a_json_array_element_past_the_row_limit_is_one_line(tmp_path, small_rows, monkeypatch, block):
    """Whole in the block read: that element is skipped; longer than what may be held: the file
    ends there (the element's end is never looked for)."""
    monkeypatch.setattr(loaders, "_ARRAY_CHUNK", block)
    p = tmp_path / "a.json"
    p.write_text(json.dumps([mc("a"), mc("b" * 5000), mc("c")], indent=1))
    n, issues = issues_of(p)
    line = next(i for i, x in enumerate(p.read_text().splitlines(), 1) if '"b' in x) - 1
    too_long = "larger than 1.95 KiB, the limit for one data row (SHOPTUNE_MAX_ROW_BYTES raises it)"
    assert (n, issues) == ((2, [f"{p}:{line}: the row is {too_long}"]) if block > 5000 else
                           (1, [f"{p}:{line}: element 1: {too_long}; the rest of the file is not read"]))


@pytest.mark.parametrize("text, where, msg", [
    ('[{"input_field": "a"} {"input_field": "b"}]', 1, "invalid JSON: expected ',' or ']' after an element"),
    ('[{"input_field": "a"}\n', 2, "invalid JSON: the array is not closed"),
    ('[{"input_field": "a"},\n]', 2, "invalid JSON: a trailing ',' before ']'"),
    ('[{"input_field": "a"}]\n[]', 2, "invalid JSON: extra data after the array"),
    ('[{"input_field": "a",\n "x": tru}]', 2, "invalid JSON: Expecting value (column 7)"),
])
def test_a_broken_json_array_is_one_line_naming_where(tmp_path, text, where, msg):
    p = tmp_path / "a.json"
    p.write_text(text)
    assert [str(i) for _, _, i in iter_raw(p) if i is not None][-1] == f"{p}:{where}: {msg}"


def test_csv_cells_are_bounded_like_json_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPTUNE_MAX_ROW_BYTES", "6000")
    p = tmp_path / "d.csv"
    head = "input_field,output_field,task_type,metric,capability\n"
    p.write_text(head + 'Say hi,hi,generation,rougel,multilingual\n'
                 + f'Pick,{"9" * 5000},multiple-choice,accuracy,multilingual\n'
                 + 'Pick,"""\\ud800""",generation,rougel,multilingual\n'  # JSON: "\ud800"
                 + "Pick,['\\udfff'],named_entity_recognition,micro f1,multilingual\n"  # a Python literal
                 + 'Say bye,bye,generation,rougel,multilingual\n'
                 + '"' + "long\n" * 1300 + '",x,generation,rougel,multilingual\n'  # one quoted field, many lines
                 + 'never,read,generation,rougel,multilingual\n')
    n, issues = issues_of(p)
    surrogate = "output_field: a lone surrogate (e.g. \\ud800) in a string: not Unicode text"
    assert n == 2 and issues == [
        f"{p}:3: output_field: an integer of 5000 digits (at most 100)", f"{p}:4: {surrogate}",
        f"{p}:5: {surrogate}",
        f"{p}:7: the row is larger than 5.86 KiB, the limit for one data row (SHOPTUNE_MAX_ROW_BYTES "
        "raises it); the rest of the file is not read"]


def test_a_file_starting_with_blank_lines_is_not_empty(tmp_path):
    # item 16: >= 4 KiB of blank lines used to make the file "empty" and its rows vanish
    p = tmp_path / "b.jsonl"
    p.write_text(" \n" * 3000 + "".join(json.dumps(mc(f"Q{i}")) + "\n" for i in range(3)))
    assert issues_of(p) == (3, [])
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n \t\r\n" * 3000)
    assert issues_of(blank) == (0, [f"{blank}: file is empty"])


def test_a_surrogate_row_is_skipped_so_split_and_mix_never_meet_it(tmp_path):
    # item 14: it passed `data validate`, then split crashed writing it and mix in the tokenizer
    p = write_jsonl(tmp_path / "s.jsonl", [json.dumps(mc("a \udc80 b"), ensure_ascii=True), mc("fine")])
    recs, issues = load_valid([p])
    assert [r.input_field.split("\n")[0] for r in recs] == ["fine"] and issues[0].field == "input_field"
    assert all(json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8") for r in recs)


def run_with_timeout(fn, seconds=30):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (it blocked on, or read, the input)"
    return out["v"]


def test_not_a_regular_file_is_named_never_opened(tmp_path):
    # item 33 and item 4: a FIFO blocked or was "no data files here"; /dev/zero was read to 23 GB
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop2.jsonl")
    (tmp_path / "loop2.jsonl").symlink_to(loop)
    broken = tmp_path / "broken.jsonl"
    broken.symlink_to(tmp_path / "gone.jsonl")
    for path, why in ((fifo, "a named pipe (FIFO), not a regular file; a data file is read from a "
                             "regular file only"),
                      ("/dev/zero", "a character device, not a regular file; a data file is read "
                                    "from a regular file only"),
                      (loop, "a symlink loop (too many levels of symbolic links)"),
                      (broken, f"a broken symlink (to {tmp_path / 'gone.jsonl'}, which does not exist)")):
        got = run_with_timeout(lambda: validate_records(path))
        assert (got[0], [str(i) for i in got[1]]) == (0, [f"{path}: {why}"])
    # in a folder, such an entry is named too, not skipped as if it were not there
    assert [p.name for p in data_files(tmp_path)] == ["broken.jsonl", "loop.jsonl", "loop2.jsonl", "pipe.jsonl"]


def test_token_lengths_are_counted_in_batches_bounded_by_size():
    """`data stats` / `data mix` tokenized 2,048 rows per call whatever their length (a fast
    tokenizer holds ~200 bytes per character while it works: 20 GB for one 100 MB field)."""
    from shoptune.data.stats import token_lengths

    calls = []

    def tokenizer(texts, add_special_tokens):
        calls.append([len(t) for t in texts])
        return {"input_ids": [t.split() for t in texts]}
    texts = ["a b c", "x " * 40, "y", "z " * 30, "w w"]
    assert token_lengths(tokenizer, texts, batch_size=3, max_chars=64) == [3, 40, 1, 30, 2]
    assert calls == [[5], [80], [1, 60, 3]]  # a text past the budget goes alone
