"""Run policies x budgets over a task set in up to three modes and score every question.

Modes (docs/guide.md):
- ``multi-turn``: the context is prefilled once per (policy, budget) without knowing the
  questions; the questions are then asked in order in the same session, each question and its
  gold answer appended before the next (every policy sees the same conversation text; only what
  the cache kept differs).
- ``multi-request``: the same compressed context, copied for each question, which is asked alone.
- ``query-aware``: the OPTIMISTIC reference of most papers: a fresh session per question whose
  context is compressed knowing that question.

Each row carries accuracy (the task's metric), answer retention (DESIGN.md, Measuring):
(lp_policy - lp_none) / (lp_full - lp_none) of the gold answer's teacher-forced mean
log-probability, and fidelity against the full cache on its own answer span: top-1 agreement and
mean KL of the next-token distributions, teacher-forced on the full cache's greedy answer.

A run is a sweep that can be resumed: rows are appended to ``results.jsonl`` one unit of work
(a `Cell`: task, policy, budget) at a time, and a rerun skips the cells whose rows are all there.
`plan_sweep`, `task_reference`, `run_cell`, `append_rows` and `finish_sweep` are the sweep's parts,
shared by `run_eval` (one process) and the Ray sweep (`kvbudget.distributed.sweep`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor
from tqdm.auto import tqdm

from ..compress.budget import parse_budget
from ..errors import BudgetError, KVBudgetError
from ..fileio import atomic_write_text
from ..kv.store import STORE_VARIANTS, STORES
from ..methods import describe, make_policy
from ..runtime.prefill import BLOCK_SIZE
from ..runtime.answer import Turn
from ..runtime.session import Session
from .fidelity import next_token_fidelity
from .metrics import reference_answer
from .metrics import score as score_answer
from .retention import question_retention
from .summary import format_table, summarize
from .taskfile import Task, task_to_dict

__all__ = ["MODES", "Cell", "EvalConfig", "SweepPlan", "TaskReference", "append_rows", "check_names", "expand_policies",
           "finish_sweep", "format_table", "parse_modes", "plan_cells", "plan_sweep", "progress_bar", "prompt_format",
           "read_results", "run_cell", "run_eval", "run_task", "sources", "summarize", "sweep_sources", "task_reference",
           "validate"]

MODES = ("multi-turn", "multi-request", "query-aware")

# Settings that change results: a resumed sweep must use the same ones as the rows it extends.
_RESULT_SETTINGS = ("block_size", "max_new_tokens", "window", "seed", "decode_interval", "model")
# Task metadata that differs between the samples of one generation setting.
_PER_SAMPLE = ("index", "tokens", "id", "speakers", "facts")  # chat: who speaks, where each answer is stated


@dataclass
class EvalConfig:
    """What to run: policies x budgets, in which modes, and how."""

    policies: list[str]
    budgets: list[str]
    block_size: int = BLOCK_SIZE
    max_new_tokens: int = 32
    window: int = 32
    seed: int = 0
    mode: str = "multi-turn"  # one mode, a comma list of modes, or "all"
    decode_interval: int | None = None  # decode-time compression every N new tokens (None: policy default)
    model: str | None = None  # recorded in results so that a resumed sweep cannot mix models
    # Further (policies, budgets) products run in the same sweep against the same full-cache
    # reference: a grid that is not one product (baselines at one budget, a method at several).
    more: list[tuple[list[str], list[str]]] = field(default_factory=list)

    @property
    def modes(self) -> list[str]:
        return parse_modes(self.mode)

    @property
    def products(self) -> list[tuple[list[str], list[str]]]:
        """Every (policies, budgets) product of the grid: the first, then `more`."""
        return [(self.policies, self.budgets), *self.more]


def parse_modes(mode: str) -> list[str]:
    """``"multi-turn,query-aware"`` or ``"all"`` -> modes in report order; unknown ones fail."""
    names = [m.strip() for m in mode.split(",") if m.strip()]
    if names == ["all"]:
        return list(MODES)
    for m in names:
        if m not in MODES:
            raise KVBudgetError(f"unknown mode '{m}' (known: {', '.join(MODES)}, all)")
    if not names:
        raise KVBudgetError("no mode given")
    return [m for m in MODES if m in names]


def expand_policies(names: list[str]) -> list[str]:
    """Replace ``all`` by every registered policy (``kvbudget policies``), except ``full``, which
    every grid has anyway, store names that only alias one of their variants (kivi = kivi2), and
    options (``+rerotate``), which are parts of a policy name, not policies."""
    if "all" not in names:
        return names

    every = []
    for row in describe():
        name = row["name"]
        aliased = row["kind"] == "store" and name not in STORE_VARIANTS and any(
            STORES[v] is STORES[name] for v in STORE_VARIANTS)
        if name != "full" and not aliased and row["kind"] != "option":
            every.append(name)
    out: list[str] = []
    for name in names:
        for n in every if name == "all" else [name]:
            if n not in out:
                out.append(n)
    return out


def plan_cells(cfg: EvalConfig) -> list[tuple[str, str | None]]:
    """The (policy, budget) cells of the grid, each once: the full cache first, then every product's
    policies at its budgets; a policy that evicts nothing (a store alone) once, without a budget."""
    cells: list[tuple[str, str | None]] = [("full", None)]
    for policies, budgets in cfg.products:
        for name in expand_policies(policies):
            if name == "full":
                continue
            evicts = make_policy(name, budget=1).evicts  # a store alone (kivi4): no budget to sweep
            for b in budgets if evicts else [None]:
                if (name, b) not in cells:
                    cells.append((name, b))
    return cells


def context_tokens(tok, task: Task) -> int:
    """Tokens of a task's context as a session feeds it (chat template included)."""
    messages = [{"role": "user", "content": task.context}] if isinstance(task.context, str) else task.context
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False)
        return len(tok(text, add_special_tokens=False).input_ids)
    return len(tok(messages[0]["content"]).input_ids)


