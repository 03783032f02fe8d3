"""`data synth` against real loopback OpenAI-compatible servers: a scripted one (FastAPI +
uvicorn, counting requests) and, once, `shoptune serve` itself."""
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shoptune.cli import app
from shoptune.data.loaders import load_records
from shoptune.data.synth import SynthSpec, check_row, language_of, parse_generated, run_synth, side_paths
from shoptune.records import Record
from tests.data.scripted_teacher import ScriptedServer, prompt_of

WORDS = ("anchor bamboo candle denim easel falcon garnet harbor indigo jasmine kettle lantern "
         "marble nectar oyster pepper quartz ribbon saddle timber umbra velvet walnut xenon yarrow "
         "zephyr amber basil cobalt dahlia ember fennel ginger hazel iris juniper kelp lilac mango").split()
EVAL_Q = ("Given the query 'waterproof hiking boots for men with extra wide toe box and ankle "
          "support', which of the following product best exact it?\n0. Boot A\n1. Boot B\n"
          "2. Sandal C\n3. Slipper D\nAnswer: ")


def question(seed: str, gold: int, hard: bool) -> str:
    rng = random.Random(seed)
    name = " ".join(rng.sample(WORDS, 4))
    opts = "\n".join(f"{i}. {' '.join(rng.sample(WORDS, 5))} {seed}-{i}" for i in range(4))
    return (f"Given the query '{name}' [g={gold}]{' HARD' if hard else ''}, which of the following "
            f"product best exact it?\n{opts}\nAnswer: ")


def pool_rows():
    return [{"input_field": question(f"pool{i}", i % 4, hard=i % 2 == 1), "output_field": i % 4,
             "task_type": "multiple-choice", "metric": "accuracy", "task": "ecguide_qprp"}
            for i in range(12)]


def write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def example(q: str, a) -> str:
    return f"<example>\n<question>\n{q}\n</question>\n<answer>\n{a}\n</answer>\n</example>"


def good_reply(prompt: str) -> str:
    """A new, valid row in the style of the shown examples (HARD when they all are)."""
    shown = re.findall(r"<question>\n(.*?)\n</question>", prompt, re.DOTALL)
    hard = all("HARD" in q for q in shown)
    h = hashlib.sha256(prompt.encode()).hexdigest()
    gold = int(h[0], 16) % 4
    return example(question(f"new{h[:8]}", gold, hard), gold)


def student(body):
    """The student answers from the [g=N] tag, wrongly when the question says HARD."""
    q = body["prompt"]
    g = int(re.findall(r"\[g=(\d)\]", q)[-1])
    return 200, str((g + 1) % 4 if "HARD" in q else g)


@pytest.fixture()
def files(tmp_path):
    pool = write(tmp_path / "pool.jsonl", pool_rows())
    evals = write(tmp_path / "eval.jsonl", [{"input_field": EVAL_Q, "output_field": 0,
                                             "task_type": "multiple-choice", "metric": "accuracy",
                                             "task": "ecguide_qprp"}])
    return {"pool": pool, "eval": evals, "dir": tmp_path}


def spec_for(files, server, **kw) -> SynthSpec:
    base = dict(task="ecguide_qprp", pool=[str(files["pool"])], rows=6, shots=2, concurrency=2,
                decontaminate_against=[str(files["eval"])], dedup_threshold=0.7, backoff_s=0.01,
                max_tokens=64, seed=0)
    return SynthSpec(**{**base, **kw})


