"""The report of an eval directory: plots, a markdown file and a self-contained HTML page.

``write_report(DIR)`` reads ``results.jsonl`` (and ``env.json``, written when the sweep ran) and
writes ``report.md`` with ``plot*.png`` beside it, and ``report.html`` with the same plots
embedded as base64 PNG. Both are rendered from one list of blocks, so they say the same.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import re
import subprocess
from collections import defaultdict
from importlib.metadata import version
from pathlib import Path

import torch
import transformers
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from ..errors import KVBudgetError
from ..fileio import atomic_write_text
from ..kv.store import STORES
from .frontier import best_per_budget, envelope, points
from .runner import read_results, sweep_sources
from .summary import MODE_ORDER, retention_cell, retention_note, summarize

MODE_TEXT = {
    "multi-turn": "multi-turn: the context compressed without the questions; each question and its gold "
    "answer appended to the same session before the next.",
    "multi-request": "multi-request: the context compressed without the questions, then copied for each "
    "question, which is asked alone.",
    "query-aware": "query-aware — OPTIMISTIC reference: each question known while its context is "
    "compressed (one session per question); not comparable with the other modes.",
}

COLUMNS = ("acc = task metric; retain = answer retention pooled over questions (1 = full cache, 0 = no context) "
           "with its 95% bootstrap interval; agree / KL = top-1 "
           "agreement and mean KL (nats) of next-token distributions vs the full cache over its answer span, "
           "teacher-forced; KV MB = bytes held after the context; compr = full KV bytes / kept KV bytes; kept = share "
           "of the full cache's entries held (any precision); peak MB = "
           "most cache bytes held; overhead = scoring + eviction share of prefill; tok/s = greedy decode speed.")


def environment(model_name: str, seconds: float | None = None, seed: int | None = None) -> dict:
    """Model, device, versions, seed and git commit, for the report's provenance section."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "model": model_name,
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "machine": f"{platform.system()} {platform.machine()}, python {platform.python_version()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvbudget": version("kvbudget"),
        "seed": seed,
        "commit": commit or "unknown",
        "seconds": round(seconds, 1) if seconds is not None else None,
    }


# --------------------------------------------------------------------------- plots


def _styles(policies: list[str]) -> dict[str, tuple[tuple, str]]:
    """A colour per method family (the policy without its store: kvzip, snapkv, ... or the store
    alone) and a marker per store (none: a circle), so that kvzip and kvzip+kivi4 share a colour."""
    def parts(name: str) -> tuple[str, str | None]:
        names = name.split("+")
        stores = [n for n in names if n in STORES]
        rest = [n for n in names if n not in STORES]
        return ("+".join(rest) or stores[0]), (stores[0] if stores and rest else None)

    families = sorted({parts(p)[0] for p in policies})
    stores = sorted({parts(p)[1] for p in policies if parts(p)[1]})
    cmap = colormaps["tab10"]
    colour = {f: cmap(i % 10) for i, f in enumerate(families)}
    marker = {None: "o", **{s: "s^DvPX*p"[i % 8] for i, s in enumerate(stores)}}
    return {p: (colour[parts(p)[0]], marker[parts(p)[1]]) for p in policies}


