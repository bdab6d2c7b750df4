"""Task files: round trip, one-line errors naming file/line/field, atomic writes."""

from __future__ import annotations

import json

import pytest

from kvbudget.errors import TaskFileError
from kvbudget.eval.taskfile import Question, Task, context_messages, read_tasks, task_from_dict, task_to_dict, write_tasks

GOOD_Q = {"question": "What is the code?", "answers": ["4721"], "metric": "contains"}


def _good(i: int = 0) -> dict:
    return {"id": f"t{i}", "context": "A document.", "questions": [dict(GOOD_Q)]}


def _tasks() -> list[Task]:
    return [
        Task("doc-1", "The code for the blue door is 4721.",
             [Question("What is the code for the blue door?", ["4721"], "contains", "needle"),
              Question("Which door?", ["blue", "the blue one"], "f1")]),
        Task("conv-1", [{"role": "user", "content": "I moved to Oslo."},
                        {"role": "assistant", "content": "Nice! Ünïcødé ok."}],
             [Question("Where do I live?", ["Oslo"], "exact")]),
    ]


def test_round_trip(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_tasks(path, _tasks())
    assert read_tasks(path) == _tasks()
    assert [task_from_dict(task_to_dict(t)) for t in _tasks()] == _tasks()
    assert "category" not in task_to_dict(_tasks()[1])["questions"][0]


def test_blank_lines_skipped_and_line_numbers_count_them(tmp_path):
    path = tmp_path / "tasks.jsonl"
    bad = _good(2)
    bad["questions"][0]["metric"] = "fuzzy"
    path.write_text("\n" + json.dumps(_good(1)) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(TaskFileError) as exc:
        read_tasks(path)
    assert str(exc.value) == ("tasks.jsonl line 4: field 'questions[0].metric' must be one of "
                              "exact, contains, f1, choice, string_match_all (got 'fuzzy')")
    path.write_text("\n" + json.dumps(_good(1)) + "\n\n")
    assert [t.id for t in read_tasks(path)] == ["t1"]


def _with(**changes):
    obj = _good(1)
    for key, value in changes.items():
        if value is _DELETE:
            del obj[key]
        else:
            obj[key] = value
    return obj


_DELETE = object()


def _q(**changes) -> list[dict]:
    q = dict(GOOD_Q)
    for key, value in changes.items():
        if value is _DELETE:
            del q[key]
        else:
            q[key] = value
    return [dict(GOOD_Q), q]


MALFORMED = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "must be a JSON object (got list)"),
    (_with(id=_DELETE), "field 'id' is missing"),
    (_with(id=""), "field 'id' must not be empty"),
    (_with(id=7), "field 'id' must be a string (got number)"),
    (_with(context=_DELETE), "field 'context' is missing"),
    (_with(context=3), "field 'context' must be a string or a list of messages"),
    (_with(context="  "), "field 'context' must not be empty"),
    (_with(context=[]), "field 'context' must not be an empty list"),
    (_with(context=["hi"]), "field 'context[0]' must be a message object"),
    (_with(context=[{"content": "hi"}]), "field 'context[0].role' is missing"),
    (_with(context=[{"role": "user"}]), "field 'context[0].content' is missing"),
    (_with(context=[{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]),
     "field 'context[1].role' must be one of user, assistant, system (got 'bot')"),
    (_with(context=[{"role": "user", "content": None}]),
     "field 'context[0].content' must be a string (got null)"),
    (_with(questions=_DELETE), "field 'questions' is missing"),
    (_with(questions=[]), "field 'questions' must not be empty"),
    (_with(questions={"q": 1}), "field 'questions' must be a list (got object)"),
    (_with(questions=["what?"]), "field 'questions[0]' must be an object (got string)"),
    (_with(questions=_q(question=_DELETE)), "field 'questions[1].question' is missing"),
    (_with(questions=_q(question="")), "field 'questions[1].question' must not be empty"),
    (_with(questions=_q(answers=_DELETE)), "field 'questions[1].answers' is missing"),
    (_with(questions=_q(answers="4721")),
     "field 'questions[1].answers' must be a non-empty list of strings"),
    (_with(questions=_q(answers=[])),
     "field 'questions[1].answers' must be a non-empty list of strings"),
    (_with(questions=_q(answers=[4721])),
     "field 'questions[1].answers' must be a non-empty list of strings"),
    (_with(questions=_q(metric=_DELETE)), "field 'questions[1].metric' is missing"),
    (_with(questions=_q(metric="fuzzy")),
     "field 'questions[1].metric' must be one of exact, contains, f1, choice, string_match_all (got 'fuzzy')"),
    (_with(questions=_q(category=3)),
     "field 'questions[1].category' must be a string (got number)"),
]


@pytest.mark.parametrize("line,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_line_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "tasks.jsonl"
    text = line if isinstance(line, str) else json.dumps(line)
    path.write_text(json.dumps(_good(0)) + "\n" + text + "\n")
    with pytest.raises(TaskFileError) as exc:
        read_tasks(path)
    msg = str(exc.value)
    assert msg.startswith("tasks.jsonl line 2: "), msg
    assert message in msg
    assert "\n" not in msg


def test_duplicate_id(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps(_good(1)) + "\n" + json.dumps(_good(1)) + "\n")
    with pytest.raises(TaskFileError, match=r"tasks.jsonl line 2: field 'id' duplicates .*line 1"):
        read_tasks(path)


def test_empty_and_missing_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(TaskFileError, match="empty.jsonl: task file is empty"):
        read_tasks(path)
    with pytest.raises(TaskFileError, match="nope.jsonl: task file not found"):
        read_tasks(tmp_path / "nope.jsonl")


def test_task_from_dict_rejects_bad_objects():
    with pytest.raises(TaskFileError, match="JSON object"):
        task_from_dict([1])
    with pytest.raises(TaskFileError, match="field 'questions' is missing"):
        task_from_dict({"id": "a", "context": "x"})


def test_atomic_write_keeps_old_file_when_serialisation_fails(tmp_path):
    path = tmp_path / "tasks.jsonl"
    write_tasks(path, _tasks())
    before = path.read_bytes()
    broken = Task("bad", "ctx", [Question("q?", [object()], "exact")])  # not JSON-serialisable
    with pytest.raises(TypeError):
        write_tasks(path, [_tasks()[0], broken])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.jsonl"]  # no temp file left


def test_context_messages():
    doc, conv = _tasks()
    assert context_messages(doc) == [{"role": "user", "content": doc.context}]
    msgs = context_messages(conv)
    assert msgs == conv.context and msgs is not conv.context
