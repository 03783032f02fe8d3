import pytest

from shoptune.eval.parsers import (parse_bool, parse_generation, parse_multiple_choice, parse_ner,
                                   parse_ranking, parse_retrieval)


@pytest.mark.parametrize("text,want", [(" 2abc", 2), ("\n 3", 3), ("", -1), ("x1", -1),
                                       ("   ", -1), (" " * 5000 + "3", -1), ("10", 1)])
def test_multiple_choice(text, want):
    assert parse_multiple_choice(text) == want


@pytest.mark.parametrize("text,want", [
    ("1, 2, 3, 4, 5", [1, 2, 3, 4, 5]),
    ("5,4,6,3,2,1", [5, 4, 3, 2, 1]),          # 6 > 5 dropped
    ("1, 1, 2", []),                           # duplicate -> []
    ("[1, 2]", [1, 2]),                        # brackets removed before splitting
    ("1 2, 3", [3]),                           # "1 2" is not an int
    ("1, 2, 3, 4, 5, 1", [1, 2, 3, 4, 5]),     # first 5 taken before the duplicate check
    ("2, 3, 3, 4, 5, 1", []),
    ("0, 1", [0, 1]),
    ("answer: 3,1", [3, 1]),
    ("", []),
])
def test_ranking(text, want):
    assert parse_ranking(text) == want


@pytest.mark.parametrize("text,want", [("3, 11, 7, 9", [3, 11, 7]), ("a1b,2", [1, 2]), ("12", [12]),
                                       ("4, 4, 4", [4, 4, 4]), ("x" * 5000 + "1", [])])
def test_retrieval(text, want):
    assert parse_retrieval(text) == want


@pytest.mark.parametrize("text,want", [("['a', 'B ']", ["a", "B "]), ("nike, , adidas ", ["nike", "adidas"]),
                                       ("[1,2]", ["[1", "2]"]), ("", []), ("  Nike  ", ["Nike"]),
                                       ("['x', 1]", ["['x'", "1]"])])
def test_ner(text, want):
    assert parse_ner(text) == want


def test_generation_and_bool():
    assert parse_generation("  hi there \n") == "hi there"
    assert parse_generation("y" * 6000) == "y" * 5000
    assert parse_bool("Yes, they are.") == "yes" and parse_bool(" no") == "no"
    assert parse_bool("maybe") == "" and parse_bool("") == ""
