"""Paired bootstrap / permutation comparison, checked against a direct loop that resamples
question rows and aggregates them with summarize() (no model)."""
import numpy as np
import pytest

from shoptune.eval.paired import bootstrap_scores, format_paired, paired_compare
from shoptune.eval.scoring import summarize

TASKS = [("t1", "concept_understanding", "accuracy", 5), ("t2", "concept_understanding", "rougel", 4),
         ("t3", "knowledge_reasoning", "micro f1", 3), ("t10", "multilingual", "accuracy", 6)]


def make_rows(seed):
    rng = np.random.default_rng(seed)
    rows = []
    for t, cap, metric, n in TASKS:
        for i in range(n):
            row = {"id": f"{t}-{i}", "task_name": t, "capability": cap, "metric": metric}
            if metric == "micro f1":
                tp = int(rng.integers(0, 3))
                row["counts"] = [tp, int(rng.integers(0, 2)), int(rng.integers(0, 2))]
                row["score"] = 0.0  # not used for micro F1
            elif metric == "accuracy":
                row["score"] = float(rng.integers(0, 2))
            else:
                row["score"] = round(float(rng.random()), 3)
            rows.append(row)
    return rows


def direct(a, b, n_boot, n_perm, seed):
    """Resample rows with the same draws, aggregate each resample with summarize()."""
    rng = np.random.default_rng(seed)
    order = sorted({r["task_name"] for r in a}, key=lambda t: int(t[1:]))
    pos = {t: [i for i, r in enumerate(a) if r["task_name"] == t] for t in order}
    idx = {t: rng.integers(0, len(pos[t]), (n_boot, len(pos[t]))) for t in order}
    boot = []
    for k in range(n_boot):
        pick = [pos[t][j] for t in order for j in idx[t][k]]
        boot.append(summarize([b[i] for i in pick], n_boot=0)["overall"]
                    - summarize([a[i] for i in pick], n_boot=0)["overall"])
    swap = {t: rng.random((n_perm, len(pos[t]))) < 0.5 for t in order}
    d = summarize(b, n_boot=0)["overall"] - summarize(a, n_boot=0)["overall"]
    hits = 0
    for k in range(n_perm):
        sw = {pos[t][j]: swap[t][k][j] for t in order for j in range(len(pos[t]))}
        a2 = [b[i] if sw[i] else a[i] for i in range(len(a))]
        b2 = [a[i] if sw[i] else b[i] for i in range(len(a))]
        dk = summarize(b2, n_boot=0)["overall"] - summarize(a2, n_boot=0)["overall"]
        hits += abs(dk) >= abs(d) - 1e-12
    return d, [np.percentile(boot, 2.5), np.percentile(boot, 97.5)], (1 + hits) / (1 + n_perm)


def test_paired_ci_and_p_equal_a_direct_computation():
    a, b = make_rows(1), make_rows(2)
    res = paired_compare([a], [b], n_boot=300, n_perm=300, seed=7, max_boot=300, max_perm=300)
    d, ci, p = direct(a, b, 300, 300, 7)
    assert res["overall"]["diff"] == pytest.approx(d, abs=1e-12)
    assert res["overall"]["ci95"] == pytest.approx(ci, abs=1e-12)
    assert res["overall"]["p"] == pytest.approx(p, abs=1e-12)
    sa, sb = summarize(a, n_boot=0), summarize(b, n_boot=0)
    for cap, v in res["capabilities"].items():
        assert v["a"] == pytest.approx(sa["capabilities"][cap]) and v["b"] == pytest.approx(sb["capabilities"][cap])
    assert res["tasks"]["t3"]["b"] == pytest.approx(sb["tasks"]["t3"]["score"])  # micro F1 from counts
    assert res["overall_tasks"]["diff"] == pytest.approx(sb["overall_tasks"] - sa["overall_tasks"])
    assert list(res["tasks"]) == ["t1", "t2", "t3", "t10"]


