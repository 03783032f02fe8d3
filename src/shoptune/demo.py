"""`shoptune demo` / `make demo`: data -> mixture -> LoRA training -> base vs tuned evaluation.

Trains the embedded model on a small diverse EC-Guide mixture (configs/train/demo.yaml), then
evaluates base and tuned on the ShopBench development set and on held-out
EC-Guide test-split questions, prints the side-by-side table and writes runs/demo/compare.png.
"""
from __future__ import annotations

from pathlib import Path

from rich.console import Console

# The demo's wall time, measured end to end on 2 CPU cores: the one figure `shoptune demo --help`
# and the README state (tests/test_docs.py checks they agree). Re-measure when the demo changes.
DURATION = "~5 min"  # 282 s, Intel Xeon 2 cores, native bf16, 2026-12-06
QUICK_DURATION = "~6 min"  # 380 s, AMD EPYC 2 cores, native bf16, 2026-12-07, other jobs sharing the cores (docs/results/demo-quick/timing.json)
# What --quick scores: a sample of every task (all four tracks), never one track's questions
QUICK_WHAT = "10 steps; 2 questions of every dev task, 24 EC-Guide questions"

from shoptune import REPO_CONFIGS


def run_demo(console: Console, out: str = "runs/demo", quick: bool = False,
             config: str | Path | None = None, test_questions: int = 96) -> dict:
    from shoptune._io import write_jsonl
    from shoptune.eval.report import compare, plot_tracks
    from shoptune.eval.runner import evaluate
    from shoptune.tasks import all_cards
    from shoptune.train.config import load_config
    from shoptune.train.mixture import MixtureConfig, build_mixture
    from shoptune.train.recipe import main as train

    cards = all_cards()
    console.rule("shoptune demo")
    console.print(f"{len(cards)} task cards over {len({c.capability for c in cards.values()})} capabilities")
    overrides = [f"output_dir={out}"] + (["max_steps=10", "mixture.total=40"] if quick else [])
    from shoptune.configfile import resolve_config
    cfg = load_config(resolve_config(config, "train") if config else REPO_CONFIGS / "train" / "demo.yaml",
                      overrides)
    outp = Path(out)
    # a demo starts over in its own earlier folder (say so); a folder with anything else is refused
    from shoptune._io import check_output_dir, make_dirs, write_marker
    check_output_dir(outp, command="demo", overwrite=True, legacy=demo_entries)
    gone = clear_demo(outp)
    if gone:
        console.print(f"{outp}: replacing the earlier demo run ({', '.join(gone[:4])})", highlight=False)
    write_marker(make_dirs(outp), "demo", files=[])  # (its files: demo_entries)
    # held-out EC-Guide questions of the same tasks (the deterministic test split)
    test_cfg = MixtureConfig(**{**cfg.mixture.model_dump(), "split": "test",
                                "total": 24 if quick else test_questions, "decontaminate_against": []})
    test_recs, _ = build_mixture(test_cfg)
    write_jsonl(outp / "ecguide-test.jsonl", (r.to_dict() for r in test_recs))
    console.rule(f"training ({cfg.max_steps} steps, mixture of {cfg.mixture.total} rows)")
    res = train(cfg)
    adapter = res["adapter"]
    runs = []
    for name, data in (("dev", "shopbench-dev/development.json"),
                       ("ecguide-test", str(outp / "ecguide-test.jsonl"))):
        for who, ad in (("base", None), ("tuned", adapter)):
            console.rule(f"evaluating {who} on {name}")
            d = outp / f"eval-{name}-{who}"
            # --quick: the first 2 questions of every task (all four tracks), not the first N
            # questions, which are one task's
            evaluate(model=cfg.model, adapter=ad, data=[data], out=d,
                     limit_per_task=2 if quick and name == "dev" else None, overwrite=True)
            runs.append(d)
    table, summaries = compare(runs)
    from shoptune.console import print_markdown
    print_markdown(table)  # (a terminal: a table fitted to its width)
    plot_tracks(summaries, outp / "compare.png")
    scores = {Path(k).name: v["overall"] for k, v in summaries.items()}
    for base, tuned in zip(runs[::2], runs[1::2]):  # tuned - base on the same questions, paired
        console.print(paired_line(base, tuned), markup=False, highlight=False)
    console.print(f"plot: {outp / 'compare.png'} (per-run 95% CIs; the paired CIs above are the "
                  "ones that say whether tuning changed the score)", highlight=False)
    return scores


DEMO_FILES = ("ecguide-test.jsonl", "compare.png")


def demo_entries(out: Path) -> list[str]:
    """The names a demo run writes in its folder: a training run's, its test questions, its
    evaluations and the plot."""
    from shoptune.train.recipe import run_entries
    return run_entries(out) + [n for n in DEMO_FILES if (out / n).exists()] + \
        [p.name for p in Path(out).glob("eval-*")]


def clear_demo(out: Path) -> list[str]:
    """Remove an earlier demo's files from ``out`` (only :func:`demo_entries`); what was removed."""
    import shutil
    gone = demo_entries(out) if Path(out).is_dir() else []
    for name in gone:
        p = Path(out) / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return gone


def paired_line(base: Path, tuned: Path) -> str:
    """``dev: all-around 0.203 -> 0.126, paired diff -0.077 [-0.160, +0.004]: within noise``."""
    from shoptune.eval.paired import paired_compare, verdict
    from shoptune.eval.report import overall_label
    from shoptune.eval.runs import read_predictions

    rows = [read_predictions(d) for d in (base, tuned)]
    res = paired_compare([rows[0]], [rows[1]], n_boot=2000, n_perm=2000)
    v = res["overall"]
    ci = v["ci95"]
    shown = (f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else
             "[no CI: resampling within tasks cannot move it]")
    name = Path(base).name.removeprefix("eval-").removesuffix("-base")
    return (f"{name}: {overall_label(res['capabilities'])} {v['a']:.3f} -> {v['b']:.3f}, paired diff {v['diff']:+.3f} "
            f"{shown} (95%, {len(rows[0])} questions): {verdict(v)}")
