"""`data derive`: ranking questions from query-product judgements (scored by the ShopBench NDCG
rules, hand-worked values) and multiple-choice versions of generation rows (golds checked)."""
import json
import re

import pytest
from typer.testing import CliRunner

from shoptune.cli import app
from shoptune.data.derive import RANKING_TEMPLATES, derive_mcq, derive_ranking
from shoptune.data.loaders import check_fields, load_records
from shoptune.tasks.outputs.choice import option_numbers
from shoptune.eval.scoring import score_outputs
from tests.conftest import EC_GUIDE, needs_shared

ESCI = ["The product is irrelevant to the query.",
        "The product is somewhat relevant. It fails to fulfill some aspects of the query but the "
        "product can be used as a functional substitute.",
        "The product does not fulfill the query, but could be used in combination with a product "
        "exactly matching the query.",
        "The product is relevant to the query, and satisfies all the query specifications."]


def qprp(text, gold):
    return {"input_field": text, "output_field": gold, "task_type": "multiple-choice",
            "metric": "accuracy", "task": "ecguide_qprp"}


def best(query, relation, products, gold):
    opts = "\n".join(f"{i}. {p}" for i, p in enumerate(products))
    return qprp(f"Given the query '{query}', which of the following product best {relation} it?\n"
                f"{opts}\nAnswer: ", gold)


def judgement_rows():
    esci = "\n".join(f"{i}. {t}" for i, t in enumerate(ESCI))
    short = "0. complement\n1. irrelevant\n2. narrowing\n3. substitute"
    return [
        # query 1: five judged products, one from each layout
        best("trail shoes", "exact", ["Garden Hose", "Trail Runner X", "Desk Lamp", "Pillow"], 1),
        best("trail shoes", "irrelevant", ["Garden Hose", "Trail Runner X", "Desk Lamp", "Pillow"], 0),
        qprp('Evaluate the relevance between the query and product title.\nquery:"trail shoes". '
             f'product:"Hiking Boot Y"\n{esci}\n\nAnswer: ', 1),
        qprp('Which of the following statements best describes the relation?\n "trail shoes" and '
             f'"Shoe Laces Z"\n{short}\n\nAnswer: ', 0),
        qprp('Which of the following statements best describes the relation?\n "trail shoes" and '
             f'"Trail Shoe W"\n{short}\n\nAnswer: ', 2),
        # query 2: two judged products (needs 3 fillers)
        best("red kettle", "exact", ["Red Kettle Pro", "Blue Mug", "Sofa", "Tent"], 0),
        best("red kettle", "complement", ["Red Kettle Pro", "Blue Mug", "Sofa", "Tent"], 1),
        # substitute yes/no: "no" tells nothing
        {"input_field": "Answer yes if the product is a substitute for the query and no otherwise."
                        "\nQuery: red kettle\n Product: Garden Hose\n\n Answer:",
         "output_field": "no", "task_type": "multiple-choice", "metric": "bool", "task": "ecguide_qprj"},
    ]


@pytest.fixture()
def judged(tmp_path):
    p = tmp_path / "qpr.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in judgement_rows()))
    return load_records([str(p)])


def _ranking_for(rec, relation_order):
    """The answer text that lists the candidates in this order of relations."""
    rel = rec.extra["derived"]["relations"]
    left = list(range(len(rel)))
    picks = []
    for want in relation_order:
        i = next(i for i in left if rel[i] == want)
        left.remove(i)
        picks.append(i + 1)
    return ", ".join(map(str, picks))


