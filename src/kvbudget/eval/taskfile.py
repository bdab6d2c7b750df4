"""Task files: JSONL, one shared context per line, several questions asked against it.

Format (DESIGN.md, "Task files")::

    {"id": "conv-0007",
     "context": "a document" | [{"role": "user", "content": "..."}, ...],
     "questions": [{"question": "...", "answers": ["..."], "metric": "contains",
                    "category": "needle"}],
     "meta": {"benchmark": "ruler", "task": "niah_single_1", "length": 4096, "seed": 0}}

``metric`` is one of `metrics.METRICS`; ``category`` (optional) groups scores in reports; ``meta``
(optional) records where a task came from and the settings that regenerate it (generator or
dataset, task name, length, seed, haystack, tokenizer): reports and summaries list it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import TaskFileError
from ..fileio import atomic_open
from .metrics import METRICS

ROLES = ("user", "assistant", "system")


@dataclass
class Question:
    """One question asked against a task's shared context."""

    question: str
    answers: list[str]
    metric: str
    category: str | None = None


@dataclass
class Task:
    """A shared context (document string or chat messages) and its questions, in order."""

    id: str
    context: str | list[dict]
    questions: list[Question] = field(default_factory=list)
    meta: dict[str, Any] | None = None  # provenance: generator or dataset and its settings


class _FieldError(Exception):
    """Internal: a validation failure, turned into a TaskFileError with file and line."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"field '{field_name}' {problem}")


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value),
                                                                     type(value).__name__)


def _nonempty_str(obj: dict, key: str, name: str) -> str:
    if key not in obj:
        raise _FieldError(name, "is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise _FieldError(name, f"must be a string (got {_type_name(value)})")
    if not value.strip():
        raise _FieldError(name, "must not be empty")
    return value


def _parse_context(value: Any) -> str | list[dict]:
    if isinstance(value, str):
        if not value.strip():
            raise _FieldError("context", "must not be empty")
        return value
    if not isinstance(value, list):
        raise _FieldError("context", "must be a string or a list of messages "
                                     f"(got {_type_name(value)})")
    if not value:
        raise _FieldError("context", "must not be an empty list")
    messages = []
    for i, msg in enumerate(value):
        name = f"context[{i}]"
        if not isinstance(msg, dict):
            raise _FieldError(name, f"must be a message object (got {_type_name(msg)})")
        if "role" not in msg:
            raise _FieldError(f"{name}.role", "is missing")
        if msg["role"] not in ROLES:
            raise _FieldError(f"{name}.role",
                              f"must be one of {', '.join(ROLES)} (got {msg['role']!r})")
        if "content" not in msg:
            raise _FieldError(f"{name}.content", "is missing")
        if not isinstance(msg["content"], str):
            raise _FieldError(f"{name}.content",
                              f"must be a string (got {_type_name(msg['content'])})")
        messages.append({"role": msg["role"], "content": msg["content"]})
    return messages


def _parse_question(value: Any, i: int) -> Question:
    name = f"questions[{i}]"
    if not isinstance(value, dict):
        raise _FieldError(name, f"must be an object (got {_type_name(value)})")
    text = _nonempty_str(value, "question", f"{name}.question")
    if "answers" not in value:
        raise _FieldError(f"{name}.answers", "is missing")
    answers = value["answers"]
    if (not isinstance(answers, list) or not answers
            or not all(isinstance(a, str) for a in answers)):
        raise _FieldError(f"{name}.answers", "must be a non-empty list of strings")
    if "metric" not in value:
        raise _FieldError(f"{name}.metric", "is missing")
    metric = value["metric"]
    if metric not in METRICS:
        raise _FieldError(f"{name}.metric",
                          f"must be one of {', '.join(METRICS)} (got {metric!r})")
    category = value.get("category")
    if category is not None and not isinstance(category, str):
        raise _FieldError(f"{name}.category",
                          f"must be a string (got {_type_name(category)})")
    return Question(question=text, answers=list(answers), metric=metric, category=category)


def task_from_dict(obj: Any) -> Task:
    """Build a Task from its JSON object; raises TaskFileError naming the bad field."""
    if not isinstance(obj, dict):
        raise TaskFileError(f"a task must be a JSON object (got {_type_name(obj)})")
    try:
        return _task_from_dict(obj)
    except _FieldError as exc:
        raise TaskFileError(str(exc)) from None


def _task_from_dict(obj: dict) -> Task:
    task_id = _nonempty_str(obj, "id", "id")
    if "context" not in obj:
        raise _FieldError("context", "is missing")
    context = _parse_context(obj["context"])
    if "questions" not in obj:
        raise _FieldError("questions", "is missing")
    questions = obj["questions"]
    if not isinstance(questions, list):
        raise _FieldError("questions", f"must be a list (got {_type_name(questions)})")
    if not questions:
        raise _FieldError("questions", "must not be empty")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise _FieldError("meta", f"must be an object (got {_type_name(meta)})")
    return Task(id=task_id, context=context,
                questions=[_parse_question(q, i) for i, q in enumerate(questions)],
                meta=dict(meta) if meta is not None else None)


def task_to_dict(task: Task) -> dict:
    """The JSON object of a task (category and meta are written only when set)."""
    questions = []
    for q in task.questions:
        d: dict[str, Any] = {"question": q.question, "answers": list(q.answers),
                             "metric": q.metric}
        if q.category is not None:
            d["category"] = q.category
        questions.append(d)
    context = task.context if isinstance(task.context, str) else [dict(m) for m in task.context]
    out: dict[str, Any] = {"id": task.id, "context": context, "questions": questions}
    if task.meta is not None:
        out["meta"] = dict(task.meta)
    return out


def read_text(path: str | os.PathLike) -> str:
    """The text of a task file (UTF-8); a missing or unreadable file raises TaskFileError naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"{p}: task file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{p}: cannot read task file ({exc})") from None


def read_tasks(path: str | os.PathLike) -> list[Task]:
    """Read and validate a JSONL task file; blank lines are skipped.

    Raises TaskFileError with a one-line message naming the file, the 1-based line and the
    field, e.g. ``tasks.jsonl line 3: field 'questions[1].metric' must be one of ...``.
    """
    p = Path(path)
    text = read_text(p)
    tasks: list[Task] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p.name} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") \
                from None
        if not isinstance(obj, dict):
            raise TaskFileError(f"{where}: must be a JSON object (got {_type_name(obj)})")
        try:
            task = _task_from_dict(obj)
        except _FieldError as exc:
            raise TaskFileError(f"{where}: {exc}") from None
        if task.id in seen:
            raise TaskFileError(f"{where}: field 'id' duplicates the id {task.id!r} "
                                f"of line {seen[task.id]}")
        seen[task.id] = lineno
        tasks.append(task)
    if not tasks:
        raise TaskFileError(f"{p}: task file is empty")
    return tasks


def write_tasks(path: str | os.PathLike, tasks: Iterable[Task]) -> None:
    """Write tasks as JSONL atomically: a half-written file never replaces the old one."""
    with atomic_open(path) as f:
        for task in tasks:
            f.write(json.dumps(task_to_dict(task), ensure_ascii=False) + "\n")


def context_messages(task: Task) -> list[dict]:
    """The task's context as chat messages: a document becomes one user message."""
    if isinstance(task.context, str):
        return [{"role": "user", "content": task.context}]
    return [dict(m) for m in task.context]