def prompt_format(tok) -> str:
    """How a session frames context and questions for this tokenizer: its chat template, or (base
    models) the plain completion prompt "<context>\n\nQuestion: ...\nAnswer:"."""
    return "chat template" if getattr(tok, "chat_template", None) else "plain completion (Question: / Answer:)"


def check_names(cfg: EvalConfig) -> None:
    """Unknown policies, modes and unreadable budgets fail before anything is loaded."""
    parse_modes(cfg.mode)
    for policies, budgets in cfg.products:
        for name in expand_policies(policies):
            make_policy(name, budget=1)  # raises UnknownPolicyError with the known names
        for b in budgets:
            parse_budget(b)


def validate(cfg: EvalConfig, tok, tasks: list[Task]) -> dict[str, int]:
    """Check names and budgets before any work: unknown policy, bad budget, budget > context."""
    check_names(cfg)
    budgets = [parse_budget(b) for _, bs in cfg.products for b in bs]
    lengths = {t.id: context_tokens(tok, t) for t in tasks}
    for b in budgets:
        if b.tokens is None:
            continue
        for task_id, n in lengths.items():
            if b.tokens > n:
                raise BudgetError(
                    f"budget {b.tokens} is larger than the context of task '{task_id}' ({n} tokens): "
                    "nothing to compress; use a smaller budget or a ratio such as 4x"
                )
    return lengths


# --------------------------------------------------------------------------- one unit of work


@dataclass
class _Reference:
    """What the full cache gave for one question in one mode: the baseline of every other row."""

    answer_logprob: float
    kv_bytes: int
    kv_entries: int
    steps: Tensor | None  # [steps, vocab]: log-softmax of each greedy decoding step


def _no_context_logprobs(model, tok, task: Task) -> list[float]:
    out = []
    for q in task.questions:
        s = Session(model, tok, "full")
        out.append(s.ask_detailed(q.question, max_new_tokens=0, gold=reference_answer(q.answers, q.metric)).answer_logprob)
    return out


