"""Where `kvbudget eval --tasks` reads tasks from: our task files, or a published dataset (SCBench,
LongMemEval, LoCoMo) as a local file or, online, a dataset id read through HF ``datasets``.

The schema is recognised from the first record's fields (ours: ``context`` + ``questions``; SCBench:
``context`` + ``multi_turns``; LongMemEval: ``question`` + ``haystack_sessions``; LoCoMo:
``conversation`` + ``qa``), or forced with ``fmt``; a record that does not fit its schema fails
with the first field it lacks or holds wrongly, named with the file and the record.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ...errors import KVBudgetError, TaskFileError
from ..taskfile import Task, read_tasks, read_text, task_from_dict
from . import locomo, longmemeval, scbench
from .fields import FieldError

LOADERS = {m.NAME: m for m in (scbench, longmemeval, locomo)}
OURS = "kvbudget"
FORMATS = ("auto", OURS, *LOADERS)
_TITLES = {OURS: "kvbudget task file", **{name: m.TITLE for name, m in LOADERS.items()}}
_DATA_FILES = (".json", ".jsonl", ".parquet")
_DATASET_ID = re.compile(r"[\w.-]+/[\w.-]+(:[\w./-]+)?")


def detect_format(record: dict) -> str | None:
    """The schema a record is in (``kvbudget``, ``scbench``, ``longmemeval``, ``locomo``), or None."""
    if {"context", "questions"} <= set(record):
        return OURS
    for name, loader in LOADERS.items():
        if set(loader.FIELDS) <= set(record):
            return name
    return None


def read_records(path: str | Path) -> tuple[list[dict], bool]:
    """The records of a local file: a JSON array (LongMemEval, LoCoMo), one JSON object, or JSONL;
    and whether it was JSONL (one record per line)."""
    p = Path(path)
    body = read_text(p)
    start = body.lstrip()[:1]
    if start in ("[", "{"):
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            data = None  # JSONL: one object per line
        if isinstance(data, list):
            for i, rec in enumerate(data):
                if not isinstance(rec, dict):
                    raise TaskFileError(f"{p.name} record {i + 1}: must be a JSON object")
            return data, False
        if isinstance(data, dict):
            return [data], False
    records = []
    for n, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"{p.name} line {n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise TaskFileError(f"{p.name} line {n}: must be a JSON object")
        records.append(rec)
    return records, True


def is_dataset_id(source: str) -> bool:
    """``owner/name`` or ``owner/name:config`` (or ``:data_file.json``) that is not a local path."""
    return (not Path(source).exists() and _DATASET_ID.fullmatch(source) is not None
            and Path(source.split(":", 1)[0]).suffix not in _DATA_FILES)


def dataset_records(spec: str) -> tuple[list[dict], str]:
    """Rows of a dataset id through HF ``datasets`` (the ``train`` split) and the name that tells its
    task (config or data file stem, else the dataset name). Needs ``kvbudget[datasets]``, online."""
    try:
        import datasets
    except ImportError:
        raise KVBudgetError(f"{spec}: no such file; to read it as a dataset id, install HF datasets: "
                            "pip install 'kvbudget[datasets]'") from None
    repo, _, name = spec.partition(":")
    kwargs = {"data_files": name} if name.endswith(_DATA_FILES) else {"name": name} if name else {}
    try:
        rows = datasets.load_dataset(repo, split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub, network and config errors vary; each becomes one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KVBudgetError(f"cannot load dataset {spec!r}: {first}") from None
    return [dict(r) for r in rows], Path(name).stem if name else repo.split("/")[-1]


def load_tasks(source: str, fmt: str = "auto") -> list[Task]:
    """Tasks from a file or a dataset id, in the schema ``fmt`` (``auto``: recognised)."""
    if fmt not in FORMATS:
        raise KVBudgetError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    from_file = not is_dataset_id(source)
    lines = False
    if from_file:
        (records, lines), label, name = read_records(source), Path(source).name, Path(source).stem
    else:
        (records, name), label = dataset_records(source), source
    if not records:
        raise TaskFileError(f"{label}: holds no records")
    if fmt == "auto":
        fmt = detect_format(records[0]) or ""
        if not fmt:
            raise TaskFileError(
                f"{label}: cannot recognise the schema of record 1 (fields: {', '.join(sorted(records[0])) or 'none'}); "
                "expected kvbudget (context, questions), SCBench (context, multi_turns), LongMemEval (question, "
                "haystack_sessions) or LoCoMo (conversation, qa), or name one with --format")
    if fmt == OURS:
        if lines:  # our JSONL task file: its reader names the line of a bad field
            return read_tasks(source)
        tasks = []
        for i, rec in enumerate(records):
            try:
                tasks.append(task_from_dict(rec))
            except TaskFileError as exc:
                raise TaskFileError(f"{label} record {i + 1}: {exc}") from None
        return _unique(tasks, label)
    loader = LOADERS[fmt]
    tasks = []
    for i, rec in enumerate(records):
        try:
            tasks += loader.to_tasks(rec, i, label, name)
        except FieldError as exc:
            raise TaskFileError(f"{label} record {i + 1}: {exc} ({_TITLES[fmt]} schema)") from None
    return _unique(tasks, label)


def _unique(tasks: list[Task], label: str) -> list[Task]:
    seen: set[str] = set()
    for t in tasks:
        if t.id in seen:
            raise TaskFileError(f"{label}: two records give the task id {t.id!r}")
        seen.add(t.id)
    return tasks