def test_ranking_questions_have_shopbench_layout_and_score_by_ndcg(judged, tmp_path):
    rows, rep = derive_ranking(judged, fill=0)
    assert rep["supported"]["max_0_fillers"] == 1 and rep["supported"]["max_3_fillers"] == 2
    assert rep["records"]["skipped:substitute yes/no answered no (relation unknown)"] == 1
    assert len(rows) == 1
    rec = rows[0]
    # task12's layout: one of its two templates, 5 numbered candidates, weights per candidate
    pattern = re.escape(RANKING_TEMPLATES[0]).replace(r"\{query\}", "(.*)").replace(r"\{products\}", "(.*)")
    pattern2 = re.escape(RANKING_TEMPLATES[1]).replace(r"\{query\}", "(.*)").replace(r"\{products\}", "(.*)")
    m = re.fullmatch(pattern, rec.input_field, re.S) or re.fullmatch(pattern2, rec.input_field, re.S)
    assert m and "trail shoes" in m.groups()
    assert [int(x) for x in re.findall(r"^(\d)\. ", rec.input_field, re.M)] == [1, 2, 3, 4, 5]
    weight = {"exact": 1, "substitute": 0.1, "complement": 0.01, "irrelevant": 0}
    names = dict(re.findall(r"^(\d)\. (.*)$", rec.input_field, re.M))
    expect = {"Trail Runner X": 1, "Trail Shoe W": 1, "Hiking Boot Y": 0.1, "Shoe Laces Z": 0.01,
              "Garden Hose": 0}
    assert [expect[names[str(i)]] for i in range(1, 6)] == rec.output_field
    assert [weight[r] for r in rec.extra["derived"]["relations"]] == rec.output_field
    assert check_fields(rec.to_dict()) == []
    # written, loaded back as the derived card's task, scored by the evaluation engine
    out = tmp_path / "rank.jsonl"
    out.write_text(json.dumps(rec.to_dict()) + "\n")
    back = load_records([str(out)])
    assert (back[0].task, back[0].capability, back[0].metric) == (
        "derived_qpr_ranking", "user_behavior_alignment", "ndcg")
    answers = [
        _ranking_for(rec, ["exact", "exact", "substitute", "complement", "irrelevant"]),
        _ranking_for(rec, ["irrelevant", "substitute", "complement", "exact", "exact"]),
        _ranking_for(rec, ["exact", "irrelevant", "substitute", "complement", "exact"]),
        "1, 1, 2",  # a duplicate: the starter-kit parser gives [] -> 0
    ]
    scores = [s["score"] for s in score_outputs(back * 4, answers)]
    # gains 2^w - 1: exact 1, substitute 0.0717735, complement 0.0069556, irrelevant 0.
    # IDCG = 1/1 + 1/log2(3) + 0.0717735/2 + 0.0069556/log2(5) = 1.6698121
    # I,S,C,E,E: (0.0717735/log2(3) + 0.0069556/2 + 1/log2(5) + 1/log2(6)) / IDCG = 0.8662912/1.6698121
    # E,I,S,C,E: (1 + 0.0717735/2 + 0.0069556/log2(5) + 1/log2(6)) / IDCG = 1.4257351/1.6698121
    assert scores == pytest.approx([1.0, 0.5187956, 0.8538297, 0.0], abs=1e-6)


def test_fillers_are_irrelevant_products_of_other_queries(judged):
    rows, rep = derive_ranking(judged, fill=3, seed=1)
    assert rep["questions"] == 2 and rep["fillers_per_question"] == {0: 1, 3: 1}
    kettle = next(r for r in rows if r.extra["derived"]["query"] == "red kettle")
    rel = kettle.extra["derived"]["relations"]
    assert sorted(rel) == ["complement", "exact", "filler", "filler", "filler"]
    assert sorted(kettle.output_field) == [0, 0, 0, 0.01, 1]
    names = [n for _, n in re.findall(r"^(\d)\. (.*)$", kettle.input_field, re.M)]
    fillers = {n for n, r in zip(names, rel) if r == "filler"}
    assert fillers <= {"Trail Runner X", "Trail Shoe W", "Hiking Boot Y", "Shoe Laces Z", "Garden Hose"}
    # I (pred) = complement first, then exact: (0.0069556 + 1/log2(3)) / (1 + 0.0069556/log2(3))
    order = [rel.index("complement") + 1, rel.index("exact") + 1]
    s = score_outputs([kettle], [", ".join(map(str, order))])[0]["score"]
    assert s == pytest.approx(0.6378853 / 1.0043885, abs=1e-6)
    again, _ = derive_ranking(judged, fill=3, seed=1)
    assert [r.input_field for r in again] == [r.input_field for r in rows]  # seeded


def gen_rows():
    answers = ["Sturdy waterproof boots for muddy trails", "Waterproof hiking boots, great grip",
               "Comfortable boots that keep feet dry", "The blender is loud but crushes ice",
               "Blender works well for smoothies", "Phone case cracked after a week",
               "Cheap case, broke quickly", "Lovely soft blanket for the couch"]
    return [{"input_field": f"Produce a title for the review.\nReview: review number {i}\nOutput: ",
             "output_field": a, "task_type": "generation", "metric": "sent-transformer",
             "task": "ecguide_rts"} for i, a in enumerate(answers)]


def test_mcq_golds_are_the_rows_own_answers_and_hard_is_nearer(tmp_path):
    p = tmp_path / "gen.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in gen_rows()))
    recs = load_records([str(p)])
    hard, rep_h = derive_mcq(recs, options=4, difficulty="hard", seed=0)
    easy, rep_e = derive_mcq(recs, options=4, difficulty="easy", seed=0)
    answer_of = {r.id: r.output_field for r in recs}
    all_answers = set(answer_of.values())
    for rows in (hard, easy):
        assert len(rows) == len(recs)
        for r in rows:
            opts = dict(re.findall(r"^(\d)\. (.*)$", r.input_field, re.M))
            assert option_numbers(r.input_field) == [0, 1, 2, 3]
            assert opts[str(r.output_field)] == answer_of[r.extra["derived"]["from"]]  # gold correct
            assert len(set(opts.values())) == 4 and set(opts.values()) <= all_answers
            assert r.input_field.endswith("\nAnswer: ") and "Output:" not in r.input_field
            assert check_fields(r.to_dict()) == [] and r.task == "ecguide_rts_mcq"
            assert score_outputs([r], [str(r.output_field)])[0]["score"] == 1.0
    assert rep_h["distractor_similarity_mean"] > rep_e["distractor_similarity_mean"]
    boots = next(r for r in hard if "Sturdy waterproof" in answer_of[r.extra["derived"]["from"]])
    opts = re.findall(r"^\d\. (.*)$", boots.input_field, re.M)
    assert "Waterproof hiking boots, great grip" in opts  # the nearest answer is a hard distractor
    assert len(set(rep_h["gold_positions"])) > 1


