"""Run policies x budgets over a task set in multi-turn mode and score every question.

For each task the context is prefilled once per (policy, budget) without knowing the questions;
the questions are then asked in order in the same session, each question and its gold answer
appended before the next one (so every policy sees the same conversation text; only what the
cache kept differs). Each row carries accuracy (the task's metric) and answer retention
(DESIGN.md, Measuring): (lp_policy - lp_none) / (lp_full - lp_none) of the gold answer's
teacher-forced mean log-probability.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from ..budget import parse_budget
from ..errors import BudgetError, KVBudgetError
from ..fileio import atomic_write_text
from ..generate import Session
from ..policies.base import make_policy
from .metrics import score as score_answer
from .taskfile import Task

# Below this gain (nats) the full cache does not make the gold answer more likely than no
# context at all: retention would divide by noise, so it is left undefined for that question.
MIN_GAIN = 0.1


@dataclass
class EvalConfig:
    """What to run: policies x budgets, and how."""

    policies: list[str]
    budgets: list[str]
    block_size: int = 256
    max_new_tokens: int = 32
    window: int = 32
    seed: int = 0
    mode: str = "multi-turn"  # or "query-aware" (optimistic reference)
    decode_interval: int | None = None  # decode-time compression every N new tokens (None: policy default)


def _cells(cfg: EvalConfig) -> list[tuple[str, str | None]]:
    cells: list[tuple[str, str | None]] = [("full", None)]
    for name in cfg.policies:
        if name == "full":
            continue
        if not make_policy(name, budget=1).evicts:  # a store alone (kivi4): no budget to sweep
            cells.append((name, None))
            continue
        for b in cfg.budgets:
            cells.append((name, b))
    return cells


def context_tokens(tok, task: Task) -> int:
    """Tokens of a task's context as a session feeds it (chat template included)."""
    messages = [{"role": "user", "content": task.context}] if isinstance(task.context, str) else task.context
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False)
        return len(tok(text, add_special_tokens=False).input_ids)
    return len(tok(messages[0]["content"]).input_ids)


MODES = ("multi-turn", "query-aware")


def check_names(cfg: EvalConfig) -> None:
    """Unknown policies, modes and unreadable budgets fail before anything is loaded."""
    if cfg.mode not in MODES:
        raise KVBudgetError(f"unknown mode '{cfg.mode}' (known: {', '.join(MODES)})")
    for name in cfg.policies:
        make_policy(name, budget=1)  # raises UnknownPolicyError with the known names
    for b in cfg.budgets:
        parse_budget(b)


def validate(cfg: EvalConfig, tok, tasks: list[Task]) -> dict[str, int]:
    """Check names and budgets before any work: unknown policy, bad budget, budget > context."""
    check_names(cfg)
    budgets = [parse_budget(b) for b in cfg.budgets]
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


def _no_context_logprobs(model, tok, task: Task) -> list[float]:
    out = []
    for q in task.questions:
        s = Session(model, tok, "full")
        out.append(s.ask_detailed(q.question, max_new_tokens=0, gold=q.answers[0]).answer_logprob)
    return out


def run_task(model, tok, task: Task, name: str, budget: str | None, cfg: EvalConfig) -> list[dict]:
    """One task under one policy; one row per question.

    ``multi-turn``: one session, the context compressed without the questions, then every question
    in order. ``query-aware``: a fresh session per question whose compression is scored by that
    question (the optimistic single-question setting of most papers; never mix the two).
    """
    policy = make_policy(
        name, budget=budget, block_size=cfg.block_size, window=cfg.window, seed=cfg.seed,
        decode_interval=cfg.decode_interval,
    )
    rows = []
    session = None
    for i, q in enumerate(task.questions):
        if session is None or cfg.mode == "query-aware":
            session = Session(model, tok, policy)
            stats = session.add_context(task.context, question=q.question if cfg.mode == "query-aware" else None)
            kv_bytes = session.kv_bytes
        turn = session.ask_detailed(q.question, cfg.max_new_tokens, gold=q.answers[0], history_answer=q.answers[0])
        rows.append(
            {
                "task": task.id,
                "question_index": i,
                "category": q.category,
                "mode": cfg.mode,
                "policy": session.policy.name,
                "budget": budget if budget is not None else "-",
                "budget_tokens": session.policy.tokens,
                "context_tokens": stats.tokens,
                "question": q.question,
                "answers": q.answers,
                "metric": q.metric,
                "prediction": turn.text,
                "score": score_answer(turn.text, q.answers, q.metric),
                "answer_logprob": turn.answer_logprob,
                "kv_bytes": kv_bytes,
                # EpiCache holds one cache per episode (one on the device at a time).
                "stored_bytes": getattr(session, "all_kv_bytes", kv_bytes),
                "peak_bytes": turn.peak_bytes,
                "prefill_s": stats.seconds,
                "compress_s": stats.compress_seconds,
                "decode_s": turn.decode_s,
                "new_tokens": len(turn.token_ids),
            }
        )
    return rows


