"""More SCBench-style generators: prefix_suffix, multihop, math_find.

Same contract as the generators of ``generators.py``: ``gen(tok, n, length, seed, **options) -> list[Task]``, seeded,
offline, contexts ``length`` tokens long (within 5%) as counted by ``tok``, every answer present
in its context. Each task's list or statements can fill the whole context (SCBench's layout) or
sit in natural filler prose (``prose.document``); the defaults are the layouts on which the
default model (SmolLM2-135M) answers with the full cache (docs/benchmarks.md, calibration).
"""

from __future__ import annotations

import itertools
import random
import string
from collections.abc import Callable
from typing import Any

from ..errors import KVBudgetError
from .prose import document, ntok, spread
from .taskfile import Question, Task


def _check_layout(layout: str, known: tuple[str, ...]) -> None:
    if layout not in known:
        raise KVBudgetError(f"unknown layout {layout!r} (known: {', '.join(known)})")


def fill_list(tok: Any, length: int, head: str, items: Callable[[], str], sep: str) -> tuple[str, list[str]]:
    """``head`` then items from ``items()`` joined by ``sep``, as many as make ``length`` tokens.

    Token counts are nearly additive, so the count is estimated from a sample, then corrected
    by whole items on the measured text until it is as close to ``length`` as an item allows.
    """
    sample = [items() for _ in range(20)]
    per_item = max(1.0, (ntok(tok, head + sep.join(sample)) - ntok(tok, head)) / len(sample))
    want = max(1, round((length - ntok(tok, head)) / per_item))
    chosen = sample[:want] + [items() for _ in range(want - len(sample))]

    def error(k: int) -> int:
        return ntok(tok, head + sep.join(chosen[:k])) - length

    while error(len(chosen)) < 0:  # too short: add items
        chosen.append(items())
    k = len(chosen)
    while k > 1 and abs(error(k - 1)) <= abs(error(k)):  # too long: drop items from the end
        k -= 1
    chosen = chosen[:k]
    return head + sep.join(chosen), chosen


def _unique(rng: random.Random, make: Callable[[random.Random], str], k: int, taken: set[str] | None = None) -> list[str]:
    """k distinct values of ``make(rng)``, in draw order (a list: set order depends on hashing)."""
    seen = set(taken or ())
    out: list[str] = []
    while len(out) < k:
        v = make(rng)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


# --------------------------------------------------------------------------- prefix_suffix

_ALNUM = string.ascii_lowercase + string.digits


def _random_string(rng: random.Random, size: int) -> str:
    # Letters first: a string starting with a digit would read as a number to the tokenizer.
    return rng.choice(string.ascii_lowercase) + "".join(rng.choice(_ALNUM) for _ in range(size - 1))


def _fresh_string(rng: random.Random, size: int, affix: int, used: set[str]) -> str:
    """A random string whose prefix and suffix (``affix`` characters) no earlier string has."""
    while True:
        s = _random_string(rng, size)
        if s[:affix] not in used and s[-affix:] not in used and s[:affix] != s[-affix:]:
            used.update((s[:affix], s[-affix:]))
            return s


def prefix_suffix(tok: Any, n: int, length: int, seed: int, *, size: int = 10, affix: int = 3,
                  questions: tuple[int, int] = (3, 4), strings: int = 6, layout: str = "sentences") -> list[Task]:
    """Retr.Prefix-Suffix: "the string that starts with P and ends with S", answer the string.

    layout "list" is SCBench's: the whole context is a numbered list of random strings of
    ``size`` characters, no two sharing a prefix or a suffix of ``affix`` characters. Layout
    "sentences" (default) plants ``strings`` such strings in filler prose ('Label 4 of the
    archive reads "kx7pq2mzt4".'), the rest being distractor-free prose: the default model
    cannot search a list of hundreds of strings even with the full cache.
    """
    _check_layout(layout, ("sentences", "list"))
    if not 2 <= 2 * affix < size:
        raise KVBudgetError(f"prefix and suffix ({affix} characters each) must be shorter than the strings ({size})")
    rng = random.Random(f"prefix_suffix/{seed}")
    tasks = []
    for i in range(n):
        used: set[str] = set()  # prefixes and suffixes seen: each must identify one string
        if layout == "list":
            head = "Here is a list of random strings, one per line.\n\n"
            numbered = (f"{k}. {_fresh_string(rng, size, affix, used)}" for k in itertools.count(1))
            context, items = fill_list(tok, length, head, numbered.__next__, "\n")
            pool = [item.split(". ", 1)[1] for item in items]
        else:
            pool = [_fresh_string(rng, size, affix, used) for _ in range(strings)]
            labels = rng.sample(range(10, 100), len(pool))
            inserts = [(spread(rng, j, len(pool)), f'The archive lists the string "{s}" under label {lab}.', False)
                       for j, (s, lab) in enumerate(zip(pool, labels))]
            context = document(tok, rng, length, inserts)
        k = min(len(pool), rng.randint(*questions))
        qs = [Question(question=f'What is the string that starts with "{s[:affix]}" and ends with "{s[-affix:]}"?',
                       answers=[s], metric="contains", category="prefix_suffix")
              for s in rng.sample(pool, k)]
        tasks.append(Task(id=f"prefix_suffix-{seed}-{i:04d}", context=context, questions=qs))
    return tasks


