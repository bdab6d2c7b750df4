"""Loader of the published LoCoMo data (Maharana et al., 2024; snap-research/locomo, ``locomo10.json``):
a long conversation between two people over many dated sessions, and questions about it by category,
turned into our conversation format with every question asked against the one conversation.

A record holds ``sample_id``, ``conversation`` (``speaker_a``, ``speaker_b``, ``session_N``: a list of
``{"speaker", "dia_id", "text"}`` turns, optionally ``blip_caption`` for a shared image, and
``session_N_date_time``) and ``qa`` (``question``, ``answer``, ``evidence``, ``category``; category 5
questions have an ``adversarial_answer`` instead: the conversation does not say). Speaker A's turns
become user messages and speaker B's assistant messages, each starting with the speaker's name; each
session's first turn starts with its date ("DATE: 1:56 pm on 8 May, 2023"), as LoCoMo's prompt has it.
The metric is LoCoMo's: token F1 for categories 1-4 (category 3: the part of the answer before ';'),
and for category 5 whether the answer says the information is not there.
"""

from __future__ import annotations

import re

from ..taskfile import Question, Task
from .fields import FieldError, answer_text, as_object, need, text

NAME = "locomo"
TITLE = "LoCoMo"
FIELDS = ("conversation", "qa")

# LoCoMo's categories, named as its evaluation code treats them (1: answers listing several parts).
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
# Category 5 is right when the answer says the conversation does not tell (LoCoMo's test).
NOT_THERE = ["not mentioned", "no information available"]
_SUFFIX = " Answer with a short phrase, using exact words from the conversation where possible."
_SESSION = re.compile(r"^session_(\d+)$")


def category_name(n: int) -> str:
    """``cat4-single-hop`` for 4: the number LoCoMo's tables use, and what it asks."""
    return f"cat{n}-{CATEGORIES[n]}" if n in CATEGORIES else f"cat{n}"


def _messages(conv: dict) -> list[dict]:
    speaker_a = text(conv, "speaker_a", "conversation.speaker_a")
    text(conv, "speaker_b", "conversation.speaker_b")
    numbers = sorted(int(m.group(1)) for k in conv if (m := _SESSION.match(k)))
    if not numbers:
        raise FieldError("conversation.session_1", "is missing")
    messages: list[dict] = []
    for n in numbers:
        path = f"conversation.session_{n}"
        turns = need(conv, f"session_{n}", list, path)
        date = text(conv, f"session_{n}_date_time", f"{path}_date_time")
        for t, turn in enumerate(turns):
            turn = as_object(turn, f"{path}[{t}]")
            speaker = text(turn, "speaker", f"{path}[{t}].speaker")
            said = need(turn, "text", str, f"{path}[{t}].text")
            content = f"{speaker}: {said}"
            caption = turn.get("blip_caption")
            if isinstance(caption, str) and caption.strip():
                content += f" [shares {caption.strip()}]"
            if t == 0:
                content = f"DATE: {date}\n{content}"
            messages.append({"role": "user" if speaker == speaker_a else "assistant", "content": content})
    if not messages:
        raise FieldError("conversation", "holds no turns")
    return messages


def _question(qa: dict, path: str) -> Question:
    asked = text(qa, "question", f"{path}.question")
    category = need(qa, "category", int, f"{path}.category")
    if category == 5:
        return Question(asked + _SUFFIX, list(NOT_THERE), "contains", category_name(5))
    gold = answer_text(need(qa, "answer", (str, int, float), f"{path}.answer"), f"{path}.answer")
    if category == 3:
        gold = gold.split(";")[0].strip() or gold
    return Question(asked + _SUFFIX, [gold], "f1", category_name(category))


def to_tasks(record: dict, index: int, source: str, source_name: str) -> list[Task]:
    """One task per conversation, its questions asked in the file's order."""
    conv = as_object(need(record, "conversation", dict), "conversation")
    qas = need(record, "qa", list)
    if not qas:
        raise FieldError("qa", "must not be empty")
    messages = _messages(conv)
    questions = [_question(as_object(qa, f"qa[{j}]"), f"qa[{j}]") for j, qa in enumerate(qas)]
    sample = record.get("sample_id", index)
    return [Task(id=f"locomo-{sample}", context=messages, questions=questions,
                 meta={"benchmark": "locomo", "source": source, "index": index})]
