"""Synthetic task generators: seeded, sized in model tokens, answers present in the context."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from kvbudget.errors import KVBudgetError
from kvbudget.eval.generators import GENERATORS, make_tasks
from kvbudget.eval.prose import filler
from kvbudget.eval.taskfile import Task, read_tasks, write_tasks
from kvbudget.runtime.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer (converted from its GGUF once, then read from kvbudget's cache)."""
    return load_tokenizer()


def _ntok(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_per_seed(tok, name):
    a = make_tasks(name, tok, 2, 300, seed=1)
    assert a == make_tasks(name, tok, 2, 300, seed=1)
    b = make_tasks(name, tok, 2, 300, seed=2)
    assert [t.context for t in a] != [t.context for t in b]
    assert a[0].context != a[1].context


# Document generators (string contexts); `conversation` has its own tests in test_episodic.py,
# `chat` below.
DOCUMENTS = sorted(n for n in GENERATORS if n not in ("conversation", "chat"))


@pytest.mark.parametrize("name", DOCUMENTS)
@pytest.mark.parametrize("length", [200, 600, 1000])
def test_length_within_5_percent(tok, name, length):
    for task in make_tasks(name, tok, 3, length, seed=length):
        assert isinstance(task.context, str)
        assert abs(_ntok(tok, task.context) - length) <= 0.05 * length


METRICS = {"needle": "contains", "kv": "contains", "prefix_suffix": "contains", "multihop": "f1",
           "math_find": "exact"}


@pytest.mark.parametrize("name", DOCUMENTS)
def test_answers_in_context_and_ids_unique(tok, name, tmp_path):
    tasks = make_tasks(name, tok, 6, 500, seed=3)
    assert len(tasks) == 6
    assert len({t.id for t in tasks}) == 6
    for task in tasks:
        assert 3 <= len(task.questions) <= 5
        assert len({q.question for q in task.questions}) == len(task.questions)
        for q in task.questions:
            assert q.metric == METRICS.get(name, q.metric) and q.category == name
            # Every word of the answer (multihop: each variable name) is stated in the context.
            for word in q.answers[0].split():
                assert re.search(rf"\b{re.escape(word)}\b", task.context)
    # Generated tasks are valid task files.
    write_tasks(tmp_path / "t.jsonl", tasks)
    assert read_tasks(tmp_path / "t.jsonl") == tasks


@pytest.mark.parametrize("length", [300, 600, 1000])
def test_chat_length_within_5_percent(tok, length):
    from kvbudget.eval.runner import context_tokens

    for task in make_tasks("chat", tok, 3, length, seed=length):
        assert abs(context_tokens(tok, task) - length) <= 0.05 * length


def _sessions(task: Task) -> list[int]:
    """The session number of every message of a chat."""
    out, s = [], 0
    for m in task.context:
        head = re.match(r"Session (\d+) — (\d+) (\w+) (\d{4})\n", m["content"])
        s = int(head.group(1)) if head else s
        out.append(s)
    return out


def test_chat_speakers_sessions_and_categories(tok, tmp_path):
    tasks = make_tasks("chat", tok, 4, 1000, seed=11)
    assert len({t.id for t in tasks}) == 4
    for task in tasks:
        msgs = task.context
        # A valid chat: roles alternate, starting with the user; every message is "Name: text".
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) + ["user"] * (len(msgs) % 2)
        speakers = {re.match(r"(?:Session .*\n)?(\w+): ", m["content"]).group(1) for m in msgs}
        assert speakers == set(task.meta["speakers"]) and 3 <= len(speakers) <= 4
        # Sessions numbered in order, dated, dates rising.
        heads = [re.match(r"Session (\d+) — (.+)\n", m["content"]) for m in msgs]
        heads = [h for h in heads if h]
        assert [int(h.group(1)) for h in heads] == list(range(1, task.meta["sessions"] + 1))
        from datetime import datetime
        dates = [datetime.strptime(h.group(2), "%d %B %Y") for h in heads]
        assert dates == sorted(dates) and len(set(dates)) == len(dates)
        assert {q.category for q in task.questions} == {"single", "updated", "multi-session"}
        text = "\n".join(m["content"] for m in msgs)
        for q in task.questions:
            for answer in q.answers:
                assert re.search(rf"\b{re.escape(answer)}\b", text)
    write_tasks(tmp_path / "t.jsonl", tasks)
    assert read_tasks(tmp_path / "t.jsonl") == tasks


