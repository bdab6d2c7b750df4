"""RULER (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context Language
Models?"): its synthetic tasks, generated offline, seeded, sized in the model's tokens.

Written from RULER's published task definitions (the task configs and the synthetic-data scripts of
NVIDIA/RULER): the needle-in-a-haystack family (single 1-3, multikey 1-3, multivalue, multiquery),
variable tracking (``vt``), common words extraction (``cwe``) and frequent words extraction
(``fwe``). Prompts use RULER's wording; each sample becomes one task: the instruction and the
haystack are the context (compressed without the question in multi-turn mode), RULER's question is
the one question, and every value RULER requires is a gold answer, scored by RULER's metric
``string_match_all`` (the share of required values found in the prediction).

Length: as in RULER, ``length`` bounds the whole input plus RULER's answer allowance (its
``tokens_to_generate`` per task): context + question <= length - allowance, counted by the model's
tokenizer without the chat template, and the haystack is filled until one more unit (a noise block,
a sentence, a distractor needle, a word) would cross it. Where this differs from the reference
generator is listed in docs/field-benchmarks.md.
"""

from __future__ import annotations

import hashlib
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import KVBudgetError
from .prose import filler, ntok
from .taskfile import Question, Task
from .wordlists import ADJECTIVES, NOUNS, distinct_words

METRIC = "string_match_all"

# RULER's answer allowance (tokens_to_generate) per task kind: part of --length, as in RULER.
ANSWER_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
# RULER places essay needles at one of 40 evenly spaced depths (0%, 2.6%, ..., 100%).
DEPTHS = tuple(round(100 * i / 39) / 100 for i in range(40))
TEXT_HAYSTACKS = ("noise", "essay", "prose")


@dataclass(frozen=True)
class Niah:
    """One needle-in-a-haystack task: its haystack, key and value kinds and needle counts."""

    haystack: str  # noise | essay | needle (the haystack is all distractor needles)
    key: str  # words | uuids
    value: str  # numbers | uuids
    keys: int = 1
    values: int = 1
    queries: int = 1


NIAH = {
    "niah_single_1": Niah("noise", "words", "numbers"),
    "niah_single_2": Niah("essay", "words", "numbers"),
    "niah_single_3": Niah("essay", "words", "uuids"),
    "niah_multikey_1": Niah("essay", "words", "numbers", keys=4),
    "niah_multikey_2": Niah("needle", "words", "numbers"),
    "niah_multikey_3": Niah("needle", "uuids", "uuids"),
    "niah_multivalue": Niah("essay", "words", "numbers", values=4),
    "niah_multiquery": Niah("essay", "words", "numbers", keys=4, queries=4),
}
TASKS = (*NIAH, "vt", "cwe", "fwe")


# --------------------------------------------------------------------------- haystacks


def split_sentences(text: str) -> list[str]:
    """Sentences of a text: whitespace collapsed, split after . ! or ? (RULER uses NLTK's punkt)."""
    flat = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+(?=\S)", flat) if s]


class Haystack:
    """Units of filler text (noise blocks or sentences) joined by ``sep``; unit i never changes."""

    def __init__(self, kind: str, unit: Callable[[int], str], sep: str, source: str | None = None) -> None:
        self.kind, self.unit, self.sep, self.source = kind, unit, sep, source

    def units(self, count: int) -> list[str]:
        return [self.unit(i) for i in range(count)]


def noise_haystack() -> Haystack:
    """RULER's repeated-sentence haystack: the same five sentences, one block per line."""
    return Haystack("noise", lambda i: NOISE, "\n")