def _add_references(rows: list[dict], lp_none: list[float], full_rows: list[dict]) -> None:
    for row in rows:
        i = row["question_index"]
        lp_full = full_rows[i]["answer_logprob"]
        gain = lp_full - lp_none[i]
        row["lp_none"], row["lp_full"] = lp_none[i], lp_full
        row["retention"] = (row["answer_logprob"] - lp_none[i]) / gain if gain > MIN_GAIN else None
        row["full_kv_bytes"] = full_rows[i]["kv_bytes"]
        row["compression"] = row["full_kv_bytes"] / row["kv_bytes"] if row["kv_bytes"] else None


def run_eval(model, tok, tasks: list[Task], cfg: EvalConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the grid, write ``results.jsonl`` and ``summary.json`` into ``out_dir``; return the summary."""
    validate(cfg, tok, tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = _cells(cfg)
    all_rows: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(total=len(tasks) * len(cells), desc="eval", unit="run", disable=not progress, dynamic_ncols=True)
    for task in tasks:
        lp_none = _no_context_logprobs(model, tok, task)
        full_rows: list[dict] = []
        for name, budget in cells:
            bar.set_postfix_str(f"{task.id} {name} {budget or ''}".strip())
            rows = run_task(model, tok, task, name, budget, cfg)
            if name == "full":
                full_rows = rows
            _add_references(rows, lp_none, full_rows)
            all_rows.extend(rows)
            bar.update(1)
    bar.close()
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in all_rows))
    summary = summarize(all_rows)
    summary["seconds"] = time.perf_counter() - start
    summary["config"] = cfg.__dict__
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: list[dict]) -> dict:
    """Aggregate rows per (policy, budget): accuracy, retention, bytes, compression, times."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["policy"], str(r["budget"]))].append(r)
    table = []
    for (policy, budget), rs in groups.items():
        # Per-session numbers repeat on each question row of a multi-turn session.
        runs = {(r["task"], r["question_index"] if r.get("mode") == "query-aware" else 0): r for r in rs}
        decode_s = sum(r["decode_s"] for r in rs)
        table.append(
            {
                "policy": policy,
                "budget": budget,
                "questions": len(rs),
                "accuracy": _mean(r["score"] for r in rs),
                "retention": _mean(r.get("retention") for r in rs),
                "retention_n": sum(r.get("retention") is not None for r in rs),
                "kv_bytes": _mean(r["kv_bytes"] for r in runs.values()),
                "peak_bytes": max(r["peak_bytes"] for r in rs),
                "compression": _mean(r.get("compression") for r in runs.values()),
                "prefill_s": _mean(r["prefill_s"] for r in runs.values()),
                "compress_share": _mean(r["compress_s"] / r["prefill_s"] for r in runs.values() if r["prefill_s"]),
                "decode_tok_s": sum(r["new_tokens"] for r in rs) / decode_s if decode_s else None,
                "by_category": {
                    c: _mean(r["score"] for r in rs if r.get("category") == c) for c in {r.get("category") for r in rs} if c
                },
            }
        )
    categories = sorted({r.get("category") for r in rows if r.get("category")})
    return {"rows": table, "categories": categories}


def format_table(summary: dict) -> str:
    """The policy x budget table as fixed-width text."""
    head = f"{'policy':<16}{'budget':>8}{'acc':>7}{'retain':>8}{'KV MB':>8}{'compr':>7}{'prefill s':>10}{'overhead':>9}{'tok/s':>7}"
    lines = [head, "-" * len(head)]

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in summary["rows"]:
        lines.append(
            f"{r['policy']:<16}{r['budget']:>8}{f(r['accuracy'], '.2f'):>7}{f(r['retention'], '.2f'):>8}"
            f"{f(r['kv_bytes'] / 1e6 if r['kv_bytes'] else None, '.2f'):>8}{f(r['compression'], '.1f'):>7}"
            f"{f(r['prefill_s'], '.2f'):>10}{f(r['compress_share'] * 100 if r['compress_share'] is not None else None, '.0f'):>8}%"
            f"{f(r['decode_tok_s'], '.1f'):>7}"
        )
    return "\n".join(lines)