def test_identical_runs_and_a_constant_shift():
    a = [r for r in make_rows(3) if r["metric"] == "rougel"]
    same = paired_compare([a], [a], n_boot=200, n_perm=200)
    assert same["overall"]["diff"] == 0 and same["overall"]["ci95"] == [0, 0] and same["overall"]["p"] == 1.0
    b = [dict(r, score=r["score"] + 0.1) for r in a]  # B better by 0.1 on every question
    up = paired_compare([a], [b], n_boot=200, n_perm=999)
    assert up["overall"]["diff"] == pytest.approx(0.1)
    assert up["overall"]["ci95"] == pytest.approx([0.1, 0.1])  # paired: question noise cancels
    assert up["overall"]["p"] <= 0.15  # 4 questions: 2/16 of the sign flips are as extreme
    assert "| **mean of 1 of 4 tracks (concept_understanding), not all-around** |" in format_paired(up)
    assert "permutation" in format_paired(up)
    full = paired_compare([make_rows(1)], [make_rows(2)], n_boot=100, n_perm=100, max_boot=100, max_perm=100)
    assert "| **all-around** |" not in format_paired(full)  # three of the four tracks
    four = [dict(r, capability="user_behavior_alignment", task_name="t4") if r["task_name"] == "t2" else r
            for r in make_rows(1)]
    assert "| **all-around** |" in format_paired(paired_compare([four], [four], n_boot=100, n_perm=100))
    # ... but an interval that never moved measures nothing: no higher/lower verdict (#33 item 2)
    from shoptune.eval.paired import verdict
    assert verdict(up["overall"]) == "cannot tell (zero-width CI)" and verdict(same["overall"]) == "no difference"


def test_seeds_are_averaged_after_pairing():
    a0, a1, b0, b1 = make_rows(1), make_rows(4), make_rows(2), make_rows(5)
    res = paired_compare([a0, a1], [b0, b1], n_boot=100, n_perm=100)
    d0 = paired_compare([a0], [b0], n_boot=10, n_perm=10)["overall"]["diff"]
    d1 = paired_compare([a1], [b1], n_boot=10, n_perm=10)["overall"]["diff"]
    assert res["overall"]["seed_diffs"] == pytest.approx([d0, d1], abs=1e-6)
    assert res["overall"]["diff"] == pytest.approx((d0 + d1) / 2)
    sc = bootstrap_scores([a0, a1], n_boot=100)
    assert sc["overall"]["score"] == pytest.approx(
        (summarize(a0, n_boot=0)["overall"] + summarize(a1, n_boot=0)["overall"]) / 2)
    assert sc["overall"]["ci95"][0] <= sc["overall"]["score"] <= sc["overall"]["ci95"][1]


def test_different_questions_are_refused():
    a = make_rows(1)
    with pytest.raises(ValueError, match="not the same questions"):
        paired_compare([a], [a[:-1]])
    b = [dict(r) for r in a]
    b[3]["id"] = "other"
    with pytest.raises(ValueError, match="question 3: id other"):
        paired_compare([a], [b])


def test_interaction_of_two_gains_by_hand_and_against_paired_compare():
    from shoptune.eval.paired import interaction

    def rows(scores):
        return [{"id": f"q{i}", "task_name": "t1", "capability": "concept_understanding",
                 "metric": "accuracy", "score": float(s)} for i, s in enumerate(scores)]
    lo = rows([0, 0, 0, 0])
    a_hi, b_hi = rows([1, 0, 0, 0]), rows([1, 1, 1, 0])  # gains 0.25 (A) and 0.75 (B)
    res = interaction([lo], [a_hi], [lo], [b_hi], n_boot=500, seed=1)
    t = res["tasks"]["t1"]
    assert (t["gain_a"], t["gain_b"], t["diff"]) == pytest.approx((0.25, 0.75, 0.5))
    assert res["overall"]["diff"] == pytest.approx(0.5) and res["overall"]["seed_diffs"] == [0.5]
    lo_ci, hi_ci = res["overall"]["ci95"]
    assert lo_ci <= 0.5 <= hi_ci and hi_ci - lo_ci > 0  # four questions: a wide interval
    same = interaction([lo], [lo], [lo], [lo], n_boot=200)
    assert same["overall"]["diff"] == 0 and same["overall"]["ci95"] == [0.0, 0.0]

    # with A's two groups equal it is B's paired difference: same point value and CI
    a, b0, b1 = make_rows(1), make_rows(2), make_rows(3)
    got = interaction([a, a], [a, a], [b0, b1], [b1, b0], n_boot=300, seed=7)
    want = paired_compare([b0, b1], [b1, b0], n_boot=300, n_perm=10, seed=7)
    for k in ("overall", "overall_tasks"):
        assert got[k]["diff"] == pytest.approx(want[k]["diff"], abs=1e-12)
        assert got[k]["ci95"] == pytest.approx(want[k]["ci95"], abs=1e-12)
        assert got[k]["seed_diffs"] == want[k]["seed_diffs"]
    with pytest.raises(ValueError, match="same number of runs"):
        interaction([a], [a], [a, a], [a, a])


