"""#24 items 1-3: the README is the front door, the manual is a docs site that builds with no broken
link, the scoring rules and the license are in the repository, the demo's duration is stated
once, and the quick start's commands are commands the CLI takes."""
import re
import shlex
import subprocess
import sys
import time

import pytest
import typer
import yaml
from typer.testing import CliRunner

from shoptune.cli import app
from shoptune.demo import DURATION, QUICK_DURATION, QUICK_WHAT
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_mkdocs_site_builds_strict_and_fast(tmp_path):
    """`mkdocs build --strict`: a missing page or anchor is a warning, and strict fails on it."""
    t = time.monotonic()
    # (not -q: it hides the warnings that strict mode counts)
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "scoring" / "index.html").exists()
    assert time.monotonic() - t < 20


def test_mkdocs_strict_fails_on_a_broken_link(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n[gone](missing.md)\n")
    cfg = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    del cfg["nav"]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "missing.md" in r.stderr


def test_readme_is_the_front_door():
    lines = README.splitlines()
    assert len(lines) < 250
    for must in ("make demo", "make test", "## Quick start", "## Headline results", "/v1/chat/completions",
                 "/v1/tasks/", "docs/scoring.md", "LICENSE"):
        assert must in README, must
    assert "../shared/notes" not in README  # a clone has no such file
    for target in LINK.findall(README):  # every relative link points at a file in the repository
        if not target.startswith(("http://", "https://")):
            assert (REPO / target.split("#")[0]).exists(), target
    nav = yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]
    for page in (p for item in nav for p in item.values()):  # every page reachable from the README
        assert (REPO / "docs" / page).exists(), page
        assert page == "index.md" or f"docs/{page}" in README, page


def test_license_and_scoring_rules_are_in_the_repository():
    lic = (REPO / "LICENSE").read_text()
    assert "Apache License" in lic and "Version 2.0, January 2004" in lic and "END OF TERMS AND CONDITIONS" in lic
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text()
    scoring = (REPO / "docs" / "scoring.md").read_text()
    for rule in ("5,000 characters", "hit rate@3", "micro f1", "ndcg", "ja-mecab", "all-around", "IDCG"):
        assert rule.lower() in scoring.lower(), rule


def test_demo_duration_is_stated_once_and_the_cli_agrees():
    """One measured figure per mode (issue: "~10 min", "4.4 min of training", "2-minute" and
    "1-minute" for the same demo)."""
    assert re.fullmatch(r"~\d+(\.\d+)? (s|min)", DURATION) and re.fullmatch(r"~\d+(\.\d+)? (s|min)", QUICK_DURATION)
    res = CliRunner().invoke(app, ["demo", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    text = " ".join(res.output.replace("│", " ").split())
    assert f"{DURATION} on 2 CPU cores" in text and f"{QUICK_DURATION} on 2 CPU cores" in text
    assert f"It takes {DURATION} on 2 CPU cores" in " ".join(README.split())
    assert f"`shoptune demo --quick` ({QUICK_WHAT}) takes {QUICK_DURATION}" in " ".join(README.split())
    assert f"A quick version ({QUICK_WHAT})" in text
    for stale in ("~10 min", "2-minute", "1-minute", "4.4 min"):
        assert stale not in README and stale not in text, stale


def _quick_start_commands() -> list[list[str]]:
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    block = re.sub(r"\\\n\s*", " ", block)  # continuation lines
    cmds = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip().rstrip("&").strip()
        if line.startswith("shoptune "):
            cmds.append(shlex.split(line)[1:])
    return cmds


def _parse(cmd, args: list[str], parent=None):
    """Parse ``args`` as the CLI would, without running anything: unknown options, missing
    arguments and bad values raise click's errors (typer's own copy of click)."""
    ctx = cmd.make_context(cmd.name or "shoptune", list(args), parent=parent)
    if hasattr(cmd, "resolve_command"):  # a group: on to the sub-command
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        if rest:
            _, sub, rest = cmd.resolve_command(ctx, rest)
            return _parse(sub, rest, ctx)
    return ctx


def test_quick_start_commands_are_valid_commands():
    cmds = _quick_start_commands()
    assert [c[0] for c in cmds] == ["tasks", "eval", "train", "eval", "eval", "serve"]
    root = typer.main.get_command(app)
    for args in cmds:
        _parse(root, args)  # raises on anything the CLI would refuse
    for bad, says in ((["eval", "--suite", "tiny", "--no-such-option"], "No such option"),
                      (["train", "smoke", "--out"], "requires an argument"),
                      (["serve", "--prot", "8000"], "No such option")):
        with pytest.raises(Exception, match=says):  # (typer's copy of click's UsageError)
            _parse(root, bad)
    # every step states its measured time
    block = README.split("## Quick start", 1)[1].split("## Headline", 1)[0]
    assert len(re.findall(r"\b\d+(\.\d+)? s\b", block)) >= 8, block
