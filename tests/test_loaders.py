"""Loaders of published datasets, each on a small fixture in the dataset's own schema: SCBench
(multi-turn shared context), LongMemEval and LoCoMo (dated multi-session conversations); schema
recognition, forced formats, errors naming the field, and dataset ids through HF datasets."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest

from kvbudget.cli import main
from kvbudget.errors import KVBudgetError, TaskFileError
from kvbudget.eval.loaders.registry import detect_format, load_tasks, read_records
from kvbudget.eval.metrics import score
from kvbudget.eval.taskfile import Question, Task, write_tasks

FIXTURES = Path(__file__).parent / "fixtures"
SCBENCH_KV = FIXTURES / "scbench_kv.jsonl"
SCBENCH_CHOICE = FIXTURES / "scbench_choice_eng.jsonl"
LONGMEMEVAL = FIXTURES / "longmemeval_oracle.json"
LOCOMO = FIXTURES / "locomo10.json"


def test_scbench_kv_turns_in_order():
    (task,) = load_tasks(str(SCBENCH_KV))
    record = json.loads(SCBENCH_KV.read_text())
    assert task.id == "scbench_kv-0" and task.meta == {"benchmark": "scbench", "task": "scbench_kv",
                                                       "source": "scbench_kv.jsonl", "index": 0}
    assert task.context == ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
                            + record["context"])
    assert [q.question for q in task.questions] == [t["input"] for t in record["multi_turns"]]
    assert [q.answers for q in task.questions] == [[t["answer"]] for t in record["multi_turns"]]
    assert {(q.metric, q.category) for q in task.questions} == {("string_match_all", "scbench_kv")}


def test_scbench_task_name_from_the_file_name(tmp_path):
    # The published files are named multi_turn_kv.jsonl (data/) or scbench_kv.jsonl (the scripts).
    renamed = tmp_path / "multi_turn_kv.jsonl"
    renamed.write_text(SCBENCH_KV.read_text())
    assert load_tasks(str(renamed))[0].questions[0].category == "scbench_kv"
    other = tmp_path / "my_data.jsonl"
    other.write_text(SCBENCH_KV.read_text())
    (task,) = load_tasks(str(other))
    assert task.questions[0].category == "scbench" and task.questions[0].metric == "contains"


def test_scbench_choice_options_and_letters():
    (task,) = load_tasks(str(SCBENCH_CHOICE))
    first, second = task.questions
    assert first.question.endswith("\nA. Letters to Tomas\nB. The weather\nC. The names of boats\nD. Her accounts")
    assert first.answers == ["B. The weather"] and second.answers == ["C. A museum in Port Aldin"]
    assert first.metric == "choice" and first.category == "scbench_choice_eng"
    assert score("B", first.answers, "choice") == 1.0 and score("The answer is (A)", first.answers, "choice") == 0.0


def test_longmemeval_sessions_keep_their_dates():
    tasks = load_tasks(str(LONGMEMEVAL))
    records = json.loads(LONGMEMEVAL.read_text())
    assert [t.id for t in tasks] == ["e47becba", "gpt4_2655b836_abs"]
    first = tasks[0]
    assert [m["role"] for m in first.context] == ["user", "assistant", "user", "assistant"]
    assert first.context[0]["content"] == ("Session date: 2023/05/20 (Sat) 02:21\n"
                                           + records[0]["haystack_sessions"][0][0]["content"])
    assert first.context[2]["content"].startswith("Session date: 2023/05/22 (Mon) 11:02\n")
    assert first.context[1]["content"] == records[0]["haystack_sessions"][0][1]["content"]  # only first turns dated
    (q,) = first.questions
    assert q.question == "Current date: 2023/05/30 (Tue) 23:40. What degree did I graduate with?"
    assert (q.answers, q.metric, q.category) == (["Business Administration"], "f1", "single-session-user")
    assert tasks[1].questions[0].category == "temporal-reasoning"


def test_locomo_one_conversation_questions_by_category():
    (task,) = load_tasks(str(LOCOMO))
    assert task.id == "locomo-conv-26"
    roles = [m["role"] for m in task.context]
    assert roles == ["user", "assistant", "user", "assistant", "assistant", "user", "assistant"]
    assert task.context[0]["content"] == ("DATE: 1:56 pm on 8 May, 2023\nCaroline: Hey Mel! I went to a support "
                                          "group yesterday and it was so powerful.")
    assert task.context[3]["content"].endswith("[shares a painting of a lake at sunrise]")
    assert task.context[4]["content"].startswith("DATE: 1:14 pm on 25 May, 2023\nMelanie: ")
    cats = [q.category for q in task.questions]
    assert cats == ["cat4-single-hop", "cat2-temporal", "cat1-multi-hop", "cat3-open-domain", "cat5-adversarial"]
    assert [q.metric for q in task.questions] == ["f1", "f1", "f1", "f1", "contains"]
    assert task.questions[3].answers == ["Likely yes"]  # category 3: the part before ';', as LoCoMo scores it
    adversarial = task.questions[4]
    assert score("Not mentioned in the conversation.", adversarial.answers, adversarial.metric) == 1.0
    assert score("Oscar", adversarial.answers, adversarial.metric) == 0.0
    assert task.questions[0].question.startswith("What did Caroline research or plan to study? ")


def test_schema_detection(tmp_path):
    ours = tmp_path / "ours.jsonl"
    write_tasks(ours, [Task("t1", "A document.", [Question("Q?", ["a"], "contains")])])
    kinds = {}
    for path in (ours, SCBENCH_KV, LONGMEMEVAL, LOCOMO):
        records, _ = read_records(path)
        kinds[path.name] = detect_format(records[0])
    assert kinds == {"ours.jsonl": "kvbudget", "scbench_kv.jsonl": "scbench", "longmemeval_oracle.json": "longmemeval",
                     "locomo10.json": "locomo"}
    assert load_tasks(str(ours))[0].id == "t1"
    assert detect_format({"input": "x", "outputs": ["y"]}) is None


@pytest.mark.parametrize("path, fmt, message", [
    (LOCOMO, "scbench", "locomo10.json record 1: field 'context' is missing (SCBench schema)"),
    (SCBENCH_KV, "longmemeval", "scbench_kv.jsonl record 1: field 'question_id' is missing (LongMemEval schema)"),
    (LONGMEMEVAL, "locomo", "longmemeval_oracle.json record 1: field 'conversation' is missing (LoCoMo schema)"),
    (LOCOMO, "kvbudget", "locomo10.json record 1: field 'id' is missing"),
])
def test_a_forced_format_names_the_missing_field(path, fmt, message):
    with pytest.raises(TaskFileError) as exc:
        load_tasks(str(path), fmt)
    assert str(exc.value) == message


def _edited(tmp_path, source: Path, edit) -> Path:
    data = json.loads(source.read_text())
    edit(data if isinstance(data, dict) else data[0])
    path = tmp_path / source.name
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("source, edit, message", [
    (LOCOMO, lambda r: r["qa"][1].update(category="two"), "field 'qa[1].category' must be an integer (got string)"),
    (LOCOMO, lambda r: r["conversation"].pop("session_2_date_time"),
     "field 'conversation.session_2_date_time' is missing (LoCoMo schema)"),
    (LONGMEMEVAL, lambda r: r["haystack_sessions"][1][0].update(role="bot"),
     "field 'haystack_sessions[1][0].role' must be one of user, assistant, system (got 'bot')"),
    (LONGMEMEVAL, lambda r: r["haystack_dates"].pop(), "field 'haystack_dates' must hold one date per session"),
    (SCBENCH_KV, lambda r: r["multi_turns"][2].pop("answer"), "field 'multi_turns[2].answer' is missing"),
    (SCBENCH_CHOICE, lambda r: r["multi_turns"][0].update(answer="Poems"),
     "field 'multi_turns[0].answer' is not one of the turn's options"),
])
def test_a_bad_field_is_named(tmp_path, source, edit, message):
    with pytest.raises(TaskFileError, match="record 1: " + re.escape(message)):
        load_tasks(str(_edited(tmp_path, source, edit)))


def test_unknown_schema_and_format(tmp_path):
    path = tmp_path / "ruler_native.jsonl"
    path.write_text(json.dumps({"index": 0, "input": "...", "outputs": ["1"]}) + "\n")
    with pytest.raises(TaskFileError, match=r"cannot recognise the schema of record 1 \(fields: index, input, outputs\)"):
        load_tasks(str(path))
    with pytest.raises(KVBudgetError, match="unknown format 'squad'"):
        load_tasks(str(SCBENCH_KV), "squad")


def test_cli_wrong_schema_is_one_line_exit_2(capsys):
    code = main(["eval", "--tasks", str(LOCOMO), "--format", "scbench", "--policy", "snapkv", "--budget", "2x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["kvbudget: error: locomo10.json record 1: field 'context' is missing (SCBench schema)"]


def test_dataset_id_needs_the_datasets_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when not installed
    with pytest.raises(KVBudgetError, match=r"pip install 'kvbudget\[datasets\]'"):
        load_tasks("microsoft/SCBench:scbench_kv")


def test_dataset_id_reads_rows_through_datasets(monkeypatch):
    calls = []
    rows = [json.loads(line) for line in SCBENCH_KV.read_text().splitlines()]

    def load_dataset(repo, split, **kwargs):
        calls.append((repo, split, kwargs))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (task,) = load_tasks("microsoft/SCBench:scbench_kv")
    assert calls == [("microsoft/SCBench", "train", {"name": "scbench_kv"})]
    assert task.meta["source"] == "microsoft/SCBench:scbench_kv" and task.questions[0].category == "scbench_kv"
    load_tasks("xiaowu0162/longmemeval-cleaned:longmemeval_oracle.json", "scbench")
    assert calls[-1] == ("xiaowu0162/longmemeval-cleaned", "train", {"data_files": "longmemeval_oracle.json"})

    def offline(repo, split, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(KVBudgetError, match=r"^cannot load dataset 'microsoft/SCBench:scbench_kv': Couldn't reach the Hub$"):
        load_tasks("microsoft/SCBench:scbench_kv")


def test_task_meta_must_be_an_object():
    from kvbudget.eval.taskfile import task_from_dict

    good = {"id": "t", "context": "c", "questions": [{"question": "q", "answers": ["a"], "metric": "exact"}]}
    assert task_from_dict({**good, "meta": {"benchmark": "ruler"}}).meta == {"benchmark": "ruler"}
    with pytest.raises(TaskFileError, match="field 'meta' must be an object \\(got string\\)"):
        task_from_dict({**good, "meta": "ruler"})
