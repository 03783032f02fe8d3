from shoptune.data.loaders import load_records
from shoptune.eval.parsers import parse
from shoptune.models import load_tokenizer
from shoptune.train.format import IGNORE, answer_text, encode_example
from tests.conftest import DEV, needs_shared


@needs_shared
def test_answers_round_trip_through_the_parsers():
    for rec in load_records(DEV):
        ans = answer_text(rec)
        parsed = parse(rec.task_type, rec.metric, ans)
        if rec.task_type == "ranking":
            # the gold permutation puts the most relevant first
            rel = [rec.output_field[i - 1] for i in parsed]
            assert rel == sorted(rec.output_field, reverse=True)
        elif rec.task_type == "named_entity_recognition":
            assert parsed == rec.output_field
        else:
            assert parsed == (rec.output_field.strip() if isinstance(rec.output_field, str) else rec.output_field)


def test_answer_only_loss_mask_is_exact():
    tok = load_tokenizer("smollm2-135m")
    prompt, answer = "Question: which brand?\nAnswer: ", "nike"
    ex = encode_example(prompt, answer, tok, max_length=64)
    p = tok.encode(prompt, add_special_tokens=False)
    a = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
    assert ex["input_ids"] == p + a
    assert ex["labels"] == [IGNORE] * len(p) + a
    # too long: the prompt is cut from the left, the answer survives whole
    ex = encode_example("word " * 200 + prompt, answer, tok, max_length=32)
    assert len(ex["input_ids"]) == 32 and ex["labels"][-len(a):] == a
    assert sum(x != IGNORE for x in ex["labels"]) == len(a)
