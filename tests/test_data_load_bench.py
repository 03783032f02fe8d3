"""benchmarks/data_load.py on a tiny folder: every arm counts the same rows, the rule-breaking
row is counted as invalid, not dropped silently, and the overhead ratio is the one printed."""
import json
import subprocess
import sys

from tests.conftest import REPO, mc, write_jsonl


def test_data_load_bench_counts_rows_and_reports_the_overhead_ratio(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # 7: no such option; the last row breaks two rules (no input, no output): still one row
    write_jsonl(data / "a.jsonl", [mc(q=f"Q{i}?") for i in range(3)] + [mc(gold=7), {"task": "x"}])
    (data / "b.json").write_text(json.dumps([mc(q="Q9?"), mc(q="Q10?")]))
    (data / "c.csv").write_text("input_field,output_field,task_type,metric,capability\nSay hi,hi,generation,rougel,multilingual\n")
    out = tmp_path / "res" / "load.json"
    r = subprocess.run([sys.executable, "benchmarks/data_load.py", "--data", str(data), "--repeats", "2",
                        "--no-mixture", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["files"] == 3 and res["repeats"] == 2
    assert res["parse"]["rows"] == 8
    assert res["records"]["rows"] == 6 and res["records"]["invalid"] == 2
    assert res["records"]["rows_per_s"] == round(8 / res["records"]["seconds"])
    assert "mixture" not in res and res["machine"]["cores"] >= 1
    assert f"= {res['records_vs_parse']}x the parse" in r.stdout


def test_data_load_bench_refuses_a_folder_without_data(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/data_load.py", "--data", str(tmp_path), "--out",
                        str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no data files" in r.stderr and not (tmp_path / "x.json").exists()
