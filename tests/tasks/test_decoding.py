"""The shared decoding core: a task card's prompt and length limit reach training, evaluation
and serving alike (one function each builds the prompt and the plan for all three)."""
from shoptune.decoding import STARTER_KIT_PREFIX, build_prompts, card_render, plan_for
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
    from shoptune.decoding import Plan, finish
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
