import math

import numpy as np
import pytest

from shoptune.eval import metrics as M
from shoptune.eval.scoring import summarize


def test_accuracy_and_bool():
    assert M.accuracy(2, 2) == 1.0 and M.accuracy(-1, 0) == 0.0
    assert M.bool_match("yes", "Yes ") == 1.0 and M.bool_match("", "no") == 0.0


def test_hit_rate_at_3():
    assert M.hit_rate_3([1, 2, 3, 4], [2, 4]) == 0.5    # 4 is past the first 3
    assert M.hit_rate_3([4], [4]) == 1.0
    assert M.hit_rate_3([], [1, 2, 3]) == 0.0
    assert M.hit_rate_3([5, 5, 5], [5, 6]) == 0.5


def test_micro_f1_summed_over_task_with_case_and_whitespace():
    a = M.micro_f1_counts([" Nike", "nike"], ["nike"])   # duplicates count as false positives
    b = M.micro_f1_counts([], ["Adidas"])
    assert a == (1, 1, 0) and b == (0, 0, 1)
    assert M.micro_f1([a, b]) == pytest.approx(0.5)
    assert M.micro_f1_counts(["nike"], [" nike"]) == (0, 1, 1)   # gold is lower-cased, not stripped
    assert M.micro_f1([(0, 0, 0)]) == 0.0
    # summed, not averaged: per-sample F1s would be 1.0 and 0.0 -> mean 0.5; micro gives 2/3
    assert M.micro_f1([M.micro_f1_counts(["a"], ["a"]), M.micro_f1_counts(["b"], ["c"])]) == pytest.approx(0.5)
    assert M.micro_f1([(2, 0, 0), (0, 1, 1)]) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_ndcg_hand_worked():
    gold = [1, 0.01, 0.1, 1, 0]
    g = lambda r: 2 ** r - 1
    ideal = g(1) / math.log2(2) + g(1) / math.log2(3) + g(0.1) / math.log2(4) + g(0.01) / math.log2(5)
    assert M.ndcg([1, 4, 3, 2, 5], gold) == pytest.approx(1.0)
    got = M.ndcg([5, 2, 3, 1, 4], gold)
    dcg = g(0) / 1 + g(0.01) / math.log2(3) + g(0.1) / 2 + g(1) / math.log2(5) + g(1) / math.log2(6)
    assert got == pytest.approx(dcg / ideal)
    # out-of-range indices (0, 7) score 0; pred longer than gold is cut to len(gold)
    assert M.ndcg([0, 7, 1], gold) == pytest.approx((g(1) / 2) / ideal)
    assert M.ndcg([2, 3, 5, 1, 4, 1, 4], gold) == M.ndcg([2, 3, 5, 1, 4], gold)
    assert M.ndcg([], gold) == 0.0 and M.ndcg([1, 2], [0, 0]) == 0.0


def test_bleu_first_line_lowercase():
    assert M.bleu("hello world foo bar\nsecond line", "Hello world foo bar") == pytest.approx(1.0)
    assert M.bleu("\n\nhello world foo bar", "hello world foo bar") == pytest.approx(1.0)
    assert M.bleu("second line\nhello world foo bar", "hello world foo bar") == 0.0
    import sacrebleu
    want = sacrebleu.sentence_bleu("the cat sat on a mat", ["The cat sat on the mat"], lowercase=True).score / 100
    assert M.bleu("the cat sat on a mat", "The cat sat on the mat") == pytest.approx(want)
    assert 0 < want < 1


def test_jp_bleu_uses_mecab():
    assert M.jp_bleu("東京に行きます", "東京に行きます") == pytest.approx(1.0)
    assert 0 < M.jp_bleu("東京に行きました", "東京に行きます") < 1


def test_rougel():
    assert M.rougel("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert M.rougel("running shoes", "run shoe") == pytest.approx(1.0)   # stemmer
    assert M.rougel("", "x") == 0.0


class FakeEncoder:
    vecs = {"p": [1, 0], "same": [1, 0], "opp": [-1, 0], "orth": [0, 1], "mid": [0.6, 0.8]}

    def encode(self, texts, **kw):
        v = np.array([self.vecs[t] for t in texts], dtype=float)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_sent_transformer_floor_and_list_mean(monkeypatch):
    monkeypatch.setattr(M, "encoder", lambda path: FakeEncoder())
    got = M.embedding_similarity(["p"] * 5, ["same", "opp", ["same", "orth"], ["same", "opp", "opp"], "mid"], "x")
    assert got == pytest.approx([1.0, 0.0, 0.5, 0.0, 0.6])


@pytest.mark.slow
def test_sent_transformer_real_model():
    s = M.score_batch("sent-transformer", ["A watch band straps a watch to the wrist.", "banana"],
                      ["A watch band is a bracelet that straps a wristwatch onto the wrist.",
                       "A watch band is a bracelet that straps a wristwatch onto the wrist."])
    assert s[0] > 0.7 and s[1] < s[0]
    assert M.score_batch("sent-transformer", ["same text"], ["same text"])[0] == pytest.approx(1.0, abs=1e-5)


def test_multilingual_needs_local_copy(monkeypatch):
    monkeypatch.delenv("SHOPTUNE_MULTILINGUAL_ST_MODEL", raising=False)
    with pytest.raises(RuntimeError, match="SHOPTUNE_MULTILINGUAL_ST_MODEL"):
        M.score_batch("multilingual-sent-transformer", ["a"], ["b"])


def _row(task, cap, score, metric="accuracy", counts=None):
    r = {"task_name": task, "capability": cap, "metric": metric, "score": score}
    if counts:
        r["counts"] = counts
    return r


def test_aggregation_tracks_overall_and_ci():
    rows = [_row("t1", "concept_understanding", 1.0), _row("t1", "concept_understanding", 0.0),
            _row("t2", "concept_understanding", 1.0),
            _row("t3", "multilingual", 0.0, "micro f1", (1, 1, 0)),
            _row("t3", "multilingual", 0.0, "micro f1", (0, 0, 1))]
    s = summarize(rows, n_boot=200)
    assert s["tasks"]["t1"]["score"] == 0.5 and s["tasks"]["t3"]["score"] == pytest.approx(0.5)
    assert s["tracks"] == {"amazon-kdd-cup-24-understanding-shopping-concepts": 0.75,
                           "amazon-kdd-cup-24-multi-lingual-abilities": pytest.approx(0.5)}
    assert s["overall"] == pytest.approx(0.625)                 # mean of tracks
    assert s["overall_tasks"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    lo, hi = s["ci95"]["overall"]
    assert lo <= s["overall"] <= hi and hi - lo > 0
    # one question: resampling within the task never moves it, so no interval (not [1.0, 1.0]),
    # and the report says which tasks add no uncertainty (#24 item 8)
    assert s["tasks"]["t2"]["ci95"] is None and s["bootstrap"]["single_question_tasks"] == ["t2"]
    assert s["ci95"]["tracks"]["amazon-kdd-cup-24-understanding-shopping-concepts"] is not None  # t1 has 2