def test_synth_validates_dedups_decontaminates_and_steers(files):
    pool = pool_rows()
    script = ["format", "out_of_range", "pool_copy", "near_copy", "eval_copy"]
    seen: dict[str, str] = {}
    lock = threading.Lock()

    def reply(body):
        if "prompt" in body:
            return student(body)
        p = prompt_of(body)
        with lock:  # the first 5 distinct prompts get one defect each, in arrival order
            kind = seen.setdefault(p, script[len(seen)] if len(seen) < len(script) else "good")
        if kind == "format":
            return 200, "Sure! Here is a new question about shoes."
        if kind == "out_of_range":
            return 200, example(question("bad", 0, False), 7)
        if kind == "pool_copy":
            return 200, example(pool[0]["input_field"].rstrip(), pool[0]["output_field"])
        if kind == "near_copy":
            return 200, example(pool[2]["input_field"].replace("best exact", "best match"), 2)
        if kind == "eval_copy":
            return 200, example(EVAL_Q.rstrip(), 0)
        return 200, good_reply(p)

    srv = ScriptedServer(reply)
    try:
        spec = spec_for(files, srv, characteristics={"difficulty": {"hard": 1, "easy": 1}},
                        student={"model": "student", "backend": "openai", "base_url": srv.url})
        out = files["dir"] / "synth" / "qprp.jsonl"
        rep = run_synth(spec, out, teacher_url=srv.url, teacher_model="teacher", api_key="k",
                        quiet=True)
    finally:
        srv.stop()
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    rejected = [json.loads(x) for x in side_paths(out)["rejected"].read_text().splitlines()]
    assert len(kept) == 6 and rep["kept"] == 6
    assert sorted(r["reason"] for r in rejected) == sorted(
        ["format", "invalid:output_field", "duplicate-exact", "duplicate-near", "contaminated-exact"])
    assert next(r for r in rejected if r["reason"] == "invalid:output_field")["detail"].startswith(
        "option index 7 out of range")
    assert next(r for r in rejected if r["reason"] == "duplicate-exact")["of"].startswith("pool:")
    # every request was decided exactly once (no retries, no repeats)
    chat = srv.chat_requests()
    assert len(chat) == len(kept) + len(rejected) == rep["requests"]["total"]
    assert len({r["key"] for r in chat}) == len(chat)
    # provenance, and the shown examples match the characteristic
    recs = load_records([str(files["pool"])])
    hard_ids = {r.id for r in recs if "HARD" in r.input_field}
    for row in kept:
        prov = row["extra"]["provenance"]
        assert prov["teacher_model"] == "teacher" and len(prov["prompt_hash"]) == 24
        assert isinstance(prov["seed"], int) and len(prov["shown"]) == 2
        want_hard = prov["characteristic"]["difficulty"] == "hard"
        assert all((i in hard_ids) == want_hard for i in prov["shown"])
        assert row["task"] == "synth_ecguide_qprp"
    # the steering check is measured: the student fails rows made from hard examples only
    steer = rep["steering"]["difficulty"]
    assert steer["hard"]["student_score"] == 0.0 and steer["easy"]["student_score"] == 1.0
    assert sum(rep["option_positions"].values()) == 6
    # the rows load, and flow into a mixture like any task's
    from shoptune.train.mixture import MixtureConfig, build_mixture
    assert {r.task for r in load_records([str(out)])} == {"synth_ecguide_qprp"}
    mixed, manifest = build_mixture(MixtureConfig(sources=[str(out)], split="train",
                                                  split_test=0.0, split_validation=0.0))
    assert manifest["tasks"] == {"synth_ecguide_qprp": 6}


def test_budget_stops_the_run_and_the_cli_says_so(files):
    srv = ScriptedServer(lambda body: (200, good_reply(prompt_of(body))))
    spec_path = files["dir"] / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(files, srv, rows=10, max_requests=3).model_dump()))
    out = files["dir"] / "b.jsonl"
    try:
        res = CliRunner().invoke(app, ["data", "synth", str(spec_path), "--out", str(out),
                                       "--teacher-url", srv.url, "--teacher-model", "t", "--quiet"])
    finally:
        srv.stop()
    assert res.exit_code == 0, res.output
    assert len(srv.chat_requests()) == 3
    assert "request budget reached (3)" in res.output and "kept 3 of 10" in res.output
    rep = json.loads(side_paths(out)["report"].read_text())
    assert rep["stopped"] == "request budget reached (3)" and rep["requests"]["total"] == 3


