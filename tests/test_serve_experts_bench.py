"""benchmarks/serve_experts.py end to end on a tiny model: the routed experts and the floor measured."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO, needs_shared


@needs_shared
def test_serve_experts_smoke_on_a_tiny_model(tmp_path):
    from shoptune.serve.testing import make_tiny_model
    tiny = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/serve_experts.py", "--model", str(tiny), "--engines", "builtin",
                        "--arms", "base", "experts", "--requests", "4", "--concurrency", "2", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["errors"] == 0 and res["failed_arms"] == [] and res["n_experts"] == 4
    for arm in ("base", "experts"):
        got = res["builtin"][arm]
        assert got["requests"] == 4 and got["req_per_s"] > 0 and got["peak_rss_mb"] > 0
        # generated tokens from the replies' usage: per-token cost apart from answer length
        assert got["completion_tokens"] >= 4 and got["gen_tok_per_s"] > 0
        assert got["mean_completion_tokens"] == round(got["completion_tokens"] / 4, 1)
    assert "--experts" in res["builtin"]["experts"]["command"]
    assert out.with_suffix(".png").is_file()


@needs_shared
def test_serve_experts_against_r32_on_suite_traffic(tmp_path):
    """Without a merged arm the ratios are to the r=32 LoRA; --questions core draws the traffic
    from the suite (EC-Guide tasks too), and only the arms asked for need their adapters."""
    from shoptune.serve.testing import make_tiny_model
    tiny = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "benchmarks/serve_experts.py", "--model", str(tiny), "--engines", "builtin",
                        "--arms", "r32", "experts", "--requests", "8", "--concurrency", "4",
                        "--questions", "core", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["questions"] == "core" and res["errors"] == 0 and res["n_experts"] == 4
    got, ratio = res["builtin"], res["ratios"]["builtin"]
    assert ratio["r32"]["req_per_s"] == 1.0
    assert ratio["experts"]["req_per_s"] == round(got["experts"]["req_per_s"] / got["r32"]["req_per_s"], 3)
    assert "| x r32 |" in r.stdout
