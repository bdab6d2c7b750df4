"""Answer scoring: normalisation and the four metrics on tricky cases."""

from __future__ import annotations

import pytest

from kvbudget.errors import KVBudgetError
from kvbudget.eval.metrics import choice_letter, normalize, score


@pytest.mark.parametrize("text,expected", [
    ("The Code is 4721.", "code is 4721"),
    ("  An   apple,\ta pear!  ", "apple pear"),
    ("code:4721", "code 4721"),
    ("It costs 1,000 dollars", "it costs 1000 dollars"),
    ("pi is 3.14.", "pi is 3.14"),
    ("key a1b2c3d4-9f0e here", "key a1b2c3d4-9f0e here"),
    ("--dashes-- and (parens)", "dashes and parens"),
    ("“Curly” quotes — and ¿unicode?", "curly quotes and unicode"),
    ("", ""),
])
def test_normalize(text, expected):
    assert normalize(text) == expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("Paris", "paris", 1.0),
    ("The Paris.", "Paris", 1.0),  # articles and punctuation dropped
    ("Paris, France", "Paris", 0.0),
    ("4,721", "4721", 1.0),
])
def test_exact(pred, gold, expected):
    assert score(pred, [gold], "exact") == expected


@pytest.mark.parametrize("pred,gold,expected", [
    ("The code for the blue door is 4721.", "4721", 1.0),
    ("The code is 4712.", "12", 0.0),  # numbers inside longer numbers do not count
    ("The code is 4712.", "471", 0.0),
    ("Code:4721!", "4721", 1.0),
    ("It is 12.", "12", 1.0),
    ("She now lives in OSLO, Norway", "Oslo", 1.0),
    ("The value is 8f3a21c0-77b1.", "8f3a21c0-77b1", 1.0),
    ("The value is 8f3a21c0-77b2.", "8f3a21c0-77b1", 0.0),
    ("I do not know", "know nothing", 0.0),
    ("new york city", "New York", 1.0),
])
def test_contains(pred, gold, expected):
    assert score(pred, [gold], "contains") == expected


def test_f1_partial_overlap():
    assert score("the big red dog", ["red dog"], "f1") == pytest.approx(0.8)
    assert score("red dog", ["red dog"], "f1") == 1.0
    assert score("cat", ["red dog"], "f1") == 0.0
    assert score("dog dog dog", ["dog"], "f1") == pytest.approx(0.5)  # repeated tokens count once
    assert score("", ["dog"], "f1") == 0.0


@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("b", "B"), ("(B)", "B"), ("B)", "B"), ("B) Paris", "B"), ("B. Paris", "B"),
    ("The answer is B", "B"), ("Answer: C.", "C"), ("I think the answer is (D).", "D"),
    ("The correct option is A.", "A"), ("Paris", None), ("I am not sure", None),
])
def test_choice_letter(pred, letter):
    assert choice_letter(pred) == letter


@pytest.mark.parametrize("pred,gold,expected", [
    ("B", "B", 1.0),
    ("(b)", "B", 1.0),
    ("The answer is B, Paris.", "B", 1.0),
    ("A) London", "B", 0.0),
    ("Paris", "B) Paris", 1.0),  # the option text of the gold letter
    ("B) Paris", "Paris", 1.0),
    ("London", "Paris", 0.0),
    ("C", "(C)", 1.0),
])
def test_choice(pred, gold, expected):
    assert score(pred, [gold], "choice") == expected


def test_max_over_answers_and_range():
    assert score("Lyon", ["Oslo", "Lyon"], "exact") == 1.0
    for metric in ("exact", "contains", "f1", "choice"):
        assert 0.0 <= score("anything at all", ["x", "y z"], metric) <= 1.0


def test_unknown_metric():
    with pytest.raises(KVBudgetError, match="unknown metric 'fuzzy'"):
        score("a", ["a"], "fuzzy")


@pytest.mark.parametrize("pred,gold,expected", [
    ("ABCDE, FGHIJ, KLMNO.", "ABCDE FGHIJ KLMNO", 1.0),  # case and punctuation
    ("ABCDE, FGHIJ and KLMNO.", "ABCDE FGHIJ KLMNO", pytest.approx(6 / 7)),  # "and" costs precision
    ("klmno fghij abcde", "ABCDE FGHIJ KLMNO", 1.0),  # order does not matter
    ("VAR ABCDE, VAR FGHIJ", "ABCDE FGHIJ", pytest.approx(2 / 3)),  # the "VAR" words cost precision
    ("ABCDE", "ABCDE FGHIJ KLMNO", pytest.approx(0.5)),
    ("ABCDEF", "ABCDE", 0.0),  # no partial words
])
def test_f1_over_names(pred, gold, expected):
    assert score(pred, [gold], "f1") == expected


@pytest.mark.parametrize("pred,gold,metric,expected", [
    ("9,993", "9993", "exact", 1.0),
    ("9993.", "9993", "exact", 1.0),
    ("The largest number is 9993.", "9993", "exact", 0.0),  # exact means the number only
    ("The largest number is 9993.", "9993", "contains", 1.0),
    ("99930", "9993", "contains", 0.0),
    ("-9993", "9993", "exact", 1.0),  # a sign is punctuation to the normaliser
    ("9993.5", "9993", "exact", 0.0),  # a decimal is another number
    ('"kx7pq2mzt4"', "kx7pq2mzt4", "contains", 1.0),
    ("KX7PQ2MZT4", "kx7pq2mzt4", "contains", 1.0),
    ("kx7pq2mzt", "kx7pq2mzt4", "contains", 0.0),
])
def test_numbers_and_strings(pred, gold, metric, expected):
    assert score(pred, [gold], metric) == expected
