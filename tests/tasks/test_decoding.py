"""The shared decoding core: a task card's prompt and length limit reach training, evaluation
and serving alike (one function each builds the prompt and the plan for all three)."""
from shoptune.decoding import STARTER_KIT_PREFIX, build_prompts
from shoptune.tasks import render as card_render, plan_for
from shoptune.records import Record

CARD = """name: shout_summary
version: 1
capability: concept_understanding
task_type: generation
metric: rougel
description: summaries, asked loudly
source: {dataset: custom}
prompt: "SUMMARISE THIS:\\n{input_field}\\nSUMMARY:"
max_new_tokens: 7
"""


def rec(task: str, text: str = "A red jacket, waterproof, size M.") -> Record:
    return Record(input_field=text, output_field="red jacket", task_type="generation",
                  metric="rougel", task=task, capability="concept_understanding", source="t")


def test_card_prompt_and_limit_reach_every_user(tmp_path, monkeypatch):
    (tmp_path / "shout.yaml").write_text(CARD)
    monkeypatch.setenv("SHOPTUNE_TASKS_PATH", str(tmp_path))
    r = rec("shout_summary")
    want = "SUMMARISE THIS:\nA red jacket, waterproof, size M.\nSUMMARY:"
    assert card_render(r) == want
    assert build_prompts([r], "starter-kit") == [STARTER_KIT_PREFIX + want]  # training and eval
    assert plan_for(r).max_new_tokens == 7 and plan_for(r, 3).max_new_tokens == 3
    from shoptune.serve import tasks as task_io
    from shoptune.tasks import get_card
    card = get_card("shout_summary")
    inp = task_io.input_model(card).model_validate({"input_field": r.input_field})
    served = task_io.to_record(card, inp)
    assert build_prompts([served], "starter-kit") == build_prompts([r], "starter-kit")
    assert task_io.plan(card, inp, served) == plan_for(r)  # the task endpoint decodes the same way


def test_a_task_without_a_card_is_its_input_field_and_the_type_default():
    r = rec("no_such_task_card")
    assert card_render(r) == r.input_field
    assert plan_for(r).max_new_tokens == 32  # rougel's default


def test_finish_gives_the_same_line_wherever_generation_stopped():
    from shoptune.tasks import Plan, finish
    line = Plan("generate", stop_newline=True)
    stopped = "\n The entity is a product type. \n"          # stopped at the line end
    ran_on = "\n The entity is a product type. \nMore text"  # a client without stop strings
    assert finish(stopped, line) == finish(ran_on, line) == "The entity is a product type."
    assert finish(" keep  spacing \n", Plan("generate")) == " keep  spacing \n"  # not a line task


def test_best_choice_ignores_a_bare_space_that_starts_every_option():
    """SmolLM2 spells " 2" as " " + "2": the space token must not stand for any option, or a
    model whose top token is " " answers the first option whatever it prefers among the digits
    (what cost the trained adapter 2 of 8 multiple-choice answers on task2/task18; #21 item 5)."""
    import torch

    from shoptune.decoding import best_choice, choice_token_ids, choice_tokens
    from shoptune.models import load_tokenizer
    tok = load_tokenizer("smollm2-135m")
    space = tok.encode(" ", add_special_tokens=False)[0]
    choices = ("0", "1", "2", "3")
    assert all(space not in choice_token_ids(tok, c) for c in choices)
    logits = torch.zeros(len(tok))
    logits[space] = 9.0                          # the model's top token: a bare space
    logits[tok.convert_tokens_to_ids("2")] = 5.0  # among the options it prefers "2"
    assert best_choice(logits, choices, tok) == "2"
    # a token two options share stands for neither
    shared = choice_tokens(tok, ("Apple pie", "Apple tart", "banana"))
    first = tok.encode("Apple pie", add_special_tokens=False)[0]
    assert tok.encode("Apple tart", add_special_tokens=False)[0] == first and first not in shared


