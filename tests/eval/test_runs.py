"""#31 items 17, 32: `eval compare` reads every folder, bounded and checked, before any
statistic: a malformed predictions.jsonl or scores.json, a NaN score or --n-boot < 1 is one line
naming file:line: field (exit 2), never a traceback nor "p = 0.0005, within noise" on NaN. No
model: folders as `shoptune eval` writes them (tests.eval.test_suite.fake_run)."""
import json

import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from tests.eval.test_paired import make_rows
from tests.eval.test_suite import fake_run


def rows_text(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


CASES = {  # name: (what is written over the folder's file, file, line, message)
    "not JSON": ("nope\n", "predictions.jsonl", 1, "invalid JSON: Expecting value (column 1)"),
    "a list per line": ("[1, 2]\n" * 18, "predictions.jsonl", 1, "expected a JSON object, got list"),
    "no score": (rows_text({k: v for k, v in r.items() if k != "score"} for r in make_rows(2)),
                 "predictions.jsonl", 1, "score: missing"),
    "a string score": (rows_text(dict(r, score="0.5") for r in make_rows(2)), "predictions.jsonl", 1,
                       "score: must be a number, got str '0.5'"),
    "a NaN score": (rows_text(make_rows(2)[:3] + [dict(make_rows(2)[3], score=float("nan"))]
                              + make_rows(2)[4:]), "predictions.jsonl", 4,
                    "score: must be a finite number, got nan"),
    "an unknown capability": (rows_text(dict(r, capability="vibes") for r in make_rows(2)),
                              "predictions.jsonl", 1, "capability: unknown capability 'vibes'"),
    "one row fewer": (rows_text(make_rows(2)[:-1]), "predictions.jsonl", None,
                      "17 rows, but scores.json lists 18 questions (a truncated or edited file?)"),
    "rows out of order": (rows_text(make_rows(2)[::-1]), "predictions.jsonl", 1, "id "),
    "a 5,000-digit score": ('{"score": ' + "9" * 5000 + "}\n", "predictions.jsonl", 1,
                            "score: an integer of 5000 digits (at most 100)"),
    "scores.json not JSON": ("{oops", "scores.json", 1,
                             "not valid JSON: Expecting property name enclosed in double quotes (column 2)"),
    "scores.json a list": ("[]", "scores.json", None, "expected a JSON object (as `shoptune eval` "
                                                      "writes), got list"),
    "scores.json tracks a list": (None, "scores.json", None, "tracks: Input should be a valid dictionary"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_run_folder_is_one_line_naming_the_file(tmp_path, case):
    text, name, line, msg = CASES[case]
    a = fake_run(tmp_path / "a", make_rows(1))
    b = fake_run(tmp_path / "b", make_rows(2))
    if text is None:  # a field of an otherwise fine scores.json
        s = json.loads((b / name).read_text())
        (b / name).write_text(json.dumps(dict(s, tracks=list(s["tracks"]))))
    else:
        (b / name).write_text(text)
    res = CliRunner().invoke(app, ["eval", "compare", str(a), str(b), "--n-boot", "20", "--n-perm", "20"])
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    where = f"{b / name}:{line}" if line else str(b / name)
    assert len(lines) == 1 and " ".join(lines[0].split()).startswith(f"error: {where}: {msg}"), res.output


@pytest.mark.parametrize("opt, value", [("--n-boot", "0"), ("--n-boot", "-5"), ("--n-perm", "0")])
def test_resamples_below_one_are_refused_before_any_work(tmp_path, opt, value):
    a = fake_run(tmp_path / "a", make_rows(1))
    res = CliRunner().invoke(app, ["eval", "compare", str(a), str(a), opt, value])
    assert res.exit_code == 2 and res.output.strip() == (
        f"error: {opt} {value}: at least 1 resample is needed for an interval and a p-value (the "
        "default, 2000, is the usual choice)"), res.output