def run_task(model, tok, task: Task, name: str, budget: str | None, cfg: EvalConfig,
             references: dict[tuple[str, int], _Reference] | None = None) -> list[dict]:
    """One task under one policy in every mode of ``cfg``; one row per (mode, question).

    With ``references`` (the full cache's turns, keyed by (mode, question index)) each turn is
    also teacher-forced on the full cache's answer, for the fidelity columns; without them (the
    full cache itself) the turn keeps its own decoding distributions to serve as the reference.
    """
    policy = make_policy(
        name, budget=budget, window=cfg.window, seed=cfg.seed,
        decode_interval=cfg.decode_interval,
    )
    modes = cfg.modes
    rows: list[dict] = []

    def ask(session: Session, mode: str, i: int, history: bool) -> Turn:
        q = task.questions[i]
        ref = references.get((mode, i)) if references is not None else None
        reference = ref.steps.argmax(-1).tolist() if ref is not None and ref.steps is not None else None
        gold = reference_answer(q.answers, q.metric)
        return session.ask_detailed(q.question, cfg.max_new_tokens, gold=gold,
                                    history_answer=gold if history else None,
                                    reference=reference, keep_steps=references is None)

    def add(mode: str, i: int, session: Session, stats, held: tuple[int, int, int], turn: Turn) -> None:
        """One result row; ``held``: the session's (KV bytes, entries, stored bytes) after the context."""
        q = task.questions[i]
        kv_bytes, kv_entries, stored_bytes = held
        rows.append({
            "task": task.id, "question_index": i, "category": q.category, "mode": mode,
            "policy": session.policy.name, "budget": budget if budget is not None else "-",
            "budget_tokens": session.tokens, "context_tokens": stats.tokens,
            "question": q.question, "answers": q.answers, "metric": q.metric, "prediction": turn.text,
            "score": score_answer(turn.text, q.answers, q.metric), "answer_logprob": turn.answer_logprob,
            "kv_bytes": kv_bytes, "kv_entries": kv_entries, "peak_bytes": turn.peak_bytes, "prefill_s": stats.seconds,
            # EpiCache holds one cache per episode (one on the device at a time).
            "stored_bytes": stored_bytes,
            "compress_s": stats.compress_seconds, "decode_s": turn.decode_s, "new_tokens": len(turn.token_ids),
            "_turn": turn,  # dropped before writing: the full cache's turns become the references
        })

    if "multi-turn" in modes or "multi-request" in modes:
        session = Session(model, tok, policy, block_size=cfg.block_size)
        stats = session.add_context(task.context)
        held = _held(session)
        if "multi-request" in modes:  # before multi-turn, which extends the session
            for i in range(len(task.questions)):
                add("multi-request", i, session, stats, held, ask(session.fork(), "multi-request", i, False))
        if "multi-turn" in modes:
            for i in range(len(task.questions)):
                add("multi-turn", i, session, stats, held, ask(session, "multi-turn", i, True))
    if "query-aware" in modes:
        if not policy.evicts and "multi-request" in modes:
            # The question only steers eviction: without eviction, query-aware = multi-request.
            rows += [dict(r, mode="query-aware") for r in rows if r["mode"] == "multi-request"]
        else:
            for i, q in enumerate(task.questions):
                session = Session(model, tok, policy, block_size=cfg.block_size)
                stats = session.add_context(task.context, question=q.question)
                add("query-aware", i, session, stats, _held(session), ask(session, "query-aware", i, False))
    return rows


def _add_references(rows: list[dict], lp_none: list[float], refs: dict[tuple[str, int], _Reference]) -> None:
    for row in rows:
        i = row["question_index"]
        ref = refs[(row["mode"], i)]
        row["lp_none"], row["lp_full"] = lp_none[i], ref.answer_logprob
        row["retention"] = question_retention(row)  # None where the full cache gains < MIN_GAIN nats
        row["full_kv_bytes"] = ref.kv_bytes
        row["compression"] = ref.kv_bytes / row["kv_bytes"] if row["kv_bytes"] else None
        row["entries_kept"] = row["kv_entries"] / ref.kv_entries if ref.kv_entries else None
        turn: Turn = row.pop("_turn")
        if row["policy"] == "full":  # the reference itself, by definition
            row["agreement"], row["kl"] = (1.0, 0.0) if ref.steps is not None else (None, None)
        elif ref.steps is not None and turn.reference_logprobs is not None:
            row["agreement"], row["kl"] = next_token_fidelity(ref.steps, turn.reference_logprobs)
        else:
            row["agreement"] = row["kl"] = None


def _references(rows: list[dict]) -> dict[tuple[str, int], _Reference]:
    return {(r["mode"], r["question_index"]): _Reference(r["answer_logprob"], r["kv_bytes"], r["kv_entries"],
                                                         r["_turn"].step_logprobs)
            for r in rows}


def _held(session: Session) -> tuple[int, int, int]:
    """What the session holds now: KV bytes on the device, entries (every layer and KV head, at
    any precision), and bytes stored in all (EpiCache: every episode's cache)."""
    return session.kv_bytes, sum(layer.total_entries() for layer in session.cache.layers), session.stored_bytes


# --------------------------------------------------------------------------- results file


