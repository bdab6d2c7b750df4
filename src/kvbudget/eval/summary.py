"""Aggregate result rows into tables: per (mode, policy, budget), overall and per task family."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from .retention import MIN_GAIN, pooled

# Report order of the modes; query-aware last: it is the optimistic reference, not a peer.
MODE_ORDER = ("multi-turn", "multi-request", "query-aware")


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _mode_rank(mode: str) -> int:
    return MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER)


def _budget_key(budget: str) -> tuple[int, float, str]:
    """Sort budgets: none ("-") first, then numbers ascending, then anything else by text."""
    if budget == "-":
        return (0, 0.0, "")
    try:
        return (1, float(budget), "")
    except ValueError:
        return (2, 0.0, budget)


def _cell(rs: list[dict]) -> dict:
    # Per-session numbers (bytes, prefill) repeat on each question row of a shared context.
    runs = {(r["task"], r["question_index"] if r.get("mode") == "query-aware" else 0): r for r in rs}
    decode_s = sum(r["decode_s"] for r in rs)
    retention = pooled(rs)
    return {
        "questions": len(rs),
        "metric": ", ".join(sorted({r["metric"] for r in rs if r.get("metric")})) or None,
        "accuracy": _mean(r["score"] for r in rs),
        # Pooled over the questions where the full cache gains >= MIN_GAIN nats (eval.retention).
        "retention": retention.value,
        "retention_low": retention.low,
        "retention_high": retention.high,
        "retention_n": retention.n,
        "retention_of": retention.total,
        "agreement": _mean(r.get("agreement") for r in rs),
        "kl": _mean(r.get("kl") for r in rs),
        "kv_bytes": _mean(r["kv_bytes"] for r in runs.values()),
        # Every cache the session stores (EpiCache: all episodes'; `kv_bytes` is the one on the device).
        "stored_bytes": _mean(r.get("stored_bytes", r["kv_bytes"]) for r in runs.values()),
        "peak_bytes": max(r["peak_bytes"] for r in rs),
        "compression": _mean(r.get("compression") for r in runs.values()),
        "entries_kept": _mean(r.get("entries_kept") for r in runs.values()),
        "prefill_s": _mean(r["prefill_s"] for r in runs.values()),
        "compress_share": _mean(r["compress_s"] / r["prefill_s"] for r in runs.values() if r["prefill_s"]),
        "decode_tok_s": sum(r["new_tokens"] for r in rs) / decode_s if decode_s else None,
    }


def _grouped(rows: list[dict], key) -> list[tuple[tuple, list[dict]]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    return list(groups.items())


def _order(row: dict) -> tuple:
    full = row["policy"] != "full"  # the reference row first in each mode
    return (_mode_rank(row["mode"]), row.get("task_family", ""), full, row["policy"], _budget_key(row["budget"]))


def summarize(rows: list[dict]) -> dict:
    """Tables of the rows: ``rows`` per (mode, policy, budget) over all tasks, ``by_task`` per
    (task family, mode, policy, budget); family = the question's category, or "all"."""
    table = []
    for (mode, policy, budget), rs in _grouped(rows, lambda r: (r.get("mode", "multi-turn"), r["policy"], str(r["budget"]))):
        cats = {r.get("category") for r in rs if r.get("category")}
        by_category = {c: _mean(r["score"] for r in rs if r.get("category") == c) for c in sorted(cats)}
        table.append({"mode": mode, "policy": policy, "budget": budget, **_cell(rs), "by_category": by_category})
    by_task = []
    def key(r: dict) -> tuple:
        return (r.get("category") or "all", r.get("mode", "multi-turn"), r["policy"], str(r["budget"]))

    for (family, mode, policy, budget), rs in _grouped(rows, key):
        by_task.append({"task_family": family, "mode": mode, "policy": policy, "budget": budget, **_cell(rs)})
    categories = sorted({r.get("category") for r in rows if r.get("category")})
    modes = sorted({r["mode"] for r in table}, key=_mode_rank)
    return {"rows": sorted(table, key=_order), "by_task": sorted(by_task, key=_order),
            "categories": categories, "modes": modes}


def _f(v: float | None, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def retention_cell(row: dict) -> str:
    """Pooled retention and its interval: ``0.86 [0.80,0.91]``."""
    if row.get("retention") is None:
        return "-"
    if row.get("retention_low") is None:
        return f"{row['retention']:.2f}"
    return f"{row['retention']:.2f} [{row['retention_low']:.2f},{row['retention_high']:.2f}]"


def retention_note(summary: dict) -> str:
    """One line: the retention threshold and how many questions pass it."""
    rows = [r for r in summary["rows"] if r["policy"] == "full"] or summary["rows"]
    counts = ", ".join(f"{r.get('mode', 'multi-turn')} {r.get('retention_n', 0)} of {r.get('retention_of', 0)}"
                       for r in rows)
    return (f"retain = pooled answer retention over the questions where the full cache gains >= {MIN_GAIN:g} nat "
            f"({counts}), 95% bootstrap interval; a policy beats another only where the intervals separate. "
            "compr = full KV bytes / bytes held; kept = share of the full cache's entries held.")


def format_table(summary: dict, mode: str | None = None, rows: list[dict] | None = None) -> str:
    """The policy x budget table as fixed-width text, one block per mode (or only ``mode``), headed
    by the model when the summary names it."""
    rows = summary["rows"] if rows is None else rows
    model = (summary.get("config") or {}).get("model")
    modes = [mode] if mode else (summary.get("modes") or sorted({r.get("mode", "multi-turn") for r in rows}, key=_mode_rank))
    head = (f"{'policy':<16}{'budget':>8}{'acc':>7}{'retain [95% CI]':>19}{'agree':>7}{'KL':>7}{'KV MB':>8}"
            f"{'compr':>7}{'kept':>6}{'peak MB':>8}{'prefill s':>10}{'overhead':>9}{'tok/s':>7}")
    blocks = []
    for m in modes:
        label = f"{m}{' — OPTIMISTIC reference' if m == 'query-aware' else ''}{f' — model {model}' if model else ''}"
        lines = [f"[{label}]", head, "-" * len(head)]
        for r in rows:
            if r.get("mode", "multi-turn") != m:
                continue
            share = r["compress_share"] * 100 if r["compress_share"] is not None else None
            lines.append(
                f"{r['policy']:<16}{r['budget']:>8}{_f(r['accuracy'], '.2f'):>7}{retention_cell(r):>19}"
                f"{_f(r.get('agreement'), '.2f'):>7}{_f(r.get('kl'), '.2f'):>7}"
                f"{_f(r['kv_bytes'] / 1e6 if r['kv_bytes'] else None, '.2f'):>8}{_f(r['compression'], '.1f'):>7}"
                f"{_f(r.get('entries_kept'), '.2f'):>6}{_f(r['peak_bytes'] / 1e6, '.1f'):>8}{_f(r['prefill_s'], '.2f'):>10}{_f(share, '.0f'):>8}%"
                f"{_f(r['decode_tok_s'], '.1f'):>7}"
            )
        # A session that stores more than its device cache (EpiCache's episodes): both, below.
        lines += [f"{r['policy']} {r['budget']}: stores {r['stored_bytes'] / 1e6:.2f} MB (every episode), "
                  f"{r['kv_bytes'] / 1e6:.2f} MB on the device" for r in rows if r.get("mode", "multi-turn") == m
                  and r.get("stored_bytes") and r["kv_bytes"] and r["stored_bytes"] > r["kv_bytes"]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + ("\n" + retention_note({"rows": rows}) if rows else "")
