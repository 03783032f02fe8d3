"""Report titles and labels say what was scored (#33 item 3): ShopBench only for ShopBench's own
tasks, all-around only over all four tracks."""
from shoptune.eval.report import data_title, overall_label, report_markdown
from shoptune.eval.scoring import summarize


def _rows(tasks):
    return [{"id": f"{t}-{i}", "task_name": t, "capability": cap, "metric": "accuracy", "score": float(i % 2)}
            for t, cap in tasks for i in range(2)]


def test_titles_and_the_all_around_label_say_what_was_scored():
    shop = summarize(_rows([("task2", "concept_understanding"), ("task11", "multilingual")]), n_boot=0)
    own = summarize(_rows([("ecguide_sa", "concept_understanding")]), n_boot=0)
    own["data"], own["model"] = [{"path": "data/mine/products.jsonl", "sha256_16": "x"}], "m"
    own["manifest"] = {"suite": None}  # a --data run's manifest
    assert data_title(shop) == "ShopBench" and data_title(own) == "products.jsonl"
    assert data_title({**own, "manifest": {"suite": "core"}}) == "suite core"
    assert data_title({"tasks": {"shopbench_task2": {}}}) == "ShopBench"  # card names (#34) too
    md = report_markdown(own)
    assert md.startswith("# Evaluation on products.jsonl: m\n") and "ShopBench" not in md
    assert "| **mean of 1 of 4 tracks (concept_understanding), not all-around** |" in md
    assert overall_label(["multilingual", "knowledge_reasoning", "concept_understanding",
                          "user_behavior_alignment"]) == "all-around"
    assert overall_label(c for c in ("multilingual", "knowledge_reasoning", "concept_understanding",
                                     "user_behavior_alignment")) == "all-around"  # any iterable
    assert overall_label(["concept_understanding", "multilingual"]) == \
        "mean of 2 of 4 tracks (concept_understanding, multilingual), not all-around"