def read_results(path: str | Path) -> list[dict]:
    """Rows of a ``results.jsonl``. A last line cut short by a crash is dropped (and removed
    from the file, so that appending goes on after the last whole row)."""
    p = Path(path)
    if not p.exists():
        return []
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise KVBudgetError(f"{p} line {n}: not a JSON row; cannot resume this sweep") from None
            atomic_write_text(p, "".join(lines[:-1]))
    return rows


def _task_hash(task: Task) -> str:
    return hashlib.sha1(json.dumps(task_to_dict(task), sort_keys=True).encode()).hexdigest()[:16]


def sources(metas: list[dict | None]) -> list[dict]:
    """The distinct origins of a task set: each task's ``meta`` without what differs between the
    samples of one setting (index, measured tokens), with how many tasks share it."""
    out: dict[str, dict] = {}
    for meta in metas:
        if meta is None:
            continue
        setting = {k: v for k, v in meta.items() if k not in _PER_SAMPLE}
        key = json.dumps(setting, sort_keys=True)
        out.setdefault(key, {**setting, "tasks": 0})["tasks"] += 1
    return list(out.values())


def sweep_sources(out_dir: str | Path) -> list[dict]:
    """`sources` of every task a sweep directory ran (from its ``sweep.json``)."""
    path = Path(out_dir) / "sweep.json"
    if not path.exists():
        return []
    return sources(list(json.loads(path.read_text()).get("meta", {}).values()))


def _check_sweep(out: Path, cfg: EvalConfig, tasks: list[Task]) -> None:
    """Record the settings, tasks and task origins of the sweep in ``sweep.json``; a rerun into the
    same directory must use the same settings, and a task id must keep its content."""
    path = out / "sweep.json"
    settings = {k: v for k, v in asdict(cfg).items() if k in _RESULT_SETTINGS}
    hashes = {t.id: _task_hash(t) for t in tasks}
    metas = {t.id: t.meta for t in tasks if t.meta is not None}
    if path.exists():
        old = json.loads(path.read_text())
        for k, v in settings.items():
            if old["settings"].get(k) != v:
                raise KVBudgetError(f"{out} holds a sweep run with {k}={old['settings'].get(k)!r}, not {v!r}: "
                                    "use the same settings to resume it, or another --out")
        for tid, h in hashes.items():
            if old["tasks"].get(tid, h) != h:
                raise KVBudgetError(f"{out} holds results for another task with the id '{tid}': use another --out")
        hashes = {**old["tasks"], **hashes}
        metas = {**old.get("meta", {}), **metas}
    atomic_write_text(path, json.dumps({"settings": settings, "tasks": hashes, "meta": metas}, indent=2))


def _key(row: dict) -> tuple[str, str, str, str]:
    return (row["task"], row.get("mode", "multi-turn"), row["policy"], str(row["budget"]))


def _done(path: Path, tasks: list[Task]) -> set[tuple[str, str, str, str]]:
    """(task, mode, policy, budget) whose every question has a row in ``path``. Rows of a cell
    that a crash left incomplete are removed from the file: that cell runs again whole."""
    rows = read_results(path)
    n_questions = {t.id: len(t.questions) for t in tasks}
    seen: dict[tuple[str, str, str, str], set[int]] = {}
    for r in rows:
        seen.setdefault(_key(r), set()).add(r["question_index"])
    partial = {k for k, qs in seen.items() if k[0] in n_questions and len(qs) < n_questions[k[0]]}
    if partial:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows if _key(r) not in partial))
    return {k for k, qs in seen.items() if k[0] in n_questions and len(qs) == n_questions[k[0]]}


# --------------------------------------------------------------------------- the sweep


@dataclass
class Cell:
    """One unit of work of a sweep: a task under one policy and budget, in the modes whose rows
    ``results.jsonl`` still lacks. Its rows are appended together, or not at all."""

    task: Task
    policy: str
    budget: str | None
    modes: list[str]

    @property
    def label(self) -> str:
        """``task policy budget``, as the progress bar shows it."""
        return f"{self.task.id} {self.policy} {self.budget or ''}".strip()


@dataclass
class SweepPlan:
    """A sweep directory made ready to run: the cells to run, task by task, and the count of
    those already in ``results``."""

    out: Path
    results: Path
    cells: list[Cell]
    total: int  # cells of the whole grid
    skipped: int  # cells already in results.jsonl (resumed)