def test_derive_cli_writes_rows_report_and_card(tmp_path):
    p = tmp_path / "gen.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in gen_rows()))
    out = tmp_path / "d" / "mcq.jsonl"
    res = CliRunner().invoke(app, ["data", "derive", "mcq", str(p), "--out", str(out), "--difficulty", "easy"])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 8
    card = (tmp_path / "d" / "cards" / "ecguide_rts_mcq.yaml").read_text()
    assert "derived" in card
    from shoptune.tasks import load_card
    c = load_card(tmp_path / "d" / "cards" / "ecguide_rts_mcq.yaml")
    assert (c.task_type, c.metric) == ("multiple-choice", "accuracy")
    res = CliRunner().invoke(app, ["data", "derive", "mcq", str(p), "--out", str(out), "--options", "11",
                                   "--overwrite"])
    assert res.exit_code == 1 and "options must be 2-10" in res.output
    # (#31) an existing file is replaced only with --overwrite; an input never
    before = out.read_bytes()
    res = CliRunner().invoke(app, ["data", "derive", "mcq", str(p), "--out", str(out)])
    assert res.exit_code == 1 and "mcq.jsonl: exists; --overwrite replaces it" in res.output
    res = CliRunner().invoke(app, ["data", "derive", "mcq", str(p), "--out", str(p), "--overwrite"])
    assert res.exit_code == 1 and "gen.jsonl: is an input" in " ".join(res.output.split())
    assert out.read_bytes() == before and len(p.read_text().splitlines()) == len(gen_rows())


@needs_shared
def test_derive_ranking_on_ec_guide_says_how_many_questions(tmp_path):
    out = tmp_path / "r.jsonl"
    res = CliRunner().invoke(app, ["data", "derive", "ranking", str(EC_GUIDE / "MCQ" / "QPRP.json"),
                                   str(EC_GUIDE / "MCQ" / "QPRJ.json"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".report.json").read_text())
    assert rep["judgements"] == 2262 and rep["queries"] == 1693
    assert rep["supported"]["max_0_fillers"] == 1 and rep["supported"]["max_3_fillers"] == 402
    assert rep["decontaminated_against"] == ["shopbench-dev"]  # the default
    assert len(out.read_text().splitlines()) == rep["questions"] - rep["decontaminated"] == 400
    assert "support 1 question(s) with all 5 candidates" in " ".join(res.output.split())


def test_derived_rows_flow_through_a_suite_and_a_mixture(judged, tmp_path):
    from shoptune.eval.suite import build_suite
    from shoptune.train.mixture import MixtureConfig, build_mixture

    rows, _ = derive_ranking(judged, fill=3)
    data = tmp_path / "rank.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in rows))
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s\nparts:\n  - name: derived\n    sources: [{data}]\n")
    recs, manifest = build_suite(suite)
    assert [r.task for r in recs] == ["derived_qpr_ranking"] * 2 and manifest["n_questions"] == 2
    mixed, man = build_mixture(MixtureConfig(sources=[str(data)], split_test=0.0, split_validation=0.0))
    assert man["tasks"] == {"derived_qpr_ranking": 2} and man["task_types"] == {"ranking": 2}


def test_ranking_experiment_holds_the_derived_test_questions_out():
    """Both arms train on ec-guide, whose QPRP/QPRJ judgements the derived test questions are
    built from: the mixture must be decontaminated against the whole ranking suite."""
    from shoptune.experiment.runner import load_spec
    from shoptune.train.config import load_config
    from tests.conftest import REPO
    spec = load_spec(REPO / "configs" / "experiments" / "ranking.yaml")
    for cell in spec.cells:
        cfg = load_config(REPO / "configs" / "train" / "demo.yaml", spec.overrides + cell.overrides)
        assert "suite:ranking" in cfg.mixture.decontaminate_against and spec.suite == "ranking"


def test_derive_ranking_hint_only_offers_more(judged, tmp_path):
    p = tmp_path / "qpr.jsonl"
    p.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in judged))
    res = CliRunner().invoke(app, ["data", "derive", "ranking", str(p), "--out", str(tmp_path / "r.jsonl"),
                                   "--against", "none"])
    out = " ".join(res.output.split())
    assert res.exit_code == 0 and "to have more than 2 questions: --target N" in out, res.output
    res = CliRunner().invoke(app, ["data", "derive", "ranking", str(p), "--out", str(tmp_path / "r.jsonl"),
                                   "--against", "none", "--target", "2", "--overwrite"])
    assert "the data supports 2, nothing to synthesize" in " ".join(res.output.split())