def test_teacher_errors_end_with_one_line(files):
    srv = ScriptedServer(lambda body: (401, {}))
    spec_path = files["dir"] / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(files, srv, rows=2).model_dump()))
    try:
        res = CliRunner().invoke(app, ["data", "synth", str(spec_path), "--out",
                                       str(files["dir"] / "e.jsonl"), "--teacher-url", srv.url, "--quiet"])
        assert res.exit_code == 1 and "refused the request: 401" in res.output
        assert "Traceback" not in res.output
        srv.reply = lambda body: (503, {})  # retried, then the run stops: exit 1, resumable
        spec_path.write_text(yaml.safe_dump(spec_for(files, srv, rows=2, retries=1).model_dump()))
        res = CliRunner().invoke(app, ["data", "synth", str(spec_path), "--out",
                                       str(files["dir"] / "e.jsonl"), "--teacher-url", srv.url, "--quiet"])
        assert res.exit_code == 1 and "503 after 2 attempts" in " ".join(res.output.split())
    finally:
        srv.stop()
    res = CliRunner().invoke(app, ["data", "synth", str(files["dir"] / "missing.yaml"), "--out", "x.jsonl"])
    assert res.exit_code == 1 and "cannot read spec" in res.output


def two_rows_from(files, reply) -> tuple[dict, list[dict]]:
    """Two rows from a scripted teacher, one request at a time: (report, chat requests seen)."""
    srv = ScriptedServer(reply)
    try:
        rep = run_synth(spec_for(files, srv, rows=2, concurrency=1, decontaminate_against=[]),
                        files["dir"] / "r.jsonl", teacher_url=srv.url, teacher_model="t",
                        api_key="k", quiet=True)
    finally:
        srv.stop()
    return rep, srv.chat_requests()


def test_429_and_500_back_off_then_succeed(files):
    statuses = iter([(429, {"retry_after": 0.3}), (429, {"retry_after": 0.3}), (500, {})])

    def reply(body):
        nxt = next(statuses, None)
        return nxt if nxt else (200, good_reply(prompt_of(body)))

    rep, chat = two_rows_from(files, reply)
    assert [r["status"] for r in chat] == [429, 429, 500, 200, 200]
    assert chat[1]["t"] - chat[0]["t"] >= 0.3 and chat[2]["t"] - chat[1]["t"] >= 0.3  # Retry-After
    assert len({r["key"] for r in chat[:4]}) == 1  # the same request, retried
    assert rep["kept"] == 2 and rep["requests"]["retried_by_status"] == {"429": 2, "500": 1}
    assert rep["requests"]["total"] == 5


def test_a_teacher_that_refuses_seed_is_asked_without_it(files):
    def reply(body):
        if "seed" in body:
            return 400, {"message": "seed is not supported by this server"}
        return 200, good_reply(prompt_of(body))

    rep, chat = two_rows_from(files, reply)
    assert [(r["status"], r["seed"] is None) for r in chat] == [(400, False), (200, True), (200, True)]
    assert rep["teacher"]["seed_sent"] is False and rep["requests"]["retried_by_status"] == {"400-seed": 1}
    assert rep["kept"] == 2


