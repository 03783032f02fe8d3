"""Markdown tables and per-track bar charts of evaluation results (one run or several)."""
from __future__ import annotations

import json
from pathlib import Path

from shoptune._io import atomic_open
from shoptune.records import TRACK_TO_CAPABILITY


def _fmt(x, ci=None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def report_markdown(summary: dict) -> str:
    ci = summary.get("ci95", {})
    lines = [f"# ShopBench evaluation: {summary.get('model')}"
             + (f" + {summary['adapter']}" if summary.get("adapter") else ""), "",
             f"{summary['n_questions']} questions, protocol `{summary.get('protocol')}`, backend "
             f"`{summary.get('backend')}`; 95% bootstrap CIs in brackets.", "",
             "| track | score |", "|---|---|"]
    for t, s in summary["tracks"].items():
        lines.append(f"| {TRACK_TO_CAPABILITY.get(t, t)} | {_fmt(s, ci.get('tracks', {}).get(t))} |")
    lines.append(f"| **all-around (mean of tracks)** | **{_fmt(summary['overall'], ci.get('overall'))}** |")
    lines.append(f"| mean over tasks | {_fmt(summary['overall_tasks'], ci.get('overall_tasks'))} |")
    lines += ["", "| task | capability | metric | n | score |", "|---|---|---|---|---|"]
    for t, v in summary["tasks"].items():
        lines.append(f"| {t} | {v['capability']} | {v['metric']} | {v['n']} | {_fmt(v['score'], v.get('ci95'))} |")
    timing = summary.get("timing", {})
    if timing:
        lines += ["", f"Generation: {timing.get('generate_s')} s "
                      f"({timing.get('questions_per_s')} questions/s)."]
    return "\n".join(lines) + "\n"


def write_report(summary: dict, path: Path) -> None:
    with atomic_open(path) as fh:
        fh.write(report_markdown(summary))


def plot_tracks(runs: dict[str, dict], path: Path) -> None:
    """Grouped bars: one group per track (+ all-around), one bar per run, CI whiskers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tracks = list(dict.fromkeys(t for s in runs.values() for t in s["tracks"]))
    labels = [TRACK_TO_CAPABILITY.get(t, t).replace("_", "\n") for t in tracks] + ["all-around"]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 4))
    for k, (name, s) in enumerate(runs.items()):
        vals = [s["tracks"].get(t, float("nan")) for t in tracks] + [s["overall"]]  # absent: no bar
        cis = [s.get("ci95", {}).get("tracks", {}).get(t) for t in tracks] + [s.get("ci95", {}).get("overall")]
        err = np.array([[v - c[0] if c and v == v else 0 for v, c in zip(vals, cis)],
                        [c[1] - v if c and v == v else 0 for v, c in zip(vals, cis)]])
        ax.bar(x + k * width - 0.4 + width / 2, vals, width, yerr=err, capsize=3,
               label=Path(name).name or name)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    ax.set_title("ShopBench score per track (95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def compare(dirs: list[Path]) -> tuple[str, dict[str, dict]]:
    runs = {}
    for d in dirs:
        f = Path(d) / "scores.json"
        if not f.exists():
            raise FileNotFoundError(f"{f}: no scores.json (run `shoptune eval ... --out {d}` first)")
        runs[str(d)] = json.loads(f.read_text())
    names = [Path(d).name or str(d) for d in runs]
    tracks = list(dict.fromkeys(t for s in runs.values() for t in s["tracks"]))
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = [f"| {TRACK_TO_CAPABILITY.get(t, t)} | " + " | ".join(_fmt(s['tracks'].get(t)) for s in runs.values()) + " |"
            for t in tracks]
    rows.append("| **all-around** | " + " | ".join(_fmt(s["overall"]) for s in runs.values()) + " |")
    rows.append("| mean over tasks | " + " | ".join(_fmt(s["overall_tasks"]) for s in runs.values()) + " |")
    tasks = list(dict.fromkeys(t for s in runs.values() for t in s["tasks"]))
    rows += [f"| {t} | " + " | ".join(_fmt(s["tasks"].get(t, {}).get("score")) for s in runs.values()) + " |"
             for t in tasks]
    return head + "\n".join(rows) + "\n", runs
