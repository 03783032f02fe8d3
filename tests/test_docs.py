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
    for page in (p for item in nav for p in item.values() if isinstance(p, str)):
        assert (REPO / "docs" / page).exists(), page  # every manual page reachable from the README
        assert page == "index.md" or f"docs/{page}" in README, page
    results = (REPO / "docs" / "results.md").read_text()
    for page in (p for item in nav for sub in item.values() if isinstance(sub, list)
                 for p in (x for entry in sub for x in entry.values())):
        assert (REPO / "docs" / page).exists(), page  # every results page from the results page
        assert page == "results.md" or f"({page})" in results, page


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


# --------------------------------------------------------------------------- README headline table
# #33 item 4: every number in the README's headline table comes from the JSON records its row
# links, and each record names its machine and command. Per row (found by the start of its
# first cell): the numbers of its result cell, in order, as computed from the records (settings
# such as "2 seeds", "4 mixed" or "r=32" are not numbers measured, so not checked), and numbers
# its label must state.

def _f(x, spec="{:.3f}"):
    return spec.format(x)


def _exp(recs, name):
    return recs[f"docs/results/experiments/{name}/results.json"]


def _vs(recs, name, cell, col="overall"):
    return _exp(recs, name)["cells"][cell]["vs_baseline"][col]


def _diff_ci(v):
    return [_f(v["diff"], "{:+.3f}"), _f(v["ci95"][0], "{:+.3f}"), _f(v["ci95"][1], "{:+.3f}")]


def _tracks(r, key):
    return [r["ratios"][e]["experts"][key] for e in ("builtin", "llama.cpp")]


_OWN_B = "runs/tuned-eval"  # (the compared run, as its record names it)