def test_killed_run_resumes_without_asking_again(files):
    answered = []
    lock = threading.Lock()
    srv = None

    def reply(body):
        with lock:
            answered.append(prompt_of(body))
            if len(answered) == 3:
                srv.gate.clear()  # hold every later request: the run is killed while they wait
        return 200, good_reply(prompt_of(body))

    srv = ScriptedServer(reply)
    spec_path = files["dir"] / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(files, srv, rows=8).model_dump()))
    out = files["dir"] / "k.jsonl"
    cmd = [sys.executable, "-m", "shoptune.cli", "data", "synth", str(spec_path), "--out", str(out),
           "--teacher-url", srv.url, "--teacher-model", "t", "--quiet"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        cache = side_paths(out)["cache"]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            lines = cache.read_text().splitlines() if cache.exists() else []
            if len(lines) >= 3 and srv.held >= 1:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first_keys = {json.loads(x)["key"] for x in cache.read_text().splitlines()}
        assert len(first_keys) == 3 and len(out.read_text().splitlines()) == 3
        held = srv.held  # requests of the killed run that never got an answer to it
        srv.gate.set()
        while len(srv.chat_requests()) < 3 + held:
            time.sleep(0.01)
        answered_before_kill = {r["key"] for r in srv.chat_requests()[:3]}
        n_first = len(srv.chat_requests())
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        second = srv.chat_requests()[n_first:]
        # nothing answered before the kill is asked again; the rest is asked once each
        assert not answered_before_kill & {r["key"] for r in second}
        assert len(second) == 8 - 3 and len({r["key"] for r in second}) == 5
        cache_rows = [json.loads(x) for x in cache.read_text().splitlines()]
        assert len(cache_rows) == 8 and len({c["key"] for c in cache_rows}) == 8
        kept = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(kept) == 8 and len({r["extra"]["provenance"]["job"] for r in kept}) == 8
        # a third run has nothing left to do
        n = len(srv.chat_requests())
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0 and len(srv.chat_requests()) == n
    finally:
        srv.stop()


def test_row_checks_follow_the_task_type():
    def rec(tt, metric, q, gold):
        return Record(input_field=q, output_field=gold, task_type=tt, metric=metric, task="t",
                      capability="concept_understanding", source="x")

    from shoptune.data.synth import SynthReject
    ranking_q = "Rank.\n" + "\n".join(f"{i}. p{i}" for i in range(1, 6)) + "\nOutput: "
    check_row(rec("ranking", "ndcg", ranking_q, [1, 0.1, 0, 0.01, 0]))
    for bad, reason in [([1, 1, 1, 1, 1], "parser:gold"), ([1, 0, 0], "parser:candidates")]:
        with pytest.raises(SynthReject) as e:
            check_row(rec("ranking", "ndcg", ranking_q, bad))
        assert e.value.reason == reason
    ner_q = "Find brands: I love Nike shoes and Adidas socks"
    check_row(rec("named_entity_recognition", "micro f1", ner_q, ["Nike", "Adidas"]))
    with pytest.raises(SynthReject, match="entities not in the text"):
        check_row(rec("named_entity_recognition", "micro f1", ner_q, ["Puma"]))
    with pytest.raises(SynthReject, match="not listed candidates"):
        check_row(rec("retrieval", "hit rate@3", "Pick.\n1. a\n2. b\n3. c\n", [2, 9]))
    with pytest.raises(SynthReject, match="numbered 0..n-1"):
        check_row(rec("multiple-choice", "accuracy", "Q\n0. a\n2. b\n", 0))
    with pytest.raises(SynthReject):
        parse_generated("<question>\nQ\n</question>")
    assert language_of("Welche Farbe hat die Jacke und ist sie nicht zu groß") == "de"
    assert language_of("このジャケットは何色ですか") == "ja"


@pytest.mark.slow
def test_shoptune_serve_as_the_teacher(files, tmp_path):
    from shoptune.serve.testing import ServerProcess
    s = ServerProcess(["--model", "smollm2-135m", "--max-new-tokens", "64"], tmp_path / "serve.log")
    try:
        rep = run_synth(spec_for(files, s, rows=2, max_requests=3, concurrency=1, max_tokens=48,
                                 temperature=0.7), tmp_path / "s.jsonl", teacher_url=s.url + "/v1",
                        teacher_model="smollm2-135m", api_key="EMPTY", quiet=True)
    finally:
        s.stop()
    # shoptune serve honours OpenAI's `seed`: it is sent, and each of the 3 requests the budget
    # allows gave one decided row
    assert rep["teacher"]["seed_sent"] is True and rep["requests"]["retried_by_status"] == {}
    assert rep["requests"]["total"] == rep["kept"] + rep["rejected"] == 3
    assert rep["tokens"] > 0 and rep["teacher"]["model"] == "smollm2-135m"
    rejected = side_paths(tmp_path / "s.jsonl")["rejected"]
    for row in map(json.loads, rejected.read_text().splitlines() if rejected.exists() else []):
        assert row["reason"] and row["text"] is not None


def test_every_shipped_synth_spec_loads():
    from tests.conftest import REPO
    specs = sorted((REPO / "configs" / "synth").glob("*.yaml"))
    assert specs
    for p in specs:
        spec = SynthSpec.from_yaml(p)
        from shoptune.tasks import get_card
        get_card(spec.task)


def ranking_reply(body):
    """A new, valid ranking question in task12's layout (candidates and weights from a hash of
    the prompt and the request's seed: one pool of 2 questions gives the same prompts often)."""
    from shoptune.data.derive import RANKING_TEMPLATES
    h = hashlib.sha256(f"{prompt_of(body)}{body.get('seed')}".encode()).hexdigest()
    rng = random.Random(h)
    products = "\n".join(f"{i}. {' '.join(rng.sample(WORDS, 6))} {h[:6]}" for i in range(1, 6))
    text = RANKING_TEMPLATES[0].replace("{query}", " ".join(rng.sample(WORDS, 3))).replace(
        "{products}", products)
    gold = [1, 0.1, 0, 0.01, 0]
    rng.shuffle(gold)
    return 200, example(text.rstrip(), json.dumps(gold))


def test_derive_ranking_target_synthesizes_what_the_data_lacks(tmp_path):
    from tests.data.test_derive import judgement_rows
    data = write(tmp_path / "qpr.jsonl", judgement_rows())
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"task": "derived_qpr_ranking", "output_task": "synth_qpr_ranking",
                                    "pool": ["x"], "rows": 1, "shots": 2, "concurrency": 2,
                                    "characteristics": {"language": {"en": 1}}}))
    srv = ScriptedServer(ranking_reply)
    out = tmp_path / "d" / "rank.jsonl"
    try:
        res = CliRunner().invoke(app, ["data", "derive", "ranking", str(data), "--out", str(out),
                                       "--target", "5", "--synth-spec", str(spec), "--teacher-url",
                                       srv.url, "--teacher-model", "t", "--quiet"])
    finally:
        srv.stop()
    assert res.exit_code == 0, res.output
    assert "the data supports 2 of 5: synthesizing 3" in " ".join(res.output.split())
    made = load_records([str(tmp_path / "d" / "rank.synth.jsonl")])
    assert len(made) == 3 and {r.task for r in made} == {"synth_qpr_ranking"}
    assert all(r.task_type == "ranking" and len(r.output_field) == 5 for r in made)
    assert len(srv.chat_requests()) == 3
    assert (tmp_path / "d" / "cards" / "synth_qpr_ranking.yaml").exists()