def test_chat_updates_and_multi_session_facts(tok):
    seen = set()
    for task in make_tasks("chat", tok, 5, 900, seed=12):
        session = _sessions(task)
        for q, fact in zip(task.questions, task.meta["facts"], strict=True):
            assert fact["category"] == q.category
            where = [m for _, m in fact["evidence"]]
            said = [task.context[m]["content"] for m in where]
            if q.category == "single":
                assert len(where) == 1 and q.answers[0] in said[0]
            elif q.category == "updated":
                old, new = fact["old"], q.answers[0]
                assert old != new and len(where) == 2
                # The old value is stated first, in an earlier session; the gold is the later value.
                assert old in said[0] and new not in said[0] and new in said[1]
                assert session[where[0]] < session[where[1]]
                first_new = min(i for i, m in enumerate(task.context) if new in m["content"])
                assert first_new == where[1]
            else:
                # Two statements in two sessions; the answer needs both.
                assert len(where) == 2 and session[where[0]] != session[where[1]]
                if q.metric == "string_match_all":
                    assert q.answers[0] in said[0] and q.answers[1] in said[1]
                else:
                    bridge = re.match(r"(\w+) ", said[1].split(": ", 1)[1]).group(1)
                    assert bridge in said[0] and q.answers[0] in said[1] and q.answers[0] not in said[0]
            # The question names the speaker who made the statement.
            speaker = re.match(r"(?:Session .*\n)?(\w+): ", said[-1]).group(1)
            assert speaker in q.question
            seen.add((q.category, q.metric))
    assert seen == {("single", "contains"), ("updated", "contains"), ("multi-session", "contains"),
                    ("multi-session", "string_match_all")}


def test_chat_options(tok):
    tasks = make_tasks("chat", tok, 1, 800, seed=0, sessions=7, per_kind=1)
    assert tasks[0].meta["sessions"] == 7 and len(tasks[0].questions) == 3
    with pytest.raises(KVBudgetError, match="sessions must be at least 2"):
        make_tasks("chat", tok, 1, 300, 0, sessions=1)
    with pytest.raises(KVBudgetError, match="per_kind must be between 1 and 3"):
        make_tasks("chat", tok, 1, 300, 0, per_kind=4)
    with pytest.raises(KVBudgetError, match="length 150 is too short"):
        make_tasks("chat", tok, 1, 150, 0, sessions=8, per_kind=3)


def test_needle_facts_match_questions(tok):
    for task in make_tasks("needle", tok, 5, 800, seed=4):
        facts = re.findall(r"The code for the (\w+ \w+) is (\d{4})\.", task.context)
        assert 3 <= len(facts) <= 5 and len(facts) == len(task.questions)
        asked = {re.search(r"the (\w+ \w+)\?", q.question).group(1): q.answers[0]
                 for q in task.questions}
        assert asked == dict(facts)
        # Spread out: the first fact in the first half, the last in the second half.
        first, last = task.context.index(facts[0][1]), task.context.index(facts[-1][1])
        assert first < len(task.context) / 2 < last


def test_kv_pairs_are_stated_once_each(tok):
    for task in make_tasks("kv", tok, 3, 600, seed=5, pairs=8, key_style="word"):
        pairs = dict(re.findall(r'The value for the key "([a-z]+-[a-z]+)" is (\d{5})\.',
                                task.context))
        assert len(pairs) == 8  # asked pairs plus distractors
        for q in task.questions:
            key = re.search(r'"([^"]+)"', q.question).group(1)
            assert pairs[key] == q.answers[0]
            assert task.context.count(key) == 1


def test_kv_json_layout_holds_a_json_object(tok):
    for task in make_tasks("kv", tok, 2, 600, seed=5, layout="json", pairs=6):
        obj = json.loads(task.context[task.context.index("{"):task.context.index("}") + 1])
        assert len(obj) == 6
        assert all(re.fullmatch(r"[0-9a-f]{8}", k) for k in obj)
        for q in task.questions:
            key = re.search(r'"([^"]+)"', q.question).group(1)
            assert obj[key] == q.answers[0]
    with pytest.raises(KVBudgetError, match="unknown kv layout"):
        make_tasks("kv", tok, 1, 300, 0, layout="xml")