# --------------------------------------------------------------------------- multihop

def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def multihop(tok: Any, n: int, length: int, seed: int, *, chains: tuple[int, int] = (3, 4), hops: int = 2) -> list[Task]:
    """Retr.MultiHop (RULER's variable tracking): chains ``VAR A = 12345.`` ... ``VAR B = VAR A.``

    Each context holds 3-4 chains of ``hops`` + 1 variables (a value, then ``hops``
    re-assignments), their statements interleaved in filler prose in chain order, so that every
    hop comes after the one it refers to. One question per chain, "Which variables are assigned
    the value 12345?", scored by token F1 over the variable names (the gold answer lists them in
    assignment order; order does not matter to F1).
    """
    if hops < 1:
        raise KVBudgetError(f"hops must be positive (got {hops})")
    rng = random.Random(f"multihop/{seed}")
    tasks = []
    for i in range(n):
        k = rng.randint(*chains)
        names = _unique(rng, _var_name, k * (hops + 1))
        values = [str(v) for v in rng.sample(range(10000, 100000), k)]
        statements: list[str] = []
        for h in range(hops + 1):  # hop h of every chain before hop h + 1 of any
            for c in range(k):
                name = names[c * (hops + 1) + h]
                rhs = values[c] if h == 0 else f"VAR {names[c * (hops + 1) + h - 1]}"
                statements.append(f"VAR {name} = {rhs}.")
        inserts = [(spread(rng, j, len(statements)), s, False) for j, s in enumerate(statements)]
        context = document(tok, rng, length, inserts)
        qs = [Question(question=f"Which variables are assigned the value {values[c]}? List all of their names.",
                       answers=[" ".join(names[c * (hops + 1):(c + 1) * (hops + 1)])], metric="f1",
                       category="multihop")
              for c in range(k)]
        rng.shuffle(qs)
        tasks.append(Task(id=f"multihop-{seed}-{i:04d}", context=context, questions=qs))
    return tasks


# --------------------------------------------------------------------------- math_find

_ASK = {  # name -> (question, pick from the numbers sorted ascending)
    "max": ("What is the largest number in the list?", lambda s: s[-1]),
    "min": ("What is the smallest number in the list?", lambda s: s[0]),
    "second largest": ("What is the second largest number in the list?", lambda s: s[-2]),
    "second smallest": ("What is the second smallest number in the list?", lambda s: s[1]),
}


def math_find(tok: Any, n: int, length: int, seed: int, *, numbers: int = 8, questions: tuple[int, int] = (3, 4),
              layout: str = "paragraph") -> list[Task]:
    """Math.Find: the largest, smallest, second largest or second smallest of a list of integers.

    layout "list" is SCBench's: the whole context is one list of distinct integers. Layout
    "paragraph" (default) states a list of ``numbers`` integers once, as a sentence in filler
    prose ("The ledger lists these numbers: 412, 9031, ..."). Metric ``exact``: the question asks
    for the number only.
    """
    _check_layout(layout, ("paragraph", "list"))
    if layout == "paragraph" and numbers < 4:
        raise KVBudgetError(f"math_find needs at least 4 numbers (got {numbers})")
    rng = random.Random(f"math_find/{seed}")
    tasks = []
    for i in range(n):
        pool = rng.sample(range(100, 10000), 9900)
        if layout == "list":
            context, items = fill_list(tok, length, "Here is a list of numbers: ", map(str, pool).__next__, ", ")
            listed = [int(x) for x in items]
        else:
            listed = pool[:numbers]
            text = f"The ledger lists these numbers: {', '.join(map(str, listed))}."
            context = document(tok, rng, length, [(rng.uniform(0.2, 0.8), text, True)])
        ordered = sorted(listed)
        kinds = rng.sample(list(_ASK), min(len(_ASK), rng.randint(*questions)))
        qs = [Question(question=f"{_ASK[kind][0]} Answer with the number only.",
                       answers=[str(_ASK[kind][1](ordered))], metric="exact", category="math_find")
              for kind in kinds]
        tasks.append(Task(id=f"math_find-{seed}-{i:04d}", context=context, questions=qs))
    return tasks


GENERATORS: dict[str, Callable[..., list[Task]]] = {
    "prefix_suffix": prefix_suffix, "multihop": multihop, "math_find": math_find,
}
