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
    with pytest.raises(CardError, match=r"bad.yaml:3: capability: Input should be .concept_understanding"):
        load_card(p)
    p.write_text("- a list\n")
    with pytest.raises(CardError, match="must be a YAML mapping"):
        load_card(p)


def test_cards_for_file_is_all_cards_filtered_in_order_including_an_extra_card_dir(tmp_path, monkeypatch):
    """The per-row lookup is an index built once: it must be what filtering all_cards() gives,
    in the same order, and see a card directory added through SHOPTUNE_TASKS_PATH."""
    from shoptune.tasks import cards_for_file

    def filtered():
        out = {}
        for c in all_cards().values():
            out.setdefault((c.source.dataset, c.source.file), []).append(c.name)
        return out

    (tmp_path / "acr_extra.yaml").write_text(
        "name: ecguide_acr_extra\nversion: 1\ncapability: concept_understanding\ntask_type: generation\n"
        "metric: rougel\ndescription: d\nsource: {dataset: ec-guide, file: MCQ/ACR.json, task_type: ranking}\n")
    for extra in (False, True):
        if extra:
            monkeypatch.setenv("SHOPTUNE_TASKS_PATH", str(tmp_path))
        want = filtered()
        assert len(want) >= 20
        for (dataset, file), names in want.items():
            got = cards_for_file(dataset, file)
            assert [c.name for c in got] == names
            got.clear()  # a caller's list is its own: the index is not touched
            assert [c.name for c in cards_for_file(dataset, file)] == names
        assert ("ecguide_acr_extra" in want[("ec-guide", "MCQ/ACR.json")]) == extra
    assert cards_for_file("ec-guide", "no/such.json") == []
