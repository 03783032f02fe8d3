"""Own tasks' answers: JSON closed at the budget, schemas inferred from data, the metrics on
hand-worked cases, and constrained decoding that gives a valid answer whatever the model's
scores (random logits through the real tokenizer and xgrammar)."""
import json

import pytest
import torch

from shoptune.eval.metrics import field_f1_counts, micro_f1, score_batch, task_metric
from shoptune.tasks import Grammar, _json, gbnf
from shoptune.tasks.card import TaskCard

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["brand", "colors"],
          "properties": {"brand": {"type": "string", "maxLength": 8},
                         "colors": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                    "maxItems": 2},
                         "size": {"type": "string", "maxLength": 10}}}


@pytest.mark.parametrize("text, closed", [
    ('{"a": ["x", "y"', '{"a": ["x", "y"]}'),
    ('{"a": ["x"], "b": "hel', '{"a": ["x"], "b": "hel"}'),  # a cut string value is kept, closed
    ('{"a": ["x"], "ke', '{"a": ["x"]}'),  # a cut key is dropped
    ('{"a": 12', '{"a": 12}'),
    ('{"a": tr', '{}'),
    ('{"a": "x\\u00', '{"a": "x"}'),  # a cut escape is dropped
    ('{"a": "x\\\\', '{"a": "x\\\\"}'),  # a complete escaped backslash stays
    ('{"a": {"b": [1, 2', '{"a": {"b": [1, 2]}}'),
])
def test_a_json_prefix_is_closed_on_its_last_complete_value(text, closed):
    assert _json._cut_prefix(text) == closed
    json.loads(closed)


def test_parse_closes_fills_and_bounds_into_a_schema_valid_answer():
    assert _json.parse('{"brand": "Acme", "colors": ["red", "red", "red"', SCHEMA) == \
        {"brand": "Acme", "colors": ["red", "red"]}  # cut at maxItems
    assert _json.parse(' {"colors": ["red"], "brand": "X"} trailing', SCHEMA) == {"brand": "X", "colors": ["red"]}
    assert _json.parse('{"brand": "Acmeeeeeeeeee"', SCHEMA) == {"brand": "Acmeeeee", "colors": []}
    assert _json.parse("no json here", SCHEMA) is None
    assert _json.parse('{"brand": 3, "colors": []}', SCHEMA) is None  # wrong type: not repaired
    assert _json.dumps({"colors": [], "brand": "é"}, SCHEMA) == '{"brand": "é", "colors": []}'
    assert _json.minimal(SCHEMA) == {"brand": "", "colors": []}


def test_infer_schema_types_keys_bounds():
    s = _json.infer_schema([{"n": 1, "x": 2.5, "t": ["ab"], "o": {"k": True}}, {"n": 2, "x": 3, "t": []}])
    assert s == {"type": "object", "additionalProperties": False, "required": ["n", "x", "t"],
                 "properties": {"n": {"type": "integer"}, "x": {"type": "number"},
                                "t": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                      "maxItems": 2},
                                "o": {"type": "object", "additionalProperties": False, "required": ["k"],
                                      "properties": {"k": {"type": "boolean"}}}}}
    assert _json.infer_schema(["a", 1]) == {"type": ["integer", "string"]}


def test_field_f1_by_hand():
    gold = {"brand": "Acme", "colors": ["red", "blue"], "materials": []}
    # brand right; colors: red right, green wrong, blue missed; an extra key's value is a false positive
    pred = {"brand": "acme ", "colors": ["Red", "green"], "materials": [], "size": "XL"}
    assert field_f1_counts(pred, gold) == (2, 2, 1)
    assert field_f1_counts(None, gold) == (0, 0, 3)  # unparseable: every gold value missed
    assert micro_f1([field_f1_counts(pred, gold), field_f1_counts(None, gold)]) == pytest.approx(
        2 * (2 / 4) * (2 / 6) / (2 / 4 + 2 / 6))
    assert score_batch("valid json", [pred, None], [gold, gold]) == [1.0, 0.0]


def test_macro_f1_by_hand():
    golds = ["A", "A", "B", "C"]
    preds = ["A", "B", "B", None]
    # A: P=1 R=.5 F=2/3; B: P=.5 R=1 F=2/3; C: F=0; (none): F=0 -> mean over the 4 labels seen
    assert task_metric("macro f1", preds, golds) == pytest.approx((2 / 3 + 2 / 3 + 0 + 0) / 4)
    assert task_metric("accuracy", preds, golds) == pytest.approx(0.5)


def card(**kw) -> TaskCard:
    base = dict(name="t", version=1, capability="concept_understanding", description="d",
                inputs=[{"name": "title"}], prompt="{title}")
    return TaskCard(**{**base, **kw})