def essay_haystack(path: str | Path) -> Haystack:
    """Sentences of a text file (RULER uses Paul Graham's essays), cycled when the text runs out."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise KVBudgetError(f"cannot read essay file {p}: {exc.strerror or exc}") from None
    sentences = split_sentences(data.decode("utf-8", errors="replace"))
    if len(sentences) < 2:
        raise KVBudgetError(f"essay file {p} holds fewer than two sentences")
    digest = hashlib.sha256(data).hexdigest()[:12]
    return Haystack("essay", lambda i: sentences[i % len(sentences)], " ", f"{p.name} sha256:{digest}")


def prose_haystack(seed: int) -> Haystack:
    """Seeded natural prose (`prose.filler`): a built-in stand-in for an essay file."""
    sentences: list[str] = []
    rng = random.Random(f"ruler-prose/{seed}")

    def unit(i: int) -> str:
        while len(sentences) <= i:
            sentences.extend(split_sentences(filler(rng, 64)))
        return sentences[i]

    return Haystack("prose", unit, " ")


# --------------------------------------------------------------------------- random values


def _word_key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))  # 7 digits
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    if kind == "words":
        return _word_key(rng)
    raise KVBudgetError(f"unknown needle kind {kind!r}")


def _distinct(rng: random.Random, kind: str, k: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        v = _value(rng, kind)
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _insert(units: list[str], items: list[str], fractions: list[float]) -> list[str]:
    """``items`` placed among ``units`` at fractions of their count (kept in item order at ties)."""
    out = list(units)
    for at, item in sorted(zip((int(len(units) * f) for f in fractions), range(len(items))), reverse=True):
        out.insert(at, items[item])
    return out


# --------------------------------------------------------------------------- tasks
# Each builder draws everything random for one sample, then returns (render, answers): render(count)
# is the (context, question) with `count` haystack units; only the count changes between calls.

Render = Callable[[int], tuple[str, str]]


def _niah(spec: Niah, rng: random.Random, hay: Haystack | None) -> tuple[Render, list[str], Haystack]:
    taken: set[str] = set()
    keys = _distinct(rng, spec.key, spec.keys, taken)
    values = [_distinct(rng, spec.value, spec.values, taken) for _ in keys]
    # multikey 2/3: the haystack is distractor needles, none with a real key or value
    haystack = hay if hay is not None else _needle_haystack(spec, rng, taken)
    kind = spec.value  # "numbers" / "uuids", as RULER names them in the needle
    needles = [f"One of the special magic {kind} for {k} is: {v}." for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    asked = rng.sample(range(spec.keys), spec.queries)
    answers = [v for i in asked for v in values[i]]
    query = keys[asked[0]] if len(asked) == 1 else ", ".join(keys[i] for i in asked[:-1]) + ", and " + keys[asked[-1]]
    if len(answers) == 1:
        head = f"A special magic {kind[:-1]} is hidden within the following text. Make sure to memorize it. " \
               f"I will quiz you about the {kind[:-1]} afterwards."
        question = f"What is the special magic {kind[:-1]} for {query} mentioned in the provided text?"
    else:
        head = f"Some special magic {kind} are hidden within the following text. Make sure to memorize it. " \
               f"I will quiz you about the {kind} afterwards."
        question = f"What are all the special magic {kind} for {query} mentioned in the provided text?"
    if haystack.kind in ("essay", "prose"):
        fractions = rng.sample(DEPTHS, len(needles))
    else:
        fractions = [rng.random() for _ in needles]

    def render(count: int) -> tuple[str, str]:
        units = _insert(haystack.units(count), needles, fractions)
        return f"{head}\n{haystack.sep.join(units)}", question

    return render, answers, haystack


def _needle_haystack(spec: Niah, rng: random.Random, avoid: set[str]) -> Haystack:
    """Multikey 2/3: the haystack is distractor needles with other keys and values."""
    lines: list[str] = []
    stream = random.Random(rng.getrandbits(64))

    def unit(i: int) -> str:
        while len(lines) <= i:
            key, value = _distinct(stream, spec.key, 1, avoid)[0], _distinct(stream, spec.value, 1, avoid)[0]
            lines.append(f"One of the special magic {spec.value} for {key} is: {value}.")
        return lines[i]

    return Haystack("needle", unit, "\n")


def _names(rng: random.Random, k: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


_VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text."


def _vt_chain(rng: random.Random, hops: int, taken: set[str]) -> tuple[list[str], str, list[str]]:
    names = _names(rng, hops + 1, taken)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
    return names, value, chain


def _vt(rng: random.Random, hay: Haystack, hops: int = 4) -> tuple[Render, list[str]]:
    """Variable tracking: one chain VAR X1 = 12345, VAR X2 = VAR X1, ... (``hops`` hops) hidden in
    noise; every variable holding the value is asked. A one-shot example comes first, as in RULER."""
    taken: set[str] = set()
    ex_names, ex_value, ex_chain = _vt_chain(rng, hops, taken)
    ex_units = _insert([NOISE] * 5, ex_chain, sorted(rng.random() for _ in ex_chain))
    example = (f"{_VT_HEAD}\n\n" + "\n".join(ex_units) + f"\nQuestion: Find all variables that are assigned the value "
               f"{ex_value} in the text above. Answer: According to the chain(s) of variable assignment in the text "
               f"above, {hops + 1} variables are assigned the value {ex_value}, they are: {' '.join(ex_names)}\n\n")
    names, value, chain = _vt_chain(rng, hops, taken)
    fractions = sorted(rng.random() for _ in chain)  # the chain keeps its order in the text
    question = f"Find all variables that are assigned the value {value} in the text above."

    def render(count: int) -> tuple[str, str]:
        units = _insert(hay.units(count), chain, fractions)
        return f"{example}{_VT_HEAD}\n\n" + hay.sep.join(units), question

    return render, names


_CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.")
_CWE_QUESTION = "What are the 10 most common words in the above list?"


def _numbered(words: list[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def _cwe(rng: random.Random, length: int, common: int = 10) -> tuple[Render, list[str]]:
    """Common words extraction: ``common`` words repeated often, the rest rarely, in one numbered
    list; the ``common`` most frequent are asked. RULER's counts: 30 / 3 repeats from 4k tokens
    (6 / 1 below), after a one-shot example (10 / 3 repeats over 40 words; 3 / 1 over 20 below 4k)."""
    freq_common, freq_rare, ex_words, ex_common, ex_rare = (30, 3, 40, 10, 3) if length >= 4096 else (6, 1, 20, 3, 1)
    pool = distinct_words()
    rng.shuffle(pool)
    ex, pool = pool[:ex_words], pool[ex_words:]
    ex_list = ex[:common] * ex_common + ex[common:] * ex_rare
    rng.shuffle(ex_list)
    example = (f"{_CWE_HEAD}\n{_numbered(ex_list)}\nQuestion: {_CWE_QUESTION} Answer: The top 10 words that appear "
               f"most often in the list are: {_numbered(ex[:common])}\n\n")
    answers = pool[:common]
    order_seed = rng.getrandbits(64)

    def render(count: int) -> tuple[str, str]:
        if common + count > len(pool):
            raise _TooLong(len(pool) - common)
        words = answers * freq_common + pool[common:common + count] * freq_rare
        random.Random(order_seed).shuffle(words)
        return f"{example}{_CWE_HEAD}\n{_numbered(words)}", _CWE_QUESTION

    return render, list(answers)


def _zeta(a: float, terms: int = 10_000) -> float:
    """Riemann zeta(a) for a > 1 (series plus its Euler-Maclaurin tail)."""
    n = terms
    return sum(k ** -a for k in range(1, n + 1)) + n ** (1 - a) / (a - 1) - n ** -a / 2


def _fwe(rng: random.Random, length: int, alpha: float = 2.0, word_len: int = 6) -> tuple[Render, list[str]]:
    """Frequent words extraction: coded words drawn from a Zeta(``alpha``) distribution over a
    vocabulary of length/50 random words; the most frequent one is replaced by '...' (noise) and
    the next three are asked."""
    size = max(5, length // 50)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < size:
        w = "".join(rng.choices(string.ascii_lowercase, k=word_len))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "..."
    z = _zeta(alpha)
    order_seed = rng.getrandbits(64)
    head = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
    question = ("Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently "
                "appeared words in the above coded text?")

    def render(count: int) -> tuple[str, str]:
        words = [w for k, w in enumerate(vocab, start=1) for _ in range(int(count * k ** -alpha / z))]
        random.Random(order_seed).shuffle(words)
        return head + " ".join(words), question

    return render, vocab[1:4]


# --------------------------------------------------------------------------- fitting to a length


class _TooLong(Exception):
    """A render that cannot grow further (cwe ran out of words); carries the largest count."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def _fit(tok: Any, render: Render, budget: int) -> tuple[str, str, int, int]:
    """The largest unit count whose context + question fit ``budget`` tokens; (context, question,
    count, tokens). Token counts grow with the count, so a doubling search then a bisection."""
    memo: dict[int, tuple[str, str, int] | None] = {}

    def size(count: int) -> int | None:  # None: past what the render can make
        if count not in memo:
            try:
                context, question = render(count)
            except _TooLong:
                memo[count] = None
            else:
                memo[count] = (context, question, ntok(tok, context) + ntok(tok, question))
        entry = memo[count]
        return None if entry is None else entry[2]

    first = size(1)
    if first is None or first > budget:
        raise KVBudgetError(f"length too short: the smallest prompt (instructions, needles, one haystack unit) "
                            f"takes {first} tokens, more than the {budget} available")
    lo, hi = 1, 2
    while (n := size(hi)) is not None and n <= budget:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        n = size(mid)
        lo, hi = (mid, hi) if n is not None and n <= budget else (lo, mid)
    context, question, tokens = memo[lo]  # type: ignore[misc]
    return context, question, lo, tokens