# ---------------------------------------------------------------- review of #13: regressions

def ranking_rows(n, tag, template=1):
    from shoptune.data.derive import RANKING_TEMPLATES
    rng = random.Random(tag)
    out = []
    for i in range(n):
        products = "\n".join(f"{j}. {' '.join(rng.sample(WORDS, 4))} {tag}{i}" for j in range(1, 6))
        text = RANKING_TEMPLATES[template].replace("{query}", " ".join(rng.sample(WORDS, 2))).replace(
            "{products}", products)
        out.append(Record(input_field=text, output_field=[1, 0.1, 0, 0.01, 0], task_type="ranking",
                          metric="ndcg", task="derived_qpr_ranking", capability="user_behavior_alignment",
                          source=f"{tag}:{i}"))
    return out


@pytest.mark.parametrize("pool_size", [1, 8, 15])
def test_small_pool_template_wording_is_not_contamination_but_a_leak_is(pool_size):
    """A template whose query shares a line with fixed wording: its 13-grams are the task's,
    not one evaluation question's, even when the pool is too small to show they are common."""
    from shoptune.data.synth import Gate, SynthReject
    pool = ranking_rows(pool_size, "pool")
    evals = {"dev": ranking_rows(2, "dev") + [Record(
        input_field="Write a title for: " + " ".join(WORDS[:20]), output_field="t",
        task_type="generation", metric="rougel", task="t", capability="concept_understanding",
        source="dev:leak")]}
    gate = Gate(SynthSpec(task="derived_qpr_ranking", pool=["x"], rows=1), pool, evals)
    gate.check(ranking_rows(1, "new")[0])  # same template, new query and products: kept
    leak = ranking_rows(1, "leak")[0]
    leak.input_field = leak.input_field.replace("1. ", "1. " + " ".join(WORDS[3:17]) + " ", 1)
    with pytest.raises(SynthReject) as e:
        gate.check(leak)
    assert e.value.reason == "contaminated-13gram" and e.value.info["of"] == evals["dev"][2].id