def plot(rows: list[dict], path: str | Path, title: str) -> Path:
    """Quality against bytes held: accuracy and pooled retention (with its interval) vs compression
    in bytes, one column per mode. A colour per method family, a marker per store, a thin line per
    policy over its budgets (a store alone is one point), the full cache as a dashed reference, and
    the frontier (eval.frontier: the best quality at or below each byte size) as a black step line."""
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in rows)] or ["multi-turn"]
    fig = Figure(figsize=(5.8 * len(modes) + 1.9, 8.0))
    axes = fig.subplots(2, len(modes), squeeze=False)
    policies = sorted({r["policy"] for r in rows if r["policy"] != "full"})
    style = _styles(policies)
    for col, mode in enumerate(modes):
        in_mode = [r for r in rows if r["mode"] == mode]
        full = next((r for r in in_mode if r["policy"] == "full"), None)
        panels = (("accuracy", "accuracy"), ("retention", "answer retention (pooled, 95% CI)"))
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            pts = points(in_mode, key)
            for p in policies:
                mine = sorted((q for q in pts if q.policy == p), key=lambda q: q.compression)
                if not mine:
                    continue
                color, marker = style[p]
                xs, ys = [q.compression for q in mine], [q.quality for q in mine]
                ax.plot(xs, ys, marker=marker, color=color, label=p, linewidth=0.8, markersize=6, alpha=0.9)
                if all(q.low is not None for q in mine):
                    ax.errorbar(xs, ys, yerr=[[q.quality - q.low for q in mine], [q.high - q.quality for q in mine]],
                                fmt="none", ecolor=color, elinewidth=0.8, capsize=2, alpha=0.6)
            front = envelope(pts)
            if front:
                # From 1x (every byte allowed) on: the best at or below each byte size is the next point.
                xs = [1.0] * (front[0].compression > 1) + [q.compression for q in front]
                ys = [front[0].quality] * (front[0].compression > 1) + [q.quality for q in front]
                ax.step(xs, ys, where="pre", color="black", linewidth=1.8, alpha=0.7, label="frontier", zorder=1)
            if full is not None and full[key] is not None:
                ax.axhline(full[key], color="black", linestyle="--", linewidth=1, label="full")
                ax.plot([1.0], [full[key]], marker="*", color="black", markersize=9, label="_nolegend_")
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
            ax.grid(alpha=0.3)
            ax.set_ylabel(label)
            if row == 0:
                ax.set_title(mode + (" (optimistic)" if mode == "query-aware" else ""))
            else:
                ax.set_xlabel("compression in bytes (full KV bytes / bytes held)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # every policy once, whichever panel drew it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


# --------------------------------------------------------------------------- blocks -> md / html

_HEAD = ["mode", "policy", "budget", "acc", "retain [95% CI]", "agree", "KL", "KV MB", "compr", "kept", "peak MB",
         "prefill s",
         "overhead", "tok/s"]


def _f(v, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    body = []
    for r in rows:
        share = r["compress_share"] * 100 if r["compress_share"] is not None else None
        body.append([
            r["mode"], r["policy"], r["budget"], _f(r["accuracy"], ".2f"), retention_cell(r),
            _f(r.get("agreement"), ".2f"), _f(r.get("kl"), ".3f"),
            _f(r["kv_bytes"] / 1e6 if r["kv_bytes"] else None, ".2f"), _f(r["compression"], ".1f"),
            _f(r.get("entries_kept"), ".2f"),
            _f(r["peak_bytes"] / 1e6, ".1f"), _f(r["prefill_s"], ".2f"), _f(share, ".0f") + "%",
            _f(r["decode_tok_s"], ".1f"),
        ])
    return _HEAD, body


def separations(rows: list[dict]) -> str:
    """Which policies beat which on retention, per mode and budget: only where the intervals
    separate (eval.retention); every other ordering of the table is within the noise."""
    found = []
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("retention_low") is not None and r["policy"] != "full":
            cells.setdefault((r["mode"], r["budget"]), []).append(r)
    for (mode, budget), rs in cells.items():
        for a in rs:
            for b in rs:
                if a["retention_low"] > b["retention_high"]:
                    found.append(f"{a['policy']} > {b['policy']} ({mode}, {budget})")
    if not found:
        return "Retention intervals: no policy's interval separates from another's at the same budget."
    return "Retention intervals that separate (a policy beats another only there): " + "; ".join(found) + "."


def best_lines(summary: dict) -> list[str]:
    """`eval.frontier.best_per_budget` for each mode of a summary, the mode named where there are several."""
    modes = summary["modes"]
    return [f"{mode}, {line}" if len(modes) > 1 else line
            for mode in modes for line in best_per_budget(summary["rows"], mode)]


def _sources_table(sources: list[dict]) -> tuple[list[str], list[list[str]]]:
    keys = list(dict.fromkeys(k for src in sources for k in src))
    return keys, [[str(src.get(k, "-")) for k in keys] for src in sources]


def _blocks(summary: dict, env: dict, plots: dict[str, Path], sources: list[dict]) -> list[tuple[str, object]]:
    """The report as ("h1"/"h2"/"p"/"list"/"table"/"img", content) blocks."""
    model = env.get("model")
    on = f" — model {model}" if model else ""
    out: list[tuple[str, object]] = [("h1", f"kvbudget report{on}")]
    if env.get("command"):
        out.append(("code", env["command"]))
    shown = {k: v for k, v in env.items() if k not in ("command", "note")}
    out.append(("table", (list(shown), [[str(v) for v in shown.values()]])))
    if env.get("note"):  # what the command that ran chose to measure, and why (the bench's grid)
        out.append(("p", env["note"]))
    if sources:
        out.append(("h2", "Tasks: where they come from"))
        out.append(("p", "The generator or dataset of the tasks and the settings that regenerate them "
                         "(tasks = how many share the row)."))
        out.append(("table", _sources_table(sources)))
    out.append(("p", "Modes: " + " ".join(MODE_TEXT[m] for m in summary["modes"] if m in MODE_TEXT)))
    out.append(("p", COLUMNS))
    out.append(("p", retention_note(summary)))
    out.append(("h2", f"All tasks{on}"))
    if "all" in plots:
        out.append(("img", plots["all"]))
    out.append(("table", _table(summary["rows"])))
    out.append(("p", separations(summary["rows"])))
    best = best_lines(summary)
    if best:
        out.append(("h2", "Best per byte budget"))
        out.append(("p", "At each ratio budget, the configuration with the highest pooled retention among those "
                         "holding at most that share of the full cache's bytes (any budget, or a store alone), and "
                         "those whose interval overlaps its own (tied)."))
        out.append(("list", best))
    families = sorted({r["task_family"] for r in summary["by_task"]})
    if len(families) > 1 or (families and families != ["all"]):
        for fam in families:
            rows = [r for r in summary["by_task"] if r["task_family"] == fam]
            full = {r["mode"]: r["accuracy"] for r in rows if r["policy"] == "full"}
            metric = next((r["metric"] for r in rows if r.get("metric")), None)
            out.append(("h2", f"Task: {fam}{on}"))
            out.append(("p", (f"Metric: {metric}. " if metric else "") + "Full-cache accuracy: "
                        + ", ".join(f"{m} {_f(a, '.2f')}" for m, a in full.items()) + "."))
            if fam in plots:
                out.append(("img", plots[fam]))
            out.append(("table", _table(rows)))
    return out


def _md(blocks: list[tuple[str, object]]) -> str:
    lines: list[str] = []
    for kind, c in blocks:
        if kind == "h1":
            lines += [f"# {c}", ""]
        elif kind == "h2":
            lines += [f"## {c}", ""]
        elif kind == "p":
            lines += [str(c), ""]
        elif kind == "code":
            lines += [f"Command: `{c}`", ""]
        elif kind == "list":
            lines += [f"- {item}" for item in c] + [""]
        elif kind == "img":
            lines += [f"![{Path(c).stem}]({Path(c).name})", ""]
        elif kind == "table":
            head, body = c
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body] + [""]
    return "\n".join(lines)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
        "font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:nth-child(-n+3),th{text-align:left}img{max-width:100%}code{background:#f4f4f4;padding:2px 4px}")