def test_label_and_labels_parsing():
    c = card(output="label", labels=["Home", "Home & Kitchen", "Toys"])
    out = c.output_type
    assert out.parse(" Home & Kitchen", "accuracy", c) == "Home & Kitchen"
    assert out.parse("toys", "accuracy", c) == "Toys"
    assert out.parse("Home & Ki", "accuracy", c) == "Home & Kitchen"  # cut by the budget
    assert out.parse("Garden", "accuracy", c) is None
    c2 = card(output="labels", labels=["a", "b, c", "d"])
    assert c2.output_type.parse(' ["d", "b, c", "d", "zz"]', "micro f1", c2) == ["d", "b, c"]
    assert c2.output_type.parse('["d", "a', "micro f1", c2) == ["d", "a"]
    assert c2.output_type.answer_text(["b, c"], "micro f1", c2) == '["b, c"]'


@pytest.fixture(scope="module")
def tok():
    from shoptune.models import load_tokenizer
    return load_tokenizer("smollm2-135m")


def free_run(tok, grammar: Grammar, steps: int, seed: int) -> str:
    """Decode under ``grammar`` from random scores (what an untuned model may as well be)."""
    from shoptune.decoding import GrammarProcessor
    g = torch.Generator().manual_seed(seed)
    proc = GrammarProcessor(tok, [grammar, None], prompt_len=1)
    ids = torch.tensor([[1], [1]])
    out = []
    for _ in range(steps):
        scores = torch.randn(2, 49152, generator=g) * 5
        scores = proc(ids, scores)
        nxt = scores.argmax(-1)
        if int(nxt[0]) == tok.eos_token_id:
            break
        out.append(int(nxt[0]))
        ids = torch.cat([ids, nxt[:, None]], 1)
    return tok.decode(out)


@pytest.mark.parametrize("seed", range(6))
def test_any_scores_give_a_label_and_schema_valid_json(tok, seed):
    labels = ("Home", "Home & Kitchen", "Beauty & Personal Care", "Toys & Games")
    c = card(output="label", labels=list(labels))
    text = free_run(tok, Grammar(gbnf.choice(labels)), steps=40, seed=seed)
    assert text.strip() in labels and c.output_type.parse(text, "accuracy", c) == text.strip()
    js = card(output="json", schema=SCHEMA)
    for steps in (12, 400):  # cut by a small budget, or finished by the grammar
        text = free_run(tok, Grammar(gbnf.json_schema(SCHEMA)), steps=steps, seed=seed)
        answer = js.output_type.parse(text, "field f1", js)
        assert answer is not None and _json.first_error(answer, SCHEMA) is None, text
        if steps == 400:  # the grammar itself ended a valid document
            assert json.loads(text) == answer


def accepts(tok, grammar_text: str, text: str) -> bool:
    from shoptune.decoding import grammars_for
    g = grammars_for(tok, 49152)
    m = g.matcher(Grammar(grammar_text))
    ok = m.consume_tokens(g.tokenizer.tokenize_str(text)) and not m.is_error()
    return bool(ok) and m.is_accepting()


def test_the_grammars_allow_exactly_the_valid_answers(tok):
    g = gbnf.json_schema({**SCHEMA, "properties": {**SCHEMA["properties"], "n": {"type": ["integer", "null"]}}})
    for text, ok in ((' {"brand": "Acme", "colors": ["red"]}', True),
                     ('{"brand": "Acme", "colors": [], "size": "XL", "n": 3}', True),
                     ('{"brand": "Acme", "colors": [], "n": null}', True),
                     ('{"brand": "A\\tb", "colors": []}', True),  # an escape: one character
                     ('{"colors": [], "brand": "A"}', False),  # keys in the schema's order
                     ('{"brand": "Acme"}', False),  # a required key missing
                     ('{"brand": "Acmeeeeeeeeeee", "colors": []}', False),  # over maxLength
                     ('{"brand": "A", "colors": ["a","b"]}', False),  # json.dumps' separators only
                     ('{"brand": "A", "colors": ["a", "b", "c"]}', False),  # over maxItems
                     ('{"brand": "A\tb", "colors": []}', False)):  # a raw control character
        assert accepts(tok, g, text) == ok, text
    c = gbnf.choice(["Home", "Home & Kitchen", 'Say "hi"'])
    assert [accepts(tok, c, t) for t in (" Home", "Home & Kitchen", 'Say "hi"', "Garden", "Home &")] == \
        [True, True, True, False, False]
    s = gbnf.ordered_subset(["a", "b", "c"], 2)
    assert [accepts(tok, s, t) for t in ("[]", '["a", "c"]', '["c", "a"]', '["a", "b", "c"]', '["a", "a"]')] == \
        [True, True, False, False, False]


@pytest.mark.parametrize("schema, says", [
    ({"type": "string", "pattern": "^[a-z]+$"}, "'pattern' cannot be enforced while decoding"),
    ({"type": "integer", "minimum": 0}, "'minimum' cannot be enforced"),
    ({"type": "array"}, "an array needs `items`"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required key 'x' has no schema"),
    ({"oneOf": [{"type": "string"}]}, "'oneOf' cannot be enforced"),
])
def test_a_schema_no_grammar_can_enforce_is_refused_on_the_card(schema, says):
    with pytest.raises(gbnf.GrammarError, match=says):
        gbnf.json_schema(schema)
    with pytest.raises(ValueError, match="schema: "):
        card(output="json", schema=schema)