def test_zero_width_interval_from_single_question_tasks_is_no_ci():
    """#24 item 8: the demo's EC-Guide test set has one question in most tasks; when the one task
    with two questions gains the same on both, every resample gives the same difference, and the
    interval [d, d] would read as certainty ("higher"). It is no CI; a constant shift over tasks
    with several questions each keeps its (real, paired) zero-width interval."""
    from shoptune.eval.paired import verdict
    a, b = [], []
    for t, n in (("t1", 1), ("t2", 1), ("t3", 1), ("t4", 2)):
        for i in range(n):
            row = {"id": f"{t}-{i}", "task_name": t, "capability": "concept_understanding", "metric": "accuracy"}
            a.append(dict(row, score=0.0))
            b.append(dict(row, score=1.0 if t in ("t1", "t4") else 0.0))
    res = paired_compare([a], [b], n_boot=200, n_perm=200)
    assert res["overall"]["diff"] == pytest.approx(0.5)
    assert res["overall"]["ci95"] is None and verdict(res["overall"]) == "cannot tell (no CI)"
    assert bootstrap_scores([b], n_boot=200)["overall"]["ci95"] is None


def test_verdict_does_not_depend_on_the_random_seed():
    """#33 item 1. By hand: B gets 3 of 10 questions wrong that A got right. A resample misses all
    three with probability 0.7^10 = 0.0282 > 0.025, so the 97.5% quantile of the difference, the
    CI's upper bound, is exactly 0: the CI touches 0, "within noise". 2,000 draws see fewer than
    2.5% such resamples for some seeds and put the bound below 0 ("lower"); the draws now grow
    until the bound's Monte Carlo interval settles which side of 0 it is on."""
    from shoptune.eval.paired import verdict

    def rows(scores):
        return [{"id": f"q{i}", "task_name": "t1", "capability": "concept_understanding",
                 "metric": "accuracy", "score": float(x)} for i, x in enumerate(scores)]
    a, b = rows([1, 1, 1, 0, 0, 0, 0, 0, 0, 0]), rows([0] * 10)
    fixed = [paired_compare([a], [b], seed=s, max_boot=2000, max_perm=2000)["overall"] for s in range(10)]
    assert sorted({round(v["ci95"][1], 6) for v in fixed}) == [-0.0975, 0.0]  # seed 3 flips at 2,000
    assert all(verdict(v).startswith("borderline") for v in fixed)  # ... so at that cap: no verdict
    for s in range(10):
        res = paired_compare([a], [b], seed=s)
        assert res["overall"]["ci95"] == [-0.6, 0.0] and verdict(res["overall"]) == "within noise"
        assert res["draws"]["bootstrap"] > 2000 and res["overall"]["borderline"] == []
        assert res["overall"]["mc_error"]["ci95"][1] == 0  # the bound's order statistics are all 0


def test_a_zero_width_interval_from_float_noise_is_no_ci():
    """#33 item 2 (found on the quick start's runs): a track of one single-question task that
    changed and one with several questions that did not. Its resamples differ only by float
    rounding (the track mean of each run moves with the unchanged task), so the interval was
    [+0.019, +0.019] with p = 1 and read as "higher"."""
    from shoptune.eval.paired import verdict
    a, b = [], []
    for t, scores in (("m1", [0.2]), ("m2", [0.1234, 0.5678, 0.9012, 0.3456])):
        for i, x in enumerate(scores):
            row = {"id": f"{t}-{i}", "task_name": t, "capability": "multilingual", "metric": "rougel"}
            a.append(dict(row, score=x))
            b.append(dict(row, score=x + (0.038 if t == "m1" else 0.0)))
    res = paired_compare([a], [b], n_boot=500, n_perm=500)
    v = res["capabilities"]["multilingual"]
    assert v["diff"] == pytest.approx(0.019) and v["p"] == 1.0
    assert v["ci95"] is None and verdict(v) == "cannot tell (no CI)"
    table = format_paired(res)
    assert "| multilingual | 0.342 | 0.361 | +0.019 | no CI (only single-question tasks changed) | 1.000 | cannot tell (no CI) |" in table


def test_the_clis_default_cap_is_the_librarys():
    from typer.testing import CliRunner

    from shoptune.cli import app
    from shoptune.eval.paired import MAX_DRAWS
    for cmd in (["eval", "compare", "--help"], ["experiment", "report", "--help"]):
        out = " ".join(CliRunner().invoke(app, cmd, terminal_width=200, env={"COLUMNS": "200"}).output.split())
        assert f"[default: {MAX_DRAWS}]" in out and "--max-perm" in out, cmd