@pytest.mark.parametrize("options", [{}, {"layout": "list"}])
def test_prefix_suffix_identifies_one_string(tok, options):
    for task in make_tasks("prefix_suffix", tok, 3, 600, seed=8, **options):
        strings = re.findall(r"\b[a-z][a-z0-9]{9}\b", task.context)
        for q in task.questions:
            prefix, suffix = re.findall(r'"([a-z0-9]+)"', q.question)
            hits = {s for s in strings if s.startswith(prefix) and s.endswith(suffix)}
            assert hits == {q.answers[0]}


def test_multihop_chains_resolve_to_the_answer(tok):
    for task in make_tasks("multihop", tok, 3, 800, seed=9):
        value_of = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (\d{5}|VAR [A-Z]{5})\.", task.context):
            value_of[name] = value_of[rhs[4:]] if rhs.startswith("VAR ") else rhs  # defined before use
        for q in task.questions:
            value = re.search(r"value (\d{5})", q.question).group(1)
            assert sorted(q.answers[0].split()) == sorted(n for n, v in value_of.items() if v == value)
            assert q.metric == "f1"


@pytest.mark.parametrize("options", [{}, {"layout": "list"}])
def test_math_find_answers_are_right(tok, options):
    for task in make_tasks("math_find", tok, 3, 600, seed=10, **options):
        numbers = sorted(int(x) for x in re.findall(r"\b\d+\b", task.context))
        assert len(numbers) == len(set(numbers)) >= 4
        expect = {"largest": numbers[-1], "smallest": numbers[0], "second largest": numbers[-2],
                  "second smallest": numbers[1]}
        for q in task.questions:
            kind = re.search(r"the ((?:second )?(?:largest|smallest)) number", q.question).group(1)
            assert q.answers == [str(expect[kind])]


def test_new_generators_reject_bad_options(tok):
    with pytest.raises(KVBudgetError, match="unknown layout"):
        make_tasks("math_find", tok, 1, 300, 0, layout="table")
    with pytest.raises(KVBudgetError, match="shorter than the strings"):
        make_tasks("prefix_suffix", tok, 1, 300, 0, size=6, affix=3)
    with pytest.raises(KVBudgetError, match="hops must be positive"):
        make_tasks("multihop", tok, 1, 300, 0, hops=0)


def test_filler_is_varied_prose():
    text = filler(random.Random(0), 200)
    sentences = re.split(r"(?<=\.)\s+", text)
    assert len(set(sentences)) > 0.9 * len(sentences)
    words = re.findall(r"[a-z]+", text.lower())
    assert len(set(words)) > 300
    assert "\n\n" in text  # paragraphs
    assert not re.search(r"\d", text)  # no digits to be mistaken for a planted code


def test_make_tasks_errors(tok):
    with pytest.raises(KVBudgetError, match=r"unknown task set 'nope' \(known: .*needle"):
        make_tasks("nope", tok, 1, 300, 0)
    with pytest.raises(KVBudgetError, match="positive"):
        make_tasks("needle", tok, 0, 300, 0)
    with pytest.raises(KVBudgetError, match="length 120 is too short"):
        make_tasks("kv", tok, 1, 120, 0, pairs=8)


def test_tasks_are_task_objects(tok):
    assert all(isinstance(t, Task) for t in make_tasks("needle", tok, 1, 300, 0))


_HASH_SCRIPT = """
import hashlib, json
from kvbudget.eval.generators import make_tasks
from kvbudget.eval.taskfile import task_to_dict

class WordTok:  # a stand-in tokenizer: one token per whitespace-separated word
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": text.split()}

tasks = [t for name in ("needle", "kv", "prefix_suffix", "multihop", "math_find")
         for t in make_tasks(name, WordTok(), 3, 400, 7)]
blob = json.dumps([task_to_dict(t) for t in tasks], sort_keys=True)
print(hashlib.sha256(blob.encode()).hexdigest())
"""


def test_same_tasks_in_every_process():
    """Seeded output must not depend on Python's per-process string hashing."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(_HASH_SCRIPT, {})
    src = str(Path(__file__).resolve().parents[1] / "src")
    other_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = dict(os.environ, PYTHONHASHSEED=other_seed,
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    there = subprocess.run([sys.executable, "-c", _HASH_SCRIPT], env=env, check=True,
                           capture_output=True, text=True).stdout
    assert here.getvalue().strip() == there.strip()
