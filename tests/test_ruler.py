"""RULER generated offline: each task at its length in the model's tokens, answers in the context,
seeded, and RULER's metric (string_match_all) on hand-made predictions."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvbudget.errors import KVBudgetError
from kvbudget.eval.prose import ntok
from kvbudget.eval.metrics import reference_answer, score
from kvbudget.eval.ruler import ANSWER_TOKENS, TASKS, make_ruler, split_sentences, task_kind
from kvbudget.eval.taskfile import read_tasks, task_to_dict, write_tasks
from kvbudget.runtime.models import load_tokenizer

LENGTH = 1000


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def every_task(tok):
    return {name: make_ruler(tok, name, n=2, length=LENGTH, seed=3, tokenizer_name="smollm2-135m") for name in TASKS}


@pytest.mark.parametrize("name", TASKS)
def test_task_fills_its_length_and_holds_its_answers(tok, every_task, name):
    for task in every_task[name]:
        (q,) = task.questions
        used = ntok(tok, task.context) + ntok(tok, q.question)
        budget = LENGTH - ANSWER_TOKENS[task_kind(name)]
        assert task.meta["tokens"] == used
        # As RULER: input + answer allowance <= length, filled to within one haystack unit.
        assert 0.9 * budget <= used <= budget
        assert q.metric == "string_match_all" and q.category == name
        assert q.answers and all(a in task.context for a in q.answers)
        assert a_not_in_question(q)
        assert {k: task.meta[k] for k in ("benchmark", "task", "length", "seed", "tokenizer")} == {
            "benchmark": "ruler", "task": name, "length": LENGTH, "seed": 3, "tokenizer": "smollm2-135m"}
    assert every_task[name][0].context != every_task[name][1].context  # two samples differ


def a_not_in_question(q) -> bool:
    return not any(a in q.question for a in q.answers)


@pytest.mark.parametrize("name", TASKS)
def test_seeded(tok, every_task, name):
    again = make_ruler(tok, name, n=2, length=LENGTH, seed=3, tokenizer_name="smollm2-135m")
    assert [task_to_dict(t) for t in again] == [task_to_dict(t) for t in every_task[name]]
    other = make_ruler(tok, name, n=1, length=LENGTH, seed=4)
    assert other[0].context != again[0].context


def test_haystacks_are_rulers(every_task):
    assert {name: ts[0].meta["haystack"] for name, ts in every_task.items()} == {
        "niah_single_1": "noise", "niah_single_2": "prose", "niah_single_3": "prose", "niah_multikey_1": "prose",
        "niah_multikey_2": "needle", "niah_multikey_3": "needle", "niah_multivalue": "prose", "niah_multiquery": "prose",
        "vt": "noise", "cwe": "none", "fwe": "none"}
    noise = every_task["niah_single_1"][0].context
    assert noise.count("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.") > 10


def test_needle_kinds(every_task):
    (single,) = every_task["niah_single_3"][0].questions
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", single.answers[0])
    assert single.question.startswith("What is the special magic uuid for ")
    (multi,) = every_task["niah_multivalue"][0].questions
    assert len(multi.answers) == 4 and all(re.fullmatch(r"\d{7}", a) for a in multi.answers)
    assert multi.question.startswith("What are all the special magic numbers for ")
    (query,) = every_task["niah_multiquery"][0].questions
    assert len(query.answers) == 4 and query.question.count(",") == 3 and ", and " in query.question
    # Multikey 2/3: the haystack is distractor needles; the asked key appears once, in its needle.
    task = every_task["niah_multikey_2"][0]
    key = re.search(r"for (\S+) mentioned", task.questions[0].question).group(1)
    assert task.context.count(key) == 1 and task.context.count("One of the special magic numbers for ") > 10


def test_variable_tracking_chain(every_task):
    task = every_task["vt"][0]
    names = task.questions[0].answers
    value = re.search(r"value (\d{5})", task.questions[0].question).group(1)
    body = task.context.split("Memorize and track")[-1]  # after the one-shot example
    assert f"VAR {names[0]} = {value}" in body
    positions = [body.index(f"VAR {b} = VAR {a}") for a, b in zip(names, names[1:])]
    assert positions == sorted(positions) and len(names) == 5


def test_common_and_frequent_words(every_task):
    task = every_task["cwe"][0]
    listed = task.context.split("\n")[-1]  # the numbered list after the one-shot example
    counts = Counter(re.findall(r"\d+\. (\w+)", listed))
    answers = set(task.questions[0].answers)
    assert len(answers) == 10 and min(counts[w] for w in answers) > max(c for w, c in counts.items() if w not in answers)
    task = every_task["fwe"][0]
    counts = Counter(task.context.split("most frequently appeared coded words. ", 1)[1].split())
    top = [w for w, _ in counts.most_common() if w != "..."][:3]
    assert top == task.questions[0].answers and counts["..."] > counts[top[0]]


def test_essay_haystack_from_a_file(tok, tmp_path):
    essay = tmp_path / "essay.txt"
    essay.write_text("Startups grow fast. Most of them fail? Some succeed!\n\nFounders learn by doing. " * 3)
    (task,) = make_ruler(tok, "niah_single_2", n=1, length=400, seed=0, essay=essay)
    assert task.meta["haystack"] == "essay" and task.meta["essay"].startswith("essay.txt sha256:")
    assert "Founders learn by doing." in task.context and task.questions[0].answers[0] in task.context
    (noise,) = make_ruler(tok, "niah_single_2", n=1, length=400, seed=0, haystack="noise")
    assert noise.meta["haystack"] == "noise" and "The grass is green." in noise.context
    assert split_sentences("One. Two?  Three!\nFour") == ["One.", "Two?", "Three!", "Four"]
    with pytest.raises(KVBudgetError, match="cannot read essay file"):
        make_ruler(tok, "niah_single_2", n=1, length=400, seed=0, essay=tmp_path / "missing.txt")


def test_bad_requests(tok):
    with pytest.raises(KVBudgetError, match="unknown RULER task 'niah_single_9'"):
        make_ruler(tok, "niah_single_9", n=1, length=400, seed=0)
    with pytest.raises(KVBudgetError, match="RULER vt at length 200: length too short"):
        make_ruler(tok, "vt", n=1, length=200, seed=0)


def test_round_trip_keeps_meta(tmp_path, every_task):
    path = tmp_path / "ruler.jsonl"
    write_tasks(path, every_task["vt"])
    assert [task_to_dict(t) for t in read_tasks(path)] == [task_to_dict(t) for t in every_task["vt"]]


def test_string_match_all_on_hand_made_predictions():
    gold = ["1234567", "7654321", "5550001", "ab12-CD34"]
    assert score("The numbers are 1234567, 7654321, 5550001 and AB12-cd34.", gold, "string_match_all") == 1.0
    assert score("They are 1234567 and 7654321.", gold, "string_match_all") == 0.5
    assert score("I do not know.", gold, "string_match_all") == 0.0
    # RULER's test is a plain substring: a value inside a longer number still counts, as there.
    assert score("91234567", ["1234567"], "string_match_all") == 1.0
    assert score("anything", [], "string_match_all") == 0.0
    assert reference_answer(gold, "string_match_all") == "1234567, 7654321, 5550001, ab12-CD34"
    assert reference_answer(["red", "crimson"], "contains") == "red"


@pytest.mark.parametrize("args, message", [
    (["--task", "niah_single_9"], "unknown RULER task 'niah_single_9'"),
    ([], "tasks make ruler needs --task NAME or --task all"),
    (["--task", "vt", "--length", "150"], "RULER vt at length 150: length too short"),
])
def test_cli_bad_ruler_request_is_one_line(tmp_path, capsys, args, message):
    from kvbudget.cli import main

    assert main(["tasks", "make", "ruler", *args, "--out", str(tmp_path / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvbudget: error: ") and message in err[0]
    assert not (tmp_path / "r.jsonl").exists()
    assert main(["tasks", "make", "needle", "--task", "vt", "--out", str(tmp_path / "n.jsonl")]) == 2
    assert "options of `tasks make ruler`" in capsys.readouterr().err
