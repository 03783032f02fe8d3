"""`.ci/run` fails under CI=true when a real engine is missing (#33 item 6): a failed llama-server
build or vLLM install (stubbed here through SHOPTUNE_CI_MAKE, so no 12-minute build runs), or a
test marked real_engine that skips; it prints the skip count either way."""
import json
import os
import subprocess

import pytest

from tests.conftest import REPO

FAKE_MAKE = r"""#!/usr/bin/env bash
echo "make $*" >> "$FAKE_LOG"
target=""
for a in "$@"; do case "$a" in -s|*=*) ;; *) target="$a"; break;; esac; done
case " $FAKE_FAIL " in *" $target "*) echo "fake make: $target failed"; exit 2;; esac
case "$target" in
  llama-server-path) echo "$FAKE_ROOT/llama-server" ;;
  llama-cpp-source-path) echo "$FAKE_ROOT/src" ;;
  vllm-python-path) echo "$FAKE_ROOT/python" ;;
  test) printf '%s\n' "$FAKE_SKIPS" > "$SHOPTUNE_SKIP_REPORT"; echo "fake pytest: 5 passed, 2 skipped"
        exit "${FAKE_TEST_STATUS:-0}" ;;
esac
exit 0
"""


def _ci_run(tmp_path, *, ci: bool, fail: str = "", test_status: int = 0, real_skipped=()):
    make = tmp_path / "make"
    make.write_text(FAKE_MAKE)
    make.chmod(0o755)
    (tmp_path / "src").mkdir(exist_ok=True)
    if "llama-server" not in fail:
        (tmp_path / "src" / "convert_hf_to_gguf.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update({"SHOPTUNE_CI_MAKE": str(make), "SHOPTUNE_CI_CACHE": str(tmp_path / "cache"),
                "FAKE_LOG": str(tmp_path / "make.log"), "FAKE_ROOT": str(tmp_path), "FAKE_FAIL": fail,
                "FAKE_TEST_STATUS": str(test_status),
                "FAKE_SKIPS": json.dumps({"skipped": 2, "real_engine_skipped": list(real_skipped)})})
    if ci:
        env["CI"] = "true"
    r = subprocess.run([str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=120)
    return r, (tmp_path / "make.log").read_text()


@pytest.mark.parametrize("fail, why", [("llama-server", "the llama-server build failed"),
                                       ("vllm", "the vLLM install failed")])
def test_ci_run_fails_under_ci_when_an_engine_build_fails(tmp_path, fail, why):
    r, calls = _ci_run(tmp_path, ci=True, fail=fail)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"CI=true: {why}" in r.stderr
    assert "make test" in calls  # the tests still ran: their results are shown
    assert "skipped tests: 2 (real-engine: 0)" in r.stdout


def test_ci_run_passes_without_ci_or_with_every_engine_and_prints_the_skip_count(tmp_path):
    r, _ = _ci_run(tmp_path, ci=False, fail="llama-server vllm")  # a laptop: the tests only skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "llama-server unavailable" in r.stdout and "skipped tests: 2 (real-engine: 0)" in r.stdout
    r, _ = _ci_run(tmp_path, ci=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # a real-engine test that skipped fails pytest under CI=true (tests/ci_skips.py, below):
    # .ci/run passes that status on and says how many
    r, _ = _ci_run(tmp_path, ci=True, test_status=1, real_skipped=["tests/serve/test_vllm.py::t"])
    assert r.returncode == 1 and "skipped tests: 2 (real-engine: 1)" in r.stdout


PLUGIN_TESTS = """
import pytest

@pytest.mark.real_engine
def test_needs_llama_server():
    pytest.skip("no llama-server binary")

def test_other():
    pytest.skip("not this machine")

def test_fine():
    pass
"""


@pytest.mark.parametrize("ci, status", [(True, 1), (False, 0)])
def test_a_skipped_real_engine_test_fails_the_run_under_ci(pytester, monkeypatch, ci, status):
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    report = pytester.path / "skips.json"
    monkeypatch.setenv("SHOPTUNE_SKIP_REPORT", str(report))
    pytester.makeconftest("from tests.ci_skips import (pytest_runtest_logreport, pytest_sessionfinish,\n"
                          "                             pytest_terminal_summary)\n")
    pytester.makeini("[pytest]\nmarkers =\n    real_engine: needs a built engine\n")
    pytester.makepyfile(PLUGIN_TESTS)
    from tests import ci_skips
    monkeypatch.setattr(ci_skips, "_SKIPPED", {"all": [], "real_engine": []})
    res = pytester.runpytest()
    assert res.ret == status
    res.stdout.fnmatch_lines(["skipped: 2 (real-engine: 1)"])
    got = json.loads(report.read_text())
    assert got["skipped"] == 2 and [x.split("::")[-1] for x in got["real_engine_skipped"]] == ["test_needs_llama_server"]