def test_ranking_gold_must_be_shopbench_relevance_levels():
    from shoptune.data.synth import SynthReject
    q = ranking_rows(1, "g")[0]
    check_row(q)
    for gold, msg in [([2, 4, 1, 3, 5], "permutation"), ([5, 4, 3, 2, 1], "permutation"),
                      ([100, 0, 0, 0, 0], "levels"), ([0.5, 0.3, 0, 0, 0], "levels")]:
        q.output_field = gold
        with pytest.raises(SynthReject, match=msg) as e:
            check_row(q)
        assert e.value.reason == "parser:gold"


def test_read_log_cuts_only_its_own_torn_line(tmp_path):
    from shoptune.data.teacher import LogError, read_log
    pred = tmp_path / "predictions.jsonl"
    body = '{"id": "a", "score": 1}\n{"id": "b", "score": 0}'  # no final newline: still a row
    pred.write_text(body)
    assert [r["id"] for r in read_log(pred)] == ["a", "b"] and pred.read_text() == body
    torn = tmp_path / "torn.jsonl"
    torn.write_text('{"job": 0}\n{"job": 1')
    with pytest.raises(LogError, match=r"torn.jsonl:2: not a JSON line"):
        read_log(torn)  # not ours: reported, not cut
    assert torn.read_text() == '{"job": 0}\n{"job": 1'
    assert read_log(torn, own=True) == [{"job": 0}] and torn.read_text() == '{"job": 0}\n'
    own = tmp_path / "own.jsonl"
    own.write_text('{"job": 0}\n{"job": 1}')  # complete last row: kept, newline added
    assert len(read_log(own, own=True)) == 2 and own.read_text().endswith("}\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"job": 0}\nnot json\n{"job": 2}\n')
    with pytest.raises(LogError, match=r"bad.jsonl:2: not a JSON line"):
        read_log(bad, own=True)


def test_a_student_predictions_file_is_not_modified(files):
    pool = load_records([str(files["pool"])])
    pred = files["dir"] / "predictions.jsonl"
    body = "\n".join(json.dumps({"id": r.id, "score": float(i % 2)}) for i, r in enumerate(pool))
    pred.write_text(body)  # no final newline, as some tools write
    srv = ScriptedServer(lambda body: (200, good_reply(prompt_of(body))))
    try:
        rep = run_synth(spec_for(files, srv, rows=2, characteristics={"difficulty": {"hard": 1}},
                                 student={"predictions": str(pred)}),
                        files["dir"] / "p.jsonl", teacher_url=srv.url, teacher_model="t",
                        api_key="k", quiet=True)
    finally:
        srv.stop()
    assert pred.read_text() == body and rep["pool"]["difficulty"] == {"easy": 6, "hard": 6}


def test_token_budget_spans_resumes_and_the_cli_says_how_to_continue(files):
    srv = ScriptedServer(lambda body: (200, good_reply(prompt_of(body))))  # 15 tokens a reply
    spec_path = files["dir"] / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(files, srv, rows=6, concurrency=1,
                                                 max_total_tokens=40).model_dump()))
    out = files["dir"] / "t.jsonl"
    cmd = ["data", "synth", str(spec_path), "--out", str(out), "--teacher-url", srv.url, "--quiet"]
    try:
        res = CliRunner().invoke(app, cmd)
        text = " ".join(res.output.split())
        assert res.exit_code == 0 and "token budget reached (40)" in text, res.output
        assert len(srv.chat_requests()) == 3 and "kept 3 of 6" in text  # 0, 15, 30 < 40; 45 >= 40
        assert "raise --max-requests / --max-total-tokens" in text and "same command" not in text
        res = CliRunner().invoke(app, cmd)  # the same budget: spent already, nothing is asked
        assert res.exit_code == 0 and len(srv.chat_requests()) == 3
        assert "token budget reached (40)" in " ".join(res.output.split())
        res = CliRunner().invoke(app, cmd + ["--max-total-tokens", "1000"])
        assert res.exit_code == 0 and "kept 6 of 6" in " ".join(res.output.split()), res.output
        assert len(srv.chat_requests()) == 6
        rep = json.loads(side_paths(out)["report"].read_text())
        assert rep["tokens"] == 90 and rep["requests"]["total"] == 6
    finally:
        srv.stop()


