"""Loader of the published SCBench data (Li et al., 2024; microsoft/SCBench): one shared context and
several turns of question and answer per record, turned into our multi-turn task format.

A record is ``{"id": 0, "context": "...", "multi_turns": [{"input": "...", "answer": "..."}, ...]}``
(``options`` on each turn of scbench_choice_eng; a list of numbers as the context of scbench_mf; a
``task`` on each turn of the two mixed tasks). The records do not name their task: it comes from the
file name (``scbench_kv.jsonl`` or ``multi_turn_kv.jsonl``) or the dataset config (``scbench_kv``).
Each task keeps SCBench's instruction before the context and its turns in order, with the task name
as the question category; the metric is SCBench's where ours has it (docs/field-benchmarks.md lists
the stand-ins).
"""

from __future__ import annotations

from typing import Any

from ..taskfile import Question, Task
from .fields import FieldError, answer_text, as_object, kind_name, need, text

NAME = "scbench"
TITLE = "SCBench"
FIELDS = ("context", "multi_turns")

# task -> (instruction placed before the context, metric). SCBench scores kv / prefix_suffix / vt by
# substring (vt: every value), choice by the option letter, qa_eng and many_shot by a gold string in the
# answer; the others by ROUGE, Chinese F1, a first-integer match or code similarity, for which token F1
# or contains stand in.
TASKS: dict[str, tuple[str | None, str]] = {
    "scbench_kv": ("Extract the value corresponding to the specified key in the JSON object below.", "string_match_all"),
    "scbench_prefix_suffix": (None, "string_match_all"),
    "scbench_vt": (None, "string_match_all"),
    "scbench_passkey": ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                        "I will quiz you about the important information.", "contains"),
    "scbench_repoqa": ("Based on the function description and code context, please retrieve and repeat the exact "
                       "described function from the code context in a code block wrapped by ```:", "f1"),
    "scbench_qa_eng": ("Read the book and answer the question. Be very concise in your answer.", "contains"),
    "scbench_qa_chn": ("阅读以下书籍然后回答问题。", "f1"),
    "scbench_choice_eng": ("Read the book and answer the question.", "choice"),
    "scbench_many_shot": (None, "contains"),
    "scbench_mf": (None, "contains"),
    "scbench_summary": (None, "f1"),
    "scbench_summary_with_needles": (None, "f1"),
    "scbench_repoqa_and_kv": (None, "f1"),
}
_LETTERS = "ABCDEFGH"


def task_name(source_name: str) -> str:
    """SCBench's task name from a file stem or config: ``multi_turn_kv`` and ``scbench_kv`` -> ``scbench_kv``."""
    name = source_name.lower()
    if name.startswith("multi_turn_"):
        name = "scbench_" + name[len("multi_turn_"):]
    return name if name in TASKS else "scbench"


def _answers(value: Any, path: str) -> list[str]:
    if isinstance(value, list):
        if not value:
            raise FieldError(path, "must not be an empty list")
        return [answer_text(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return [answer_text(value, path)]


def _context(record: dict) -> str:
    value = need(record, "context", (str, list))
    if isinstance(value, list):  # scbench_mf: the array itself, written as SCBench's prompt writes it
        if not value:
            raise FieldError("context", "must not be an empty list")
        return "[" + ", ".join(answer_text(v, f"context[{i}]") for i, v in enumerate(value)) + "]"
    if not value.strip():
        raise FieldError("context", "must not be empty")
    return value


def _question(turn: dict, task: str, path: str) -> Question:
    asked = text(turn, "input", f"{path}.input")
    metric = TASKS.get(task, (None, "contains"))[1]
    if task == "scbench_choice_eng":
        options = need(turn, "options", list, f"{path}.options")
        if not options or not all(isinstance(o, str) for o in options) or len(options) > len(_LETTERS):
            raise FieldError(f"{path}.options", f"must be a list of 1-{len(_LETTERS)} strings")
        gold = answer_text(need(turn, "answer", (str, int, float), f"{path}.answer"), f"{path}.answer")
        if gold not in options:
            raise FieldError(f"{path}.answer", "is not one of the turn's options")
        letter = _LETTERS[options.index(gold)]
        listed = "\n".join(f"{_LETTERS[i]}. {o}" for i, o in enumerate(options))
        return Question(f"{asked}\n{listed}", [f"{letter}. {gold}"], metric, task)
    if "answer" not in turn:
        raise FieldError(f"{path}.answer", "is missing")
    return Question(asked, _answers(turn["answer"], f"{path}.answer"), metric, task)


def to_tasks(record: dict, index: int, source: str, source_name: str) -> list[Task]:
    """One task per record: SCBench's instruction and the context, then every turn in order."""
    task = task_name(source_name)
    context = _context(record)
    turns = need(record, "multi_turns", list)
    if not turns:
        raise FieldError("multi_turns", "must not be empty")
    questions = []
    for i, turn in enumerate(turns):
        path = f"multi_turns[{i}]"
        turn = as_object(turn, path)
        sub = turn.get("task")  # the mixed tasks say which task each turn belongs to
        if sub is not None and not isinstance(sub, str):
            raise FieldError(f"{path}.task", f"must be a string (got {kind_name(sub)})")
        questions.append(_question(turn, sub or task, path))
    if task == "scbench_mf":  # SCBench puts the first turn's question before the array
        context = f"{questions[0].question}\n\n{context}"
    instruction = TASKS.get(task, (None, ""))[0]
    if instruction:
        context = f"{instruction}\n\n{context}"
    record_id = record.get("id", index)
    return [Task(id=f"{task}-{record_id}", context=context, questions=questions,
                 meta={"benchmark": "scbench", "task": task, "source": source, "index": index})]
