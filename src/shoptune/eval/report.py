"""Markdown tables and per-track bar charts of evaluation results (one run or several)."""
from __future__ import annotations

from pathlib import Path

from shoptune._io import atomic_open
from shoptune.records import CAPABILITIES, TRACK_TO_CAPABILITY


NO_CI = "[no CI]"


def overall_label(capabilities) -> str:
    """What the mean of the tracks is: ``all-around`` only when all four tracks are there."""
    present = set(capabilities)
    caps = [c for c in CAPABILITIES if c in present]
    if len(caps) == len(CAPABILITIES):
        return "all-around"
    return (f"mean of {len(caps)} of {len(CAPABILITIES)} tracks ({', '.join(caps)}), "
            "not all-around")


def data_title(summary: dict) -> str:
    """``ShopBench`` when every task is one of ShopBench's; else the suite or the data files."""
    import re
    tasks = summary.get("tasks") or {}
    if tasks and all(re.fullmatch(r"(shopbench_)?task\d+", t) for t in tasks):
        return "ShopBench"
    if (summary.get("manifest") or {}).get("suite"):
        return f"suite {summary['manifest']['suite']}"
    from shoptune.tasks import find_card
    cards = {t: find_card(t) for t in tasks}
    if tasks and all(c is not None and c.own for c in cards.values()):  # a shop's own task cards
        return "own tasks (" + ", ".join(tasks) + ")"
    data = summary.get("data") or []
    names = [Path(str(d.get("path") if isinstance(d, dict) else d)).name
             for d in (data if isinstance(data, list) else [data])]
    return ", ".join(names) or "own data"


def _fmt(x, ci=None, *, no_ci: bool = False) -> str:
    """``0.182 [0.121, 0.246]``; ``no_ci``: say the interval could not be computed."""
    if x is None:
        return "-"
    return f"{x:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f" {NO_CI}" if no_ci else "")


def partial(summary: dict) -> bool:
    """Whether a run scored only part of its questions (``--limit`` / ``--limit-per-task``)."""
    return bool((summary.get("coverage") or {}).get("partial"))


def coverage_note(summary: dict) -> str | None:
    """One sentence on partial coverage (None for a complete run)."""
    cov = summary.get("coverage") or {}
    if not cov.get("partial"):
        return None
    how = (f"--limit-per-task {summary['limit_per_task']}" if summary.get("limit_per_task") else "") + \
          (" and " if summary.get("limit_per_task") and summary.get("limit") else "") + \
          (f"--limit {summary['limit']}" if summary.get("limit") else "")
    return (f"**Partial coverage**: {cov['questions']} of {cov['of']} questions"
            + (f" ({how})" if how else "") + "; scores marked * are not the full set's.")


def _single_note(summary: dict) -> str | None:
    single = (summary.get("bootstrap") or {}).get("single_question_tasks") or []
    if not single:
        return None
    return (f"{len(single)} of {len(summary['tasks'])} tasks have one question: resampling within "
            "a task cannot move it, so it adds no uncertainty; `[no CI]` where every task has one, "
            "and the other intervals they count in are too narrow.")