def test_a_400_rejects_one_job_and_retry_after_is_capped(files):
    calls = {"n": 0}
    lock = threading.Lock()

    def reply(body):
        with lock:
            calls["n"] += 1
            n = calls["n"]
        if n == 1:
            return 429, {"retry_after": 100}  # capped by max_backoff_s
        if n == 2:
            return 400, {}  # e.g. the prompt is longer than the context: this job only
        return 200, good_reply(prompt_of(body))

    srv = ScriptedServer(reply)
    try:
        t0 = time.monotonic()
        rep = run_synth(spec_for(files, srv, rows=2, concurrency=1, max_backoff_s=0.2,
                                 decontaminate_against=[]),
                        files["dir"] / "f.jsonl", teacher_url=srv.url, teacher_model="t",
                        api_key="k", quiet=True)
        assert time.monotonic() - t0 < 30
    finally:
        srv.stop()
    assert rep["kept"] == 2 and rep["rejected_by_reason"] == {"teacher:400": 1}
    assert rep["requests"]["total"] == 4 and rep["stopped"] is None
    cache = [json.loads(x) for x in side_paths(files["dir"] / "f.jsonl")["cache"].read_text().splitlines()]
    assert sum(c["attempts"] for c in cache) == 4  # the refused job's 2 requests are on record


