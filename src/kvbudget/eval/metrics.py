"""Answer scoring: exact, contains, token F1 (SQuAD style), multiple choice, and RULER's
string_match_all (the share of several required values found in the answer)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from ..errors import KVBudgetError

_ARTICLES = {"a", "an", "the"}
# Separators that carry meaning inside a token: "1,000" is one number, "3.14" is not "3 14",
# "a1b2-c3d4" is one UUID-like key. Everywhere else punctuation becomes a space, so that
# "code:4721" still contains the word "4721".
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_KEEP_INNER = re.compile(r"(?<=\d)\.(?=\d)|(?<=[^\W_])-(?=[^\W_])")


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


def normalize(text: str) -> str:
    """Lowercase, strip punctuation and the articles a/an/the, collapse whitespace.

    Digits are kept, thousands separators dropped ("1,000" -> "1000"), and decimal points and
    hyphens between letters/digits are kept ("3.14", "a1b2-c3d4").
    """
    text = _DIGIT_COMMA.sub("", text.lower())
    kept = {m.start() for m in _KEEP_INNER.finditer(text)}
    chars = [ch if (i in kept or not _is_punct(ch)) else " " for i, ch in enumerate(text)]
    words = "".join(chars).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def _norm_or_raw(text: str) -> str:
    # A gold answer made only of articles/punctuation would normalize to "" and match anything.
    return normalize(text) or " ".join(text.lower().split())


def _exact(pred: str, gold: str) -> float:
    return float(_norm_or_raw(pred) == _norm_or_raw(gold))


def _contains(pred: str, gold: str) -> float:
    g = _norm_or_raw(gold)
    # Padding with spaces makes the match respect word boundaries: "12" is not in "4712".
    return float(f" {g} " in f" {_norm_or_raw(pred)} ")


def _f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


_LETTERS = "A-H"  # "I" is excluded: as a pronoun it would be read as a choice.
_EXPLICIT = [
    re.compile(rf"\(([{_LETTERS}])\)", re.IGNORECASE),                       # (B)
    re.compile(rf"(?<!\w)([{_LETTERS}])(?=[.):\]](?:\s|$))"),                 # B) / B. / B:
    re.compile(rf"\b(?:answer|option|choice)\s*(?:is\s*)?:?\s*\(?([{_LETTERS}])(?!\w)",
               re.IGNORECASE),                                               # answer is B
]
_BARE = re.compile(rf"(?<![\w'])([{_LETTERS}])(?![\w'])")
_GOLD_OPTION = re.compile(r"^\(?([A-Za-z])[).:]\s*(.+)$", re.DOTALL)
_LEADING_MARK = re.compile(r"^\s*\(?[A-Za-z][).:]\s*")


def choice_letter(prediction: str) -> str | None:
    """The first choice letter in a prediction ("B", "(B)", "B) Paris", "The answer is B")."""
    text = prediction.strip()
    stripped = text.strip(" .)(:")
    if len(stripped) == 1 and stripped.isalpha():
        return stripped.upper()
    hits = [m for pat in _EXPLICIT if (m := pat.search(text))]
    if hits:
        return min(hits, key=lambda m: m.start(1)).group(1).upper()
    m = _BARE.search(text)
    return m.group(1) if m else None


def _choice(pred: str, gold: str) -> float:
    gold = gold.strip()
    letter, option = None, None
    if len(gold.strip("()")) == 1 and gold.strip("()").isalpha():
        letter = gold.strip("()").upper()
    elif m := _GOLD_OPTION.match(gold):
        letter, option = m.group(1).upper(), m.group(2)
    else:
        option = gold
    if letter is not None and choice_letter(pred) == letter:
        return 1.0
    if option is not None:
        n = normalize(option)
        if n and n in (normalize(pred), normalize(_LEADING_MARK.sub("", pred, count=1))):
            return 1.0
    return 0.0


def _string_match_all(pred: str, answers: list[str]) -> float:
    # RULER's metric, as its reference scorer computes it: a case-insensitive substring test per
    # required value, averaged (no normalisation, no word boundaries).
    text = pred.lower()
    return sum(gold.lower() in text for gold in answers) / len(answers)


_SCORERS = {"exact": _exact, "contains": _contains, "f1": _f1, "choice": _choice}
# Metrics that score the whole answer list at once: every answer is required, not one of them.
_ALL_OF = {"string_match_all": _string_match_all}
METRICS = (*_SCORERS, *_ALL_OF)


def score(prediction: str, answers: list[str], metric: str) -> float:
    """Score a prediction in [0, 1] against gold answers with a metric.

    metric: ``exact`` (normalized equality), ``contains`` (normalized gold occurs in the
    normalized prediction on word boundaries), ``f1`` (SQuAD token F1) or ``choice`` (first
    choice letter equals the gold letter, or the prediction is the gold option text): the best
    over the gold answers, any of which is right; ``string_match_all`` (RULER): every answer is a
    required value and the score is the share of them found in the prediction, case-insensitive.
    """
    if metric not in METRICS:
        raise KVBudgetError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if not answers:
        return 0.0
    if metric in _ALL_OF:
        return _ALL_OF[metric](prediction, answers)
    return max(_SCORERS[metric](prediction, gold) for gold in answers)


def reference_answer(answers: list[str], metric: str) -> str:
    """The one answer text a turn is teacher-forced on (answer retention) and that multi-turn
    appends to the conversation: all required values for ``string_match_all``, else the first."""
    return ", ".join(answers) if metric in _ALL_OF else answers[0]