def report_markdown(summary: dict) -> str:
    ci = summary.get("ci95", {})
    n_boot = (summary.get("bootstrap") or {}).get("resamples", 1)
    star = "*" if partial(summary) else ""
    title = data_title(summary)
    lines = [(f"# ShopBench evaluation: {summary.get('model')}" if title == "ShopBench" else
              f"# Evaluation on {title}: {summary.get('model')}")
             + (f" + {summary['adapter']}" if summary.get("adapter") else ""), "",
             f"{summary['n_questions']} questions, protocol `{summary.get('protocol')}`, backend "
             f"`{summary.get('backend')}`; 95% bootstrap CIs in brackets.", ""]
    for note in (coverage_note(summary), _single_note(summary)):
        if note:
            lines += [note, ""]
    lines += ["| track | score |", "|---|---|"]
    for t, s in summary["tracks"].items():
        lines.append(f"| {TRACK_TO_CAPABILITY.get(t, t)} | {_fmt(s, ci.get('tracks', {}).get(t), no_ci=bool(n_boot))}{star} |")
    label = overall_label(summary.get("capabilities") or [TRACK_TO_CAPABILITY.get(t, t) for t in summary["tracks"]])
    label = "all-around (mean of tracks)" if label == "all-around" else label
    lines.append(f"| **{label}** | **{_fmt(summary['overall'], ci.get('overall'), no_ci=bool(n_boot))}{star}** |")
    lines.append(f"| mean over tasks | {_fmt(summary['overall_tasks'], ci.get('overall_tasks'), no_ci=bool(n_boot))}{star} |")
    more = any(v.get("metrics") for v in summary["tasks"].values())
    lines += ["", "| task | capability | metric | n | score |" + (" other metrics |" if more else ""),
              "|---|---|---|---|---|" + ("---|" if more else "")]
    for t, v in summary["tasks"].items():
        other = "; ".join(f"{m} {x:.3f}" for m, x in (v.get("metrics") or {}).items() if m != v["metric"])
        lines.append(f"| {t} | {v['capability']} | {v['metric']} | {v['n']} | "
                     f"{_fmt(v['score'], v.get('ci95'), no_ci=bool(n_boot))} |" + (f" {other} |" if more else ""))
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
    whole = overall_label(TRACK_TO_CAPABILITY.get(t, t) for t in tracks)
    labels = [TRACK_TO_CAPABILITY.get(t, t).replace("_", "\n") for t in tracks] + [
        "all-around" if whole == "all-around" else f"mean of\n{len(tracks)} track{'s' if len(tracks) != 1 else ''}"]
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(1.8 * len(labels) + 2, 4))
    missing = 0
    for k, (name, s) in enumerate(runs.items()):
        vals = [s["tracks"].get(t, float("nan")) for t in tracks] + [s["overall"]]  # absent: no bar
        cis = [s.get("ci95", {}).get("tracks", {}).get(t) for t in tracks] + [s.get("ci95", {}).get("overall")]
        pos = x + k * width - 0.4 + width / 2
        ax.bar(pos, vals, width, label=(Path(name).name or name) + (" (partial)" if partial(s) else ""))
        for xi, v, c in zip(pos, vals, cis):
            if v != v:
                continue
            if c and c[1] - c[0] > 1e-9:  # a whisker only where an interval exists and moved
                ax.errorbar(xi, v, yerr=[[v - c[0]], [c[1] - v]], color="black", capsize=3, lw=1)
            else:
                missing += 1
                ax.text(xi, v + 0.01, "no\nCI", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("score")
    ax.set_ylim(0, 1)
    names = sorted({data_title(s) for s in runs.values()})
    ax.set_title(f"{' / '.join(names)} score per track (95% bootstrap CI"
                 + ("; no CI: one question per task, or resamples never moved" if missing else "") + ")")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def compare(dirs: list[Path]) -> tuple[str, dict[str, dict]]:
    from shoptune.eval.runs import read_scores
    runs = {str(d): read_scores(d) for d in dirs}  # (checked: RunFolderError names the file)
    names = [(Path(d).name or str(d)) + (" *" if partial(s) else "") for d, s in runs.items()]
    tracks = list(dict.fromkeys(t for s in runs.values() for t in s["tracks"]))
    head = "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
    rows = [f"| {TRACK_TO_CAPABILITY.get(t, t)} | " + " | ".join(_fmt(s['tracks'].get(t)) for s in runs.values()) + " |"
            for t in tracks]
    label = overall_label(TRACK_TO_CAPABILITY.get(t, t) for t in tracks)
    rows.append(f"| **{label}** | " + " | ".join(_fmt(s["overall"]) for s in runs.values()) + " |")
    rows.append("| mean over tasks | " + " | ".join(_fmt(s["overall_tasks"]) for s in runs.values()) + " |")
    tasks = list(dict.fromkeys(t for s in runs.values() for t in s["tasks"]))
    rows += [f"| {t} | " + " | ".join(_fmt(s["tasks"].get(t, {}).get("score")) for s in runs.values()) + " |"
             for t in tasks]
    notes = [f"\n* {Path(d).name or d}: partial coverage, {s['coverage']['questions']} of "
             f"{s['coverage']['of']} questions (not the full set's scores)"
             for d, s in runs.items() if partial(s)]
    return head + "\n".join(rows) + "\n" + "".join(notes) + ("\n" if notes else ""), runs