def plan_sweep(tok, tasks: list[Task], cfg: EvalConfig, out_dir: str | Path, resume: bool = True) -> SweepPlan:
    """Validate the grid, prepare ``out_dir`` (``sweep.json``; without ``resume``, earlier results
    removed) and list the cells still to run, task by task in the grid's order."""
    validate(cfg, tok, tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if not resume:
        for old in (results, out / "sweep.json"):
            old.unlink(missing_ok=True)
    _check_sweep(out, cfg, tasks)
    done = _done(results, tasks)
    grid = plan_cells(cfg)

    def missing(task: Task, name: str, budget: str | None) -> list[str]:
        # Rows carry the policy's own name ("pyramidkv", "snapkv+kivi4"), as the session has it.
        label = make_policy(name, budget=budget if budget is not None else 1).name
        return [m for m in cfg.modes if (task.id, m, label, budget if budget is not None else "-") not in done]

    cells = [Cell(task, name, budget, missing(task, name, budget)) for task in tasks for name, budget in grid]
    cells = [c for c in cells if c.modes]
    total = len(tasks) * len(grid)
    return SweepPlan(out, results, cells, total, total - len(cells))


@dataclass
class TaskReference:
    """What every cell of one task is measured against: the gold answers' log-probabilities with
    no context, and the full cache's rows (whose turns are the fidelity references)."""

    task_id: str
    lp_none: list[float]
    full_rows: list[dict]
    refs: dict[tuple[str, int], _Reference]


def task_reference(model, tok, task: Task, cfg: EvalConfig) -> TaskReference:
    """The reference of ``task``: run once per task and process (rerun, not reread, on resume)."""
    full_rows = run_task(model, tok, task, "full", None, cfg)
    return TaskReference(task.id, _no_context_logprobs(model, tok, task), full_rows, _references(full_rows))


def run_cell(model, tok, cell: Cell, cfg: EvalConfig, reference: TaskReference) -> list[dict]:
    """The rows of ``cell``, with their retention and fidelity columns, ready to append."""
    if cell.policy == "full":
        rows = [dict(r) for r in reference.full_rows if r["mode"] in cell.modes]
    else:
        sub = EvalConfig(**{**asdict(cfg), "mode": ",".join(cell.modes)})
        rows = run_task(model, tok, cell.task, cell.policy, cell.budget, sub, reference.refs)
    _add_references(rows, reference.lp_none, reference.refs)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append one cell's rows to ``results.jsonl`` in one write, flushed to disk: a crash loses
    at most the cell in flight (`plan_sweep` drops a cell left incomplete)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def progress_bar(plan: SweepPlan, progress: bool) -> tqdm:
    """The sweep's progress bar over the cells to run (it says what a resumed sweep skips)."""
    bar = tqdm(total=len(plan.cells), desc="eval", unit="cell", disable=not progress, dynamic_ncols=True)
    if plan.skipped and progress:
        bar.write(f"resuming: {plan.skipped} of {plan.total} cells already in {plan.results}")
    return bar


def finish_sweep(plan: SweepPlan, cfg: EvalConfig, tok, seconds: float, **extra) -> dict:
    """Summarise every row of ``results.jsonl`` into ``summary.json`` (``extra`` keys added)."""
    summary = summarize(read_results(plan.results))
    summary["seconds"] = seconds
    summary["config"] = asdict(cfg)
    summary["prompt"] = prompt_format(tok)
    summary["sources"] = sweep_sources(plan.out)
    summary["resumed_cells"] = plan.skipped
    summary.update(extra)
    atomic_write_text(plan.out / "summary.json", json.dumps(summary, indent=2))
    return summary


def run_eval(model, tok, tasks: list[Task], cfg: EvalConfig, out_dir: str | Path, progress: bool = True,
             resume: bool = True) -> dict:
    """Run the grid, append to ``results.jsonl``, write ``summary.json``; return the summary.

    With ``resume`` (default) cells already in ``results.jsonl`` are skipped and the summary
    covers every row there (a directory accumulates one sweep); without it the directory's
    earlier results are replaced. (`kvbudget.distributed.sweep` runs the same cells on Ray.)
    """
    plan = plan_sweep(tok, tasks, cfg, out_dir, resume)
    start = time.perf_counter()
    bar = progress_bar(plan, progress)
    reference: TaskReference | None = None
    for cell in plan.cells:
        if reference is None or reference.task_id != cell.task.id:
            reference = task_reference(model, tok, cell.task, cfg)
        bar.set_postfix_str(cell.label)
        append_rows(plan.results, run_cell(model, tok, cell, cfg, reference))
        bar.update(1)
    bar.close()
    return finish_sweep(plan, cfg, tok, time.perf_counter() - start)