HEADLINE = {
    "base model, ShopBench dev": lambda r: ([], [_f(x) for x in (
        r["docs/results/base-dev-scores.json"]["overall"], *r["docs/results/base-dev-scores.json"]["ci95"]["overall"])]),
    "quality run v2": lambda r: (
        [_f(r["docs/results/quality-v2/run.json"]["wall_time_s"] / 60, "{:.1f}"),
         _f(r["docs/results/quality-v2/run.json"]["metrics"]["tokens_seen"] / 1e6, "{:.2f}")],
        [_f(r["docs/results/quality-v2/dev-paired.json"]["paired"]["runs/quality-v2/eval-dev-tuned"]["overall"][k])
         for k in ("a", "b")] + _diff_ci(r["docs/results/quality-v2/dev-paired.json"]["paired"]["runs/quality-v2/eval-dev-tuned"]["overall"])),
    "same, core suite": lambda r: ([], [_f(r["docs/results/quality-v2/suite-vs-base.json"]["paired"]["runs/quality-v2/suite"]["overall"][k])
                                        for k in ("a", "b")] + _diff_ci(r["docs/results/quality-v2/suite-vs-base.json"]["paired"]["runs/quality-v2/suite"]["overall"])),
    "one multi-task adapter": lambda r: ([], _diff_ci(_vs(r, "three_stage", "per-task"))),
    "training throughput vs the first recipe": lambda r: ([], [
        _f(r["docs/results/train_speed.json"]["speedup_vs_before"], "{:.2f}"),
        _f(r["docs/results/train_speed.amx.json"]["speedup_vs_before"], "{:.2f}")]),
    "your own tasks": lambda r: ([], [
        x for t in ("product_category", "product_attributes") for x in (
            _f(r["docs/results/own_tasks.compare.json"]["paired"][_OWN_B]["tasks"][t]["a"]),
            _f(r["docs/results/own_tasks.compare.json"]["paired"][_OWN_B]["tasks"][t]["b"]),
            *_diff_ci(r["docs/results/own_tasks.compare.json"]["paired"][_OWN_B]["tasks"][t]))]
        + [_f(r["docs/results/own_tasks.json"]["grammar"][a]["valid_as_written_rate"]) for a in ("grammar", "no_grammar")]),
    "dynamic batching": lambda r: ([], [_f(r["docs/results/serve_load.json"]["summary"][k], "{:.2f}") for k in
                                        ("throughput_ratio@16", "throughput_ratio@32", "mixed_vs_single_adapter")]),
    "llama.cpp behind shoptune's gateway": lambda r: ([], [
        _f(r["docs/results/serve_engines.repeats.json"]["summary"]["gateway_vs_llama_cpp.one_adapter"]),
        _f(r["docs/results/serve_engines.repeats.json"]["summary"]["gateway_vs_llama_cpp.four_adapters"]),
        str(r["docs/results/serve_engines.repeats.json"]["summary"]["errors"])]),
    "evaluation engines": lambda r: ([], [
        _f(r["docs/results/eval_engines.json"]["arms"][a]["pass_s"], "{:.0f}") for a in ("builtin/fp32", "llama.cpp/fp32", "vllm/fp32")]
        + [_f(max(abs(r["docs/results/eval_engines.json"]["arms"][a]["overall"] - r["docs/results/eval_engines.json"]["arms"]["builtin/fp32"]["overall"])
                  for a in ("llama.cpp/fp32", "vllm/fp32")), "{:.4f}")]),
    "more capacity than one r=32": lambda r: ([], [
        _f(_vs(r, "capacity", c)["diff"], "{:+.3f}") for c in ("diverse-r64", "diverse-poly", "diverse-percap", "diverse-percap-ties")]
        + [_f(max(_vs(r, "capacity", c)["ci95"][1] for c in ("diverse-r64", "diverse-poly", "diverse-percap", "diverse-percap-ties")), "{:+.3f}")]),
    "do experts use a diverse mixture": lambda r: ([], _diff_ci(_exp(r, "capacity")["contrasts"]["poly-gain-diverse-minus-narrow"]["overall"])),
    "experts for capabilities never trained": lambda r: ([], [
        _f(_vs(r, "capacity", "narrow-poly")["diff"], "{:+.3f}"),
        *_diff_ci(r["docs/results/expert_fallback.json"]["mean_vs_reference"]["overall"]),
        _f(r["docs/results/expert_fallback.json"]["mean_vs_own"]["capabilities"]["multilingual"]["diff"], "{:+.3f}")]),
    "loss balancing": lambda r: ([], [
        _f(_vs(r, "balancing", c)["diff"], "{:+.3f}") for c in ("equal", "uncertainty", "upgrad")]
        + [_f(max(_vs(r, "balancing", c)["ci95"][1] for c in ("equal", "uncertainty", "upgrad")), "{:+.3f}"),
           _f(_exp(r, "balancing")["cost"]["upgrad"]["tokens_per_s"] / _exp(r, "balancing")["cost"]["equal"]["tokens_per_s"], "{:.1f}")]),
    "serving 4 task-routed experts": lambda r: ([], [
        _f(r["docs/results/serve_experts.trained.json"]["ratios"]["builtin"]["experts"]["req_per_s"]),
        _f(min(_tracks(r["docs/results/serve_experts.trained.json"], "gen_tok_per_s")), "{:.2f}"),
        _f(max(_tracks(r["docs/results/serve_experts.trained.json"], "gen_tok_per_s")), "{:.2f}"),
        _f(min(r["docs/results/serve_experts.trained.json"]["ratios"][e]["merged_weights"]["req_per_s"] for e in ("builtin", "llama.cpp")), "{:.2f}"),
        _f(max(r["docs/results/serve_experts.trained.json"]["ratios"][e]["merged_weights"]["req_per_s"] for e in ("builtin", "llama.cpp")), "{:.2f}")]),
    "serving Poly's 27 per-task experts": lambda r: ([], [
        _f(x, "{:.2f}") for x in _tracks(r["docs/results/serve_experts.poly.json"], "req_per_s")]),
}
# a measured number: not a count that names what was compared ("2 seeds", "(4 mixed)", "r=32"),
# nor the 0 of "every CI includes 0"
NUMBER = re.compile(r"(?<![\w.=])(?<!includes )[+-]?\d+(?:\.\d+)?(?![\d.]|\s*(?:adapters?|mixed|seeds?|clients|questions|tasks|"
                    r"capabilities|per-task|task-routed)\b)")


def _headline_rows():
    table = README.split("## Headline results", 1)[1].split("\n\n")[2]
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]


def test_every_headline_number_comes_from_the_records_it_links_and_they_name_machine_and_command():
    import json
    rows = _headline_rows()
    assert len(rows) == len(HEADLINE), [r[0] for r in rows]
    for label, result, record in rows:
        key = next((k for k in HEADLINE if label.startswith(k)), None)
        assert key, f"headline row without a check: {label}"
        links = [x for x in LINK.findall(record) if x.endswith(".json")]
        assert links, f"{label}: links no JSON record"
        recs = {}
        for link in links:
            rec = json.loads((REPO / link).read_text(encoding="utf-8"))
            prov = rec.get("provenance") or {}
            assert rec.get("machine") or rec.get("machines") or prov.get("machine"), f"{link}: names no machine"
            assert rec.get("command") or rec.get("argv") or prov.get("command"), f"{link}: names no command"
            recs[link] = rec
        in_label, want = HEADLINE[key](recs)
        got = NUMBER.findall(result.replace("**", ""))
        assert got == want, f"{label}: the README says {got}, its records give {want}"
        for x in in_label:
            assert x in label, f"{label}: should state {x}"
