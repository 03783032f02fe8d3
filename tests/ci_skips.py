"""Real engines may not vanish silently (#33 item 6). Tests that need a built llama.cpp (its
source or ``llama-server``) or vLLM carry ``@pytest.mark.real_engine``; they skip when the build
is missing, which is fine on a laptop. Under ``CI=true`` such a skip fails the run. Every run
ends with the skip count (and writes it to ``$SHOPTUNE_SKIP_REPORT`` as JSON, which ``.ci/run``
prints). The hooks are imported by tests/conftest.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

_SKIPPED: dict[str, list[str]] = {"all": [], "real_engine": []}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_runtest_logreport(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED["all"].append(report.nodeid)
        if "real_engine" in report.keywords:
            _SKIPPED["real_engine"].append(report.nodeid)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _ci() and _SKIPPED["real_engine"] and exitstatus == 0:
        session.exitstatus = 1
    path = os.environ.get("SHOPTUNE_SKIP_REPORT")
    if path:
        Path(path).write_text(json.dumps({"skipped": len(_SKIPPED["all"]),
                                          "real_engine_skipped": _SKIPPED["real_engine"]}) + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    real = _SKIPPED["real_engine"]
    terminalreporter.write_line(f"skipped: {len(_SKIPPED['all'])} (real-engine: {len(real)})")
    if real and _ci():
        terminalreporter.write_line("CI=true: real-engine tests skipped (is llama.cpp or vLLM built?), "
                                    "so the run fails: " + ", ".join(real), red=True)
