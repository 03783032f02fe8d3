"""``shoptune data synth`` and ``shoptune data derive {ranking,mcq}`` (registered on the
``data`` group by :func:`register`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer

from shoptune.console import console
from shoptune.console import fail as _fail


def _issues_line(e) -> str:
    """A DataValidationError as one line: its first ``path:LINE: field: reason`` and a count."""
    more = len(e.issues) - 1
    return str(e.issues[0]) + (f" (and {more} more data error(s))" if more > 0 else "")


def _load(paths, *, task=None):
    from shoptune.data.loaders import DataValidationError, load_records
    try:
        return load_records(paths, task=task)
    except DataValidationError as e:
        _fail(_issues_line(e))
    except (FileNotFoundError, KeyError) as e:
        _fail(str(e).strip("'\""))


def _api_key(env: str, url: str) -> str:
    """The key in ``$env``. Unset: "EMPTY" for a server on loopback (`shoptune serve`, a local
    vLLM need none), else a one-line error (a hosted API would answer 401 after the pool is
    scored)."""
    from urllib.parse import urlparse

    key = os.environ.get(env)
    if key:
        return key
    if (urlparse(url).hostname or "") in ("127.0.0.1", "localhost", "::1"):
        return "EMPTY"
    _fail(f"--api-key-env {env}: the variable is not set (the key for {url}); export it, or "
          f"name the variable holding the key")


OverwriteFile = Annotated[bool, typer.Option(help="Replace output files that exist (never an input).")]


def _check_outs(out: Path, inputs, overwrite: bool) -> None:
    """OUT and its report (FILE.report.json) may be written (before the work; see check_new_file)."""
    from shoptune._io import check_new_file, existing_inputs
    found = existing_inputs(inputs)
    check_new_file(out, inputs=found, overwrite=overwrite)
    check_new_file(out.with_suffix(".report.json"), inputs=found, overwrite=overwrite)


def _write_derived(rows, rep: dict, out: Path, against, ignore=frozenset()) -> tuple[list, list[dict]]:
    """Decontaminate derived rows against ``against`` (``ignore``: n-grams of the rows' fixed
    wording), write them and their report."""
    from shoptune._io import write_json, write_jsonl

    rows, removed = _decontaminate(rows, [a for a in (against or []) if a != "none"], ignore)
    if not rows:
        _fail(f"all {len(removed)} derived rows overlap the evaluation sets "
              f"({', '.join(against or [])}); nothing written to {out}" if removed else
              f"no rows derived; nothing written to {out}")
    rep["decontaminated"] = len(removed)
    rep["decontaminated_against"] = [a for a in (against or []) if a != "none"]
    write_jsonl(out, (r.to_dict() for r in rows))
    write_json(out.with_suffix(".report.json"), rep)
    return rows, removed


def _write_card(cards_dir: Path, name: str, *, capability, task_type, metric, description,
                file, like=None) -> Path | None:
    """A card for a derived/synthesized task unless one is registered (``like``: an own task's
    card it copies); returns its path."""
    from shoptune._io import atomic_open
    from shoptune.data.derive import card_yaml
    from shoptune.tasks import all_cards

    if name in all_cards():
        return None
    path = cards_dir / f"{name}.yaml"
    text = card_yaml(name, capability=capability, task_type=task_type, metric=metric,
                     description=description, file=file, like=like)
    if path.exists() or path.is_symlink():  # (someone's card, or an edited one: kept as it is)
        if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
            console.print(f"[yellow]kept[/] {path}: it exists and differs from the card this run would "
                          f"write; the rows carry their task and capability anyway", highlight=False)
        return path
    with atomic_open(path) as fh:
        fh.write(text)
    return path


def _card_hint(path: Path | None) -> None:
    if path:
        console.print(f"task card -> {path} (add [bold]SHOPTUNE_TASKS_PATH={path.parent}[/] so "
                      f"`data mix`, `tasks ls` and suites use it; rows also carry their task and "
                      f"capability)")


def register(data_app: typer.Typer) -> None:
    derive_app = typer.Typer(help="Derived task formats from labelled data you already have.",
                             no_args_is_help=True)
    data_app.add_typer(derive_app, name="derive")

    @data_app.command("synth")
    def data_synth(
            spec_path: Annotated[Path, typer.Argument(metavar="SPEC.yaml", help="Synthesis spec.")],
            out: Annotated[Path, typer.Option(help="Kept rows (.jsonl, appended; rerun to resume).")],
            teacher_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL "
                                                     "(…/v1): hosted, vLLM, `shoptune serve`.")] = "https://api.openai.com/v1",
            teacher_model: Annotated[str, typer.Option(help="Model name the teacher serves.")] = "gpt-4o",
            api_key_env: Annotated[str, typer.Option(help="Environment variable holding the key.")] = "OPENAI_API_KEY",
            rows: Annotated[Optional[int], typer.Option(help="Override the spec's rows.")] = None,
            concurrency: Annotated[Optional[int], typer.Option(help="Requests in flight.")] = None,
            max_requests: Annotated[Optional[int], typer.Option(help="Budget: HTTP requests.")] = None,
            max_total_tokens: Annotated[Optional[int], typer.Option(help="Budget: tokens.")] = None,
            steering_check: Annotated[bool, typer.Option(help="Score the student on the rows made "
                                                         "(hard vs easy).")] = True,
            quiet: Annotated[bool, typer.Option(help="No progress bar (the summary lines are still printed).")] = False) -> None:
        """Ask a teacher LLM for new rows of a task, steered by the examples shown; validate,
        de-duplicate, decontaminate; FILE.rejected.jsonl, FILE.report.json."""
        over = {k: v for k, v in dict(rows=rows, concurrency=concurrency, max_requests=max_requests,
                                      max_total_tokens=max_total_tokens).items() if v is not None}
        _synth(spec_path, over, out, teacher_url=teacher_url, teacher_model=teacher_model,
               api_key_env=api_key_env, quiet=quiet, steering_check=steering_check)

    @derive_app.command("ranking")
    def derive_ranking_cmd(
            paths: Annotated[Optional[list[str]], typer.Argument(help="Query-product judgement "
                                                                 "files (default: EC-Guide QPRP + QPRJ).")] = None,
            out: Annotated[Path, typer.Option(help="Ranking questions (.jsonl).")] = Path("runs/derive/qpr_ranking.jsonl"),
            fill: Annotated[int, typer.Option(help="At most this many candidates per question may be "
                                              "products of other queries (taken as irrelevant); 0 = judged only.")] = 3,
            seed: Annotated[int, typer.Option(help="Seed of the candidates' order and of the fillers "
                                              "drawn.")] = 0,
            against: Annotated[list[str], typer.Option(
                help="Drop questions overlapping these evaluation sets (FILE or suite:NAME; "
                     "repeatable; 'none': no check).")] = ["shopbench-dev"],
            target: Annotated[Optional[int], typer.Option(
                help="Questions wanted: the ones the data does not support are synthesized by the "
                     "teacher (--synth-spec, the derived questions as the pool) into OUT.synth.jsonl.")] = None,
            synth_spec: Annotated[Optional[Path], typer.Option(
                help="Spec for --target (default configs/synth/qpr_ranking.yaml).")] = None,
            teacher_url: Annotated[str, typer.Option(help="For --target: OpenAI-compatible base URL.")] = "https://api.openai.com/v1",
            teacher_model: Annotated[str, typer.Option(help="For --target: the teacher model.")] = "gpt-4o",
            api_key_env: Annotated[str, typer.Option(help="For --target: variable with the key.")] = "OPENAI_API_KEY",
            quiet: Annotated[bool, typer.Option(help="No progress bar (the summary lines are still printed).")] = False,
            overwrite: OverwriteFile = False) -> None:
        """ShopBench-layout ranking questions (query, 5 candidates, NDCG) from query-product
        judgements; says how many questions the data supports (--target: the teacher makes the
        rest)."""
        from shoptune.data.derive import derive_ranking, ranking_boilerplate

        paths = paths or ["ec-guide/MCQ/QPRP.json", "ec-guide/MCQ/QPRJ.json"]
        _check_outs(out, [*paths, *(a for a in against if a != "none" and not a.startswith("suite:"))], overwrite)
        recs = _load(paths)
        try:
            rows, rep = derive_ranking(recs, fill=fill, seed=seed)
        except ValueError as e:
            _fail(str(e))
        rows, removed = _write_derived(rows, rep, out, against, ranking_boilerplate())
        s = rep["supported"]
        console.print(f"{rep['judgements']} judgements over {rep['queries']} queries support "
                      f"{s['max_0_fillers']} question(s) with all 5 candidates judged, "
                      + ", ".join(f"{s[f'max_{k}_fillers']} with <= {k} fillers" for k in range(1, 5)))
        console.print(f"wrote {len(rows)} questions (<= {fill} fillers"
                      + (f", {len(removed)} dropped as contaminated" if removed else "")
                      + f") -> {out}; report -> {out.with_suffix('.report.json')}")
        if target is None:
            console.print(f"to have more than {len(rows)} questions: --target N (a teacher writes "
                          f"the rest), or `shoptune data synth configs/synth/qpr_ranking.yaml` "
                          f"(this file as the pool)")
            return
        if target <= len(rows):
            console.print(f"--target {target}: the data supports {len(rows)}, nothing to synthesize")
            return
        synth_out = out.with_name(out.stem + ".synth.jsonl")
        console.print(f"the data supports {len(rows)} of {target}: synthesizing "
                      f"{target - len(rows)} -> {synth_out}")
        from shoptune import REPO_CONFIGS
        _synth(synth_spec or REPO_CONFIGS / "synth" / "qpr_ranking.yaml",
               {"pool": [str(out)], "rows": target - len(rows)}, synth_out,
               teacher_url=teacher_url, teacher_model=teacher_model, api_key_env=api_key_env,
               quiet=quiet, steering_check=True)

    @derive_app.command("mcq")
    def derive_mcq_cmd(
            paths: Annotated[list[str], typer.Argument(help="Generation rows, or an own label "
                                                       "task's rows (files/folders, or the task's name).")],
            out: Annotated[Path, typer.Option(help="Multiple-choice rows (.jsonl).")],
            include_task: Annotated[Optional[list[str]], typer.Option(
                help="Only rows of this task (repeatable; a card's name, as a mixture's "
                     "include_tasks).")] = None,
            task_old: Annotated[Optional[list[str]], typer.Option(
                "--task", hidden=True, help="The former name of --include-task (elsewhere --task "
                                            "tags your own rows with a card).")] = None,
            options: Annotated[int, typer.Option(help="Options per question (2-10).")] = 4,
            difficulty: Annotated[Literal["hard", "easy"], typer.Option(
                help="hard: the nearest answers (labels) in embedding space; easy: random ones.")] = "hard",
            max_similarity: Annotated[float, typer.Option(help="Skip distractors at least this "
                                                          "similar to the gold (they may be right too).")] = 0.9,
            limit_per_task: Annotated[Optional[int], typer.Option(
                min=1, help="At most this many rows of each task, as `shoptune eval "
                            "--limit-per-task`.")] = None,
            limit_old: Annotated[Optional[int], typer.Option(
                "--limit", min=1, hidden=True, help="The former name of --limit-per-task.")] = None,
            seed: Annotated[int, typer.Option(help="Seed of the rows --limit-per-task keeps, the easy "
                                              "distractors and the gold answer's position.")] = 0,
            against: Annotated[Optional[list[str]], typer.Option(
                help="Drop rows overlapping these evaluation sets (FILE or suite:NAME).")] = None,
            overwrite: OverwriteFile = False) -> None:
        """Multiple-choice versions of generation rows (distractors: other rows' answers of the
        same task) and of a label task's rows (distractors: other labels of its card); near in
        embedding space = hard, random = easy."""
        from collections import Counter

        from shoptune.data.derive import derive_mcq
        from shoptune.tasks import card_name

        _check_outs(out, [*paths, *(a for a in against or [] if not a.startswith("suite:"))], overwrite)
        recs = _load(paths)
        only = {card_name(t) for t in [*(include_task or []), *(task_old or [])]}
        if only:
            recs = [r for r in recs if r.task in only]
        try:
            rows, rep = derive_mcq(recs, options=options, difficulty=difficulty, max_similarity=max_similarity,
                                   seed=seed, limit=limit_per_task or limit_old)
        except ValueError as e:
            _fail(str(e))
        rows, removed = _write_derived(rows, rep, out, against)
        console.print(f"wrote {len(rows)} multiple-choice rows ({difficulty}, {options} options; "
                      f"mean distractor similarity {rep['distractor_similarity_mean']}) -> {out}")
        console.print(f"gold positions: {rep['gold_positions']}")
        for name, n in Counter(r.task for r in rows).items():
            src = next(r for r in rows if r.task == name)
            origin = src.extra["derived"]["from_task"]
            what = ("other labels of its card" if src.extra["derived"].get("distractors") == "labels"
                    else "other rows' answers")
            _card_hint(_write_card(out.parent / "cards", name, capability=src.capability,
                                   task_type="multiple-choice", metric="accuracy",
                                   description=f"Multiple-choice version of {origin} "
                                               f"(distractors: {what}, {difficulty}).",
                                   file=str(out)))


def _synth(spec_path: Path, over: dict, out: Path, *, teacher_url: str, teacher_model: str,
           api_key_env: str, quiet: bool, steering_check: bool) -> dict:
    """Run a synthesis spec (with overrides), print the summary, write the output's card."""
    from shoptune._io import check_out_file
    from shoptune.data.loaders import DataValidationError
    from shoptune.data.synth import SynthError, SynthSpec, run_synth, side_paths
    from shoptune.data.teacher import LogError, TeacherError
    from shoptune.tasks import get_card

    from shoptune.configfile import resolve_config
    spec_path = resolve_config(spec_path, "synth")  # (not found: one line, from the CLI's handler)
    try:
        check_out_file(out)
        spec = SynthSpec.from_yaml(spec_path, over)
        _check_synth_out(out, spec, spec_path)
        key = _api_key(api_key_env, teacher_url)
        rep = run_synth(spec, out, teacher_url=teacher_url, teacher_model=teacher_model,
                        api_key=key, quiet=quiet, check_steering=steering_check, console=console)
    except (SynthError, TeacherError, LogError) as e:
        _fail(str(e))
    except DataValidationError as e:
        _fail(_issues_line(e))
    except (FileNotFoundError, KeyError) as e:
        _fail(str(e).strip("'\""))
    console.print(f"kept {rep['kept']} of {rep['rows_wanted']} -> {out}; rejected "
                  f"{rep['rejected']} -> {side_paths(out)['rejected']}; requests "
                  f"{rep['requests']['total']} ({rep['requests']['this_session']} this run, "
                  f"{rep['requests']['cache_hits']} answers from the cache), {rep['wall_s']} s")
    for reason, n in rep["rejected_by_reason"].items():
        console.print(f"  {reason}: {n}", highlight=False)
    if rep["steering"].get("difficulty"):
        console.print(f"steering (student score by difficulty): {rep['steering']['difficulty']}")
    console.print(f"report -> {side_paths(out)['report']}")
    card = get_card(spec.task)
    if rep["kept"] and rep["output_task"] == card.name:  # an own task's rows: more of the task
        console.print(f"rows of task {card.name}: read through its card {card.path}", highlight=False)
    elif rep["kept"]:  # (a card for rows that exist)
        _card_hint(_write_card(out.parent / "cards", rep["output_task"], capability=card.capability,
                               task_type=card.task_type, metric=card.metric,
                               description=f"Synthesized by a teacher LLM from {card.name} examples.",
                               file=str(out.resolve()) if card.own else str(out), like=card))
    if rep["stopped"]:
        if "budget" in rep["stopped"]:  # the budget counts every request made for OUT, resumes too
            hint = ("the budget covers every request made for this output, resumes included: "
                    "raise --max-requests / --max-total-tokens (or the spec's max_requests / "
                    "max_total_tokens) and run again to continue")
        else:
            hint = "run the same command to continue"
        if rep["requests"]["failed_jobs"]:  # the teacher kept failing (or is unreachable)
            _fail(f"{rep['stopped']}; run the same command to continue")
        console.print(f"[yellow]stopped[/]: {rep['stopped']} ({hint})", highlight=False)
    return rep


def _check_synth_out(out: Path, spec, spec_path: Path) -> None:
    """``data synth --out FILE`` appends (a rerun resumes): FILE is new, or an earlier synth's
    output (its FILE.cache.jsonl is there); never the spec, a pool file or someone else's file."""
    from shoptune._io import OutputError, check_not_input, existing_inputs
    from shoptune.data.synth import side_paths
    check_not_input(out, existing_inputs([spec_path], spec.pool))
    if (out.exists() or out.is_symlink()) and not side_paths(out)["cache"].is_file():
        raise OutputError(f"--out {out}: exists and is not the output of an earlier `shoptune data synth` "
                          f"(no {side_paths(out)['cache'].name} beside it); choose a new file name")


def _decontaminate(rows, against, ignore=frozenset()):
    if not against:
        return rows, []
    from shoptune.data.dedup import decontaminate
    from shoptune.eval.suite import load_eval_set
    from shoptune.data.loaders import DataValidationError
    try:
        evals = {a: load_eval_set(a) if a.startswith("suite:") else _load([a]) for a in against}
    except DataValidationError as e:
        _fail(_issues_line(e))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    return decontaminate(rows, evals, ignore_ngrams=set(ignore))