def _html(blocks: list[tuple[str, object]]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>kvbudget report</title>",
             f"<style>{_CSS}</style></head><body>"]
    for kind, c in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{e(str(c))}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{e(str(c))}</p>")
        elif kind == "code":
            parts.append(f"<p>Command: <code>{e(str(c))}</code></p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in c) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(Path(c).read_bytes()).decode()
            parts.append(f"<img alt='{e(Path(c).stem)}' src='data:image/png;base64,{data}'>")
        elif kind == "table":
            head, body = c
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(v)}</td>" for v in row) + "</tr>" for row in body]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(directory: str | Path, env: dict | None = None) -> tuple[Path, Path]:
    """Write ``report.md`` (+ ``plot*.png``) and a self-contained ``report.html`` for an eval
    directory; return their paths. ``env`` defaults to the directory's ``env.json``."""
    d = Path(directory)
    if not (d / "results.jsonl").exists():
        raise KVBudgetError(f"{d}: no results.jsonl here (run `kvbudget eval --out {d}` first)")
    rows = read_results(d / "results.jsonl")
    if not rows:
        raise KVBudgetError(f"{d / 'results.jsonl'} holds no rows")
    if env is None:
        env = json.loads((d / "env.json").read_text()) if (d / "env.json").exists() else {}
    summary = summarize(rows)
    on = f" ({env['model']})" if env.get("model") else ""
    plots = {"all": plot(summary["rows"], d / "plot.png", f"kvbudget{on}: quality vs KV bytes held, all tasks")}
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in summary["by_task"]:
        fams[r["task_family"]].append(r)
    if len(fams) > 1:
        for fam, fam_rows in fams.items():
            name = re.sub(r"[^\w.-]+", "_", fam)  # a category is free text; a file name is not
            plots[fam] = plot(fam_rows, d / f"plot-{name}.png", f"kvbudget{on}: quality vs KV bytes held, task {fam}")
    blocks = _blocks(summary, env, plots, sweep_sources(d))
    md, page = d / "report.md", d / "report.html"
    atomic_write_text(md, _md(blocks))
    atomic_write_text(page, _html(blocks))
    return md, page