# --------------------------------------------------------------------------- public API


def task_kind(name: str) -> str:
    """``niah``, ``vt``, ``cwe`` or ``fwe``."""
    return "niah" if name in NIAH else name


def make_ruler(tok: Any, task: str, n: int, length: int, seed: int, *, haystack: str | None = None,
               essay: str | Path | None = None, tokenizer_name: str | None = None) -> list[Task]:
    """``n`` seeded samples of one RULER task (or of each with ``task="all"``) at ``length`` tokens.

    haystack: for the tasks whose haystack is text (RULER: noise for niah_single_1 and vt, essays for
    the other NIAH tasks but multikey 2/3, whose haystack is distractor needles), ``None`` keeps
    RULER's choice, ``noise`` / ``essay`` / ``prose`` replace it. Essays come from ``essay``, a text
    file; without one, seeded built-in prose (``prose.filler``) stands in for them (haystack
    ``prose`` in the task's ``meta``, which records every setting that regenerates the task).
    """
    names = list(TASKS) if task == "all" else [task]
    for name in names:
        if name not in TASKS:
            raise KVBudgetError(f"unknown RULER task {name!r} (known: {', '.join(TASKS)}, all)")
    if haystack is not None and haystack not in TEXT_HAYSTACKS:
        raise KVBudgetError(f"unknown haystack {haystack!r} (known: {', '.join(TEXT_HAYSTACKS)})")
    if n < 1:
        raise KVBudgetError(f"number of tasks must be positive (got {n})")
    essay_hay = essay_haystack(essay) if essay is not None else None
    tasks: list[Task] = []
    for name in names:
        kind = task_kind(name)
        budget = length - ANSWER_TOKENS[kind]
        for i in range(n):
            rng = random.Random(f"ruler/{name}/{seed}/{i}")
            render, answers, hay = _build(name, rng, _haystack(name, haystack, essay_hay, seed), length)
            try:
                context, question, _, tokens = _fit(tok, render, budget)
            except KVBudgetError as exc:
                raise KVBudgetError(f"RULER {name} at length {length}: {exc}") from None
            meta: dict[str, Any] = {"benchmark": "ruler", "task": name, "length": length, "tokens": tokens,
                                    "answer_tokens": ANSWER_TOKENS[kind], "seed": seed, "index": i,
                                    "haystack": hay.kind if hay is not None else "none",
                                    "tokenizer": tokenizer_name}
            if hay is not None and hay.source:
                meta["essay"] = hay.source
            tasks.append(Task(id=f"ruler-{name}-{length}-{seed}-{i:04d}", context=context,
                              questions=[Question(question=question, answers=answers, metric=METRIC, category=name)],
                              meta=meta))
    return tasks


def _text_default(name: str) -> str | None:
    """RULER's text haystack of a task (noise or essay); None for word lists and needle haystacks."""
    if name == "vt":
        return "noise"
    if name in NIAH and NIAH[name].haystack != "needle":
        return NIAH[name].haystack
    return None


def _haystack(name: str, override: str | None, essay: Haystack | None, seed: int) -> Haystack | None:
    """The text haystack of a task; None for the word-list tasks and the needle haystacks (built
    with their task, which knows the keys the distractors must avoid)."""
    default = _text_default(name)
    if default is None:
        return None
    kind = override or default
    if kind == "noise":
        return noise_haystack()
    if kind == "essay" and essay is not None:
        return essay
    return prose_haystack(seed)  # no essay file: built-in prose stands in


def _build(name: str, rng: random.Random, hay: Haystack | None, length: int
           ) -> tuple[Render, list[str], Haystack | None]:
    if name in NIAH:
        return _niah(NIAH[name], rng, hay)
    if name == "vt":
        assert hay is not None
        return (*_vt(rng, hay), hay)
    if name == "cwe":
        return (*_cwe(rng, length), None)
    return (*_fwe(rng, length), None)