# ----------------------------------------------------------------------------- issue #20: list numbers

class CharTok:
    """A tokenizer with one token per character (digits, ',', ' ', newline) and an end token."""
    eos_token_id = 0
    chars = "0123456789, \n"

    def convert_tokens_to_ids(self, t):
        return self.chars.index(t) + 1

    def encode(self, text, add_special_tokens=False):
        return [self.chars.index(c) + 1 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[int(i) - 1] for i in ids if int(i))


def retrieval(text: str) -> Record:
    return Record(input_field=text, output_field=[1], task_type="retrieval", metric="hit rate@3",
                  task="no_such_task_card", capability="shopping_reasoning", source="t")


BIG = 123456789012345678901234567890


def test_retrieval_answers_are_the_listed_numbers_and_fit_the_limit():
    from shoptune.decoding import NumberListProcessor
    from shoptune.tasks.outputs.numbers import number_list_tokens
    plan = plan_for(retrieval(f"Which one?\n1. hat\n{BIG}. shoe\n7. bag\nOutput: "))
    assert plan.values == (1, 7, BIG) and plan.max_value == BIG and plan.count == 3
    assert plan.max_new_tokens >= number_list_tokens(3, BIG) == 3 * 30 + 5  # room for three of them
    assert plan_for(retrieval("Which?\n1. a\n2. b\n3. c\nOutput: ")).max_new_tokens == 16  # as before
    tok = CharTok()
    p = NumberListProcessor(tok, 0, plan.max_value, plan.count, plan.unique, plan.values)

    def allowed(text):
        return "".join(sorted(tok.decode([t]) if t else "<end>" for t in p.allowed(text)))
    assert allowed("") == "17"  # the first digits of 1, 7 and BIG (never 9999...)
    assert allowed("1") == ",2"  # 1 is whole (a comma follows), or BIG goes on
    assert allowed("12") == "3" and allowed(str(BIG)[:-1]) == "0" and allowed(str(BIG)) == ","
    assert allowed(f"{BIG},") == " " and allowed(f"{BIG}, 7, ") == "17"
    assert allowed(f"{BIG}, 7, 1") == "\n2<end>"  # three numbers: the answer ends (or BIG goes on)
    ranked = NumberListProcessor(tok, 0, 5, 3, True, (2, 12, 5))  # unique: no number twice
    assert "".join(sorted(tok.decode([t]) for t in ranked.allowed("12, 2, "))) == "5"
    old = NumberListProcessor(tok, 0, 12, 3, False)  # without values: 1..max_value, as before
    assert "".join(sorted(tok.decode([t]) for t in old.allowed("1"))) == ",012"
    # (#31 item 20) once the line has ended nothing may follow, with or without stop_newline
    assert allowed(f"{BIG}, 7, 1\n") == "<end>" and old.allowed("1, 2\n") == [tok.eos_token_id]
    assert old.allowed("3\n") == [tok.eos_token_id]  # (a short list ended early: still nothing after)


def test_a_numbered_line_with_too_many_digits_is_a_plan_error_naming_the_line():
    import pytest

    from shoptune.tasks.outputs import MAX_LIST_DIGITS

    from shoptune.tasks import PlanError
    for task_type in ("retrieval", "multiple-choice", "ranking"):
        r = Record(input_field="Pick one.\n0. a\n" + "7" * 4301 + ". b\n", output_field=0,
                   task_type=task_type, metric="accuracy", task="t", capability="c", source="t")
        with pytest.raises(PlanError, match=f"line 3 starts with a 4301-digit number; numbered lines "
                                            f"\\(options, candidates\\) may start with at most {MAX_LIST_DIGITS}"):
            plan_for(r)
    assert plan_for(retrieval("q\n" + "9" * MAX_LIST_DIGITS + ". fine\n")).values == (10**MAX_LIST_DIGITS - 1,)
