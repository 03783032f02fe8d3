import pytest

from shoptune.tasks import CardError, all_cards, card_for_shopbench_task, get_card, load_card
from shoptune.records import CAPABILITIES


def test_every_shipped_card_loads_and_covers_all_capabilities():
    cards = all_cards()
    assert len(cards) >= 25
    assert {c.capability for c in cards.values()} == set(CAPABILITIES)
    assert all(c.version >= 1 for c in cards.values())
    for i in range(1, 19):
        assert card_for_shopbench_task(f"task{i}") is not None


def test_card_render_and_lookup():
    c = get_card("shopbench_task4")
    assert c.task_type == "named_entity_recognition" and c.render("Q") == "Q"
    with pytest.raises(KeyError, match="tasks ls"):
        get_card("nope")


def test_bad_card_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nversion: 1\ncapability: cooking\ntask_type: generation\nmetric: bleu\n"
                 "description: d\nsource: {dataset: custom}\n")
    with pytest.raises(CardError, match="bad.yaml: invalid task card: capability"):
        load_card(p)
    p.write_text("- a list\n")
    with pytest.raises(CardError, match="must be a YAML mapping"):
        load_card(p)
