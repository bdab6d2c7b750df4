"""Seeded, offline generators of synthetic tasks, sized in model tokens.

Every generator has the signature ``gen(tok, n, length, seed, **options) -> list[Task]``:
``n`` tasks whose context is ``length`` tokens long (within 5%) as counted by ``tok`` without
special tokens. Filler is seeded English prose (`prose.py`).
"""

from __future__ import annotations

import json
import random
from typing import Any, Callable

from ..errors import KVBudgetError
from .chat import chat
from .conversation import conversation
from .prose import document, spread
from .scbench import GENERATORS as SCBENCH_GENERATORS
from .taskfile import Question, Task

# --------------------------------------------------------------------------- generators

_COLORS = ["blue", "red", "green", "yellow", "silver", "orange", "purple", "white", "black",
           "brown", "golden", "grey"]
_OBJECTS = ["door", "safe", "locker", "gate", "cabinet", "vault", "chest", "mailbox",
            "garage", "drawer", "shed", "suitcase"]


def needle(tok: Any, n: int, length: int, seed: int, *, facts: tuple[int, int] = (3, 5)
           ) -> list[Task]:
    """NIAH: prose with 3-5 planted facts ("The code for the blue door is 4721.").

    One `contains` question per fact, asked in a shuffled order; facts sit at spread-out
    depths so that a policy keeping only the start or end of the context loses some.
    """
    rng = random.Random(f"needle/{seed}")
    tasks = []
    for i in range(n):
        k = rng.randint(*facts)
        colors, objects = rng.sample(_COLORS, k), rng.sample(_OBJECTS, k)
        codes = rng.sample(range(1000, 10000), k)
        depths = [spread(rng, j, k) for j in range(k)]
        facts_ = [f"The code for the {c} {o} is {code}."
                  for c, o, code in zip(colors, objects, codes)]
        context = document(tok, rng, length, [(d, f, False) for d, f in zip(depths, facts_)])
        qs = [Question(question=f"What is the code for the {c} {o}?", answers=[str(code)],
                       metric="contains", category="needle")
              for c, o, code in zip(colors, objects, codes)]
        rng.shuffle(qs)
        tasks.append(Task(id=f"needle-{seed}-{i:04d}", context=context, questions=qs))
    return tasks


_KEY_WORDS = ["amber", "birch", "cobalt", "delta", "ember", "falcon", "garnet", "harbor",
              "indigo", "juniper", "kestrel", "lantern", "maple", "nectar", "onyx", "pepper",
              "quartz", "raven", "saffron", "thistle", "umber", "velvet", "willow", "zephyr",
              "acorn", "basalt", "cedar", "dune", "fern", "glacier", "hazel", "ivory",
              "jasper", "lotus", "meadow", "nimbus", "otter", "pine", "ripple", "sparrow"]


def _keys(rng: random.Random, style: str, k: int) -> list[str]:
    if style == "word":
        if 2 * k > len(_KEY_WORDS):
            raise KVBudgetError(f"key style 'word' allows at most {len(_KEY_WORDS) // 2} pairs "
                                f"(got {k})")
        # No word is shared between two keys, so a key cannot be half-confused with another.
        words = rng.sample(_KEY_WORDS, 2 * k)
        return [f"{words[2 * j]}-{words[2 * j + 1]}" for j in range(k)]
    if style == "uuid":
        keys: list[str] = []  # a list, not a set: set order would vary with PYTHONHASHSEED
        while len(keys) < k:
            key = f"{rng.getrandbits(32):08x}"  # the first group of a UUID
            if key not in keys:
                keys.append(key)
        return keys
    raise KVBudgetError(f"unknown key style {style!r} (known: word, uuid)")


def kv(tok: Any, n: int, length: int, seed: int, *, pairs: int = 5,
       questions: tuple[int, int] = (4, 5), key_style: str = "uuid", layout: str = "sentences",
       ) -> list[Task]:
    """Key-value retrieval: `pairs` random keys -> random 5-digit values, 4-5 asked back.

    key_style: "uuid" (8 hex digits, a UUID's first group) or "word" ("cedar-velvet").
    layout "json" is SCBench's Retr.KV: one JSON object of all pairs inside the prose. The
    default model (SmolLM2-135M) scores under 40% on it even with 6 pairs and no filler, so
    the default layout "sentences" states each pair as 'The value for the key "9f2c04ab" is
    21336.' at spread-out depths: still arbitrary keys to arbitrary values (nothing to guess
    from meaning, unlike needle). Accuracy falls fast with pairs (SmolLM2 at 1k tokens: ~85%
    with 5, ~60% with 6-8), hence the default 5.
    """
    if pairs < 1:
        raise KVBudgetError(f"pairs must be positive (got {pairs})")
    if layout not in ("sentences", "json"):
        raise KVBudgetError(f"unknown kv layout {layout!r} (known: sentences, json)")
    rng = random.Random(f"kv/{seed}")
    tasks = []
    for i in range(n):
        keys = _keys(rng, key_style, pairs)
        values = [str(v) for v in rng.sample(range(10000, 100000), pairs)]
        if layout == "json":
            obj = json.dumps(dict(zip(keys, values)), indent=1)
            inserts = [(rng.uniform(0.2, 0.8),
                        f"The records office keeps this JSON object of keys and values:\n{obj}",
                        True)]
        else:
            inserts = [(spread(rng, j, pairs),
                        f'The value for the key "{k}" is {v}.', False)
                       for j, (k, v) in enumerate(zip(keys, values))]
        context = document(tok, rng, length, inserts)
        asked = rng.sample(range(pairs), min(pairs, rng.randint(*questions)))
        qs = [Question(question=f'What is the value for the key "{keys[j]}"?',
                       answers=[values[j]], metric="contains", category="kv") for j in asked]
        tasks.append(Task(id=f"kv-{seed}-{i:04d}", context=context, questions=qs))
    return tasks


GENERATORS: dict[str, Callable[..., list[Task]]] = {"needle": needle, "kv": kv, "conversation": conversation,
                                                     "chat": chat,
                                                     **SCBENCH_GENERATORS}


def make_tasks(name: str, tok: Any, n: int, length: int, seed: int, **options: Any
               ) -> list[Task]:
    """Generate `n` tasks of the built-in set `name` with contexts of `length` tokens."""
    try:
        gen = GENERATORS[name]
    except KeyError:
        raise KVBudgetError(f"unknown task set {name!r} (known: {', '.join(GENERATORS)})") \
            from None
    if n < 1:
        raise KVBudgetError(f"number of tasks must be positive (got {n})")
    if length < 100:
        raise KVBudgetError(f"task length must be at least 100 tokens (got {length})")
    return gen(tok, n, length, seed, **options)