def _cli(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 2, res.output
    return " ".join(res.output.split())


def test_bad_input_is_one_line_naming_file_and_line(files, monkeypatch):
    d = files["dir"]
    srv = ScriptedServer(lambda body: (200, good_reply(prompt_of(body))))

    def spec(**kw):
        p = d / "spec.yaml"
        p.write_text(yaml.safe_dump(spec_for(files, srv, rows=2, **kw).model_dump()))
        return ["data", "synth", str(p), "--teacher-url", srv.url, "--quiet"]

    try:
        bad_eval = write(d / "bad_eval.jsonl", [{"input_field": "Q\n0. a\n1. b", "output_field": 7,
                                                 "task_type": "multiple-choice", "metric": "accuracy",
                                                 "task": "ecguide_qprp"}])
        out = _cli(spec(decontaminate_against=[str(bad_eval)]) + ["--out", str(d / "a.jsonl")])
        assert f"{bad_eval}:1: output_field" in out
        log = d / "m.jsonl"
        log.write_text('{"job": 0}\n')
        side_paths(log)["cache"].write_text('{"job": 0, "key": "k", "text": "x"}\nbroken\n{"job": 1}\n')
        out = _cli(spec() + ["--out", str(log)])
        assert f"{log}:1: extra.provenance.job: missing" in out
        log.unlink()
        assert f"{side_paths(log)['cache']}:2: not a JSON line" in _cli(spec() + ["--out", str(log)])
        foreign = write(d / "mine.jsonl", pool_rows()[:1])
        # (#31) someone's file is never appended to: only an earlier synth's output (its cache beside it)
        assert "mine.jsonl: exists and is not the output of an earlier `shoptune data synth`" in \
            _cli(spec() + ["--out", str(foreign)])
        assert "is an input" in _cli(spec() + ["--out", str(d / "spec.yaml")])
        pred = write(d / "pred.jsonl", [{"id": "x", "score": 1}, {"score": 0}])
        steer = {"characteristics": {"difficulty": {"hard": 1}}}
        out = _cli(spec(student={"predictions": str(pred)}, **steer) + ["--out", str(d / "b.jsonl")])
        assert f"{pred}:2: id: missing" in out
        pred = write(d / "pred.jsonl", [{"id": "x", "score": 1}])
        out = _cli(spec(student={"predictions": str(pred)}, **steer) + ["--out", str(d / "c.jsonl")])
        assert "none of its 1 ids is a pool row" in out and "needs a student" not in out
        bad_pool = write(d / "bad_pool.jsonl", [dict(pool_rows()[0], output_field=9)])
        out = _cli(spec(pool=[str(bad_pool)]) + ["--out", str(d / "e.jsonl")])
        assert f"{bad_pool}:1: output_field" in out
        monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
        out = _cli(spec() + ["--out", str(d / "g.jsonl"), "--teacher-url", "https://api.example.invalid/v1",
                             "--api-key-env", "NO_SUCH_KEY_VAR"])
        assert "--api-key-env NO_SUCH_KEY_VAR: the variable is not set" in out
        assert srv.chat_requests() == []
    finally:
        srv.stop()


def test_language_of_uses_a_language_model():
    cases = {"la table de la maison": "fr", "Quale colore ha la giacca": "it",
             "東京都内で使用可能": "ja", "Dieser Schuh passt gut": "de",
             "Red running shoes size 10": "en", "这个手机壳质量很好": "zh"}
    assert {t: language_of(t) for t in cases} == cases


def test_an_unreachable_teacher_costs_no_budget_and_fails_naming_it(files):
    """#20 item 15: attempts that never connect are not spent; exit 1 naming the teacher; nothing
    but the report written; once the teacher is up, the whole budget is there."""
    from shoptune.serve.testing import free_port
    url = f"http://127.0.0.1:{free_port()}/v1"
    spec_path = files["dir"] / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec_for(files, None, rows=3, max_requests=3, retries=2,
                                                 decontaminate_against=[]).model_dump()))
    out = files["dir"] / "u" / "rows.jsonl"
    cmd = ["data", "synth", str(spec_path), "--out", str(out), "--teacher-model", "t", "--quiet"]
    res = CliRunner().invoke(app, cmd + ["--teacher-url", url])
    assert res.exit_code == 1, res.output
    assert [ln for ln in res.output.splitlines() if ln.startswith("error:")] == [
        f"error: teacher {url}: cannot connect ([Errno 111] Connection refused) after 3 attempts; "
        "run the same command to continue"], res.output
    rep = json.loads(side_paths(out)["report"].read_text())
    assert rep["requests"]["total"] == 0 and rep["requests"]["failed_jobs"] >= 1
    assert sorted(p.name for p in out.parent.iterdir()) == ["rows.report.json"]  # no rows, no card
    srv = ScriptedServer(lambda body: (200, good_reply(prompt_of(body))))
    try:
        res = CliRunner().invoke(app, cmd + ["--teacher-url", srv.url])
    finally:
        srv.stop()
    assert res.exit_code == 0 and "kept 3 of 3" in " ".join(res.output.split()), res.output
    assert len(srv.chat_requests()) == 3


def test_characteristic_weights_must_not_be_negative(files):
    """A negative weight is named as such (it used to read as "needs a student")."""
    from shoptune.data.synth import SynthError
    p = files["dir"] / "neg.yaml"
    p.write_text(f"task: ecguide_qprp\npool: [{files['pool']}]\nrows: 2\ncharacteristics:\n"
                 "  difficulty: {hard: -1, easy: 1}\n")
    with pytest.raises(SynthError) as e:
        SynthSpec.from_yaml(p)
    assert str(e.value) == (f"{p}:5: characteristics.difficulty.hard: Input should be greater than "
                            "or equal to 0 (got -1)")
    p.write_text(f"task: ecguide_qprp\npool: [{files['pool']}]\nrows: 2\ncharacteristics:\n"
                 "  difficulty: {hard: 0, any: 1}\n")
    assert not SynthSpec.from_yaml(p).characteristics.steers_difficulty()  # no student needed
