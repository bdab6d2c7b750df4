"""Loader of the published LongMemEval data (Wu et al., 2025; xiaowu0162/longmemeval): each record is
one question over its own history of timestamped user-assistant sessions, turned into our
conversation format.

A record holds ``question_id``, ``question_type`` (single-session-user, single-session-assistant,
single-session-preference, multi-session, knowledge-update, temporal-reasoning; ids ending in
``_abs`` are abstention questions), ``question``, ``answer``, ``question_date``,
``haystack_dates`` and ``haystack_sessions`` (a list of sessions, each a list of ``{"role",
"content"}`` turns). The sessions become one list of chat messages, each session's first message
starting with its date ("Session date: 2023/05/20 (Sat) 02:21"); the question carries the date it is
asked on, and its type is the category. LongMemEval grades answers with an LLM judge; offline, token
F1 against the gold answer stands in (docs/field-benchmarks.md).
"""

from __future__ import annotations

from ..taskfile import Question, Task
from .fields import FieldError, answer_text, as_object, need, text

NAME = "longmemeval"
TITLE = "LongMemEval"
FIELDS = ("question", "haystack_sessions")
_ROLES = ("user", "assistant", "system")


def _messages(record: dict) -> list[dict]:
    sessions = need(record, "haystack_sessions", list)
    dates = need(record, "haystack_dates", list)
    if not sessions:
        raise FieldError("haystack_sessions", "must not be empty")
    if len(dates) != len(sessions):
        raise FieldError("haystack_dates", f"must hold one date per session ({len(sessions)}, got {len(dates)})")
    messages: list[dict] = []
    for s, (session, date) in enumerate(zip(sessions, dates)):
        if not isinstance(date, str):
            raise FieldError(f"haystack_dates[{s}]", "must be a string")
        if not isinstance(session, list):
            raise FieldError(f"haystack_sessions[{s}]", "must be a list of turns")
        for t, turn in enumerate(session):
            path = f"haystack_sessions[{s}][{t}]"
            turn = as_object(turn, path)
            role = need(turn, "role", str, f"{path}.role")
            if role not in _ROLES:
                raise FieldError(f"{path}.role", f"must be one of {', '.join(_ROLES)} (got {role!r})")
            content = need(turn, "content", str, f"{path}.content")
            if t == 0:
                content = f"Session date: {date}\n{content}"
            messages.append({"role": role, "content": content})
    if not messages:
        raise FieldError("haystack_sessions", "holds no turns")
    return messages


def to_tasks(record: dict, index: int, source: str, source_name: str) -> list[Task]:
    """One task per record: the whole history as the context, the record's question asked after it."""
    question_id = text(record, "question_id")
    category = text(record, "question_type")
    asked = text(record, "question")
    gold = answer_text(need(record, "answer", (str, int, float)), "answer")
    date = record.get("question_date")
    if date is not None and not isinstance(date, str):
        raise FieldError("question_date", "must be a string")
    messages = _messages(record)
    question = f"Current date: {date}. {asked}" if date else asked
    return [Task(id=question_id, context=messages, questions=[Question(question, [gold], "f1", category)],
                 meta={"benchmark": "longmemeval", "source": source, "index": index})]
