"""Plots and the markdown report of an eval run."""

from __future__ import annotations

import platform
import subprocess
from collections import defaultdict
from pathlib import Path

from .runner import format_table


MODE_TEXT = {
    "multi-turn": "Mode: multi-turn (context compressed without the questions; each question and its gold "
    "answer appended before the next).",
    "query-aware": "Mode: query-aware — OPTIMISTIC reference: each question known while its context is "
    "compressed (one session per question); not comparable with multi-turn numbers.",
}


def environment(model_name: str, seconds: float | None = None) -> dict:
    """Model, machine and versions, for the report's provenance section."""
    import torch
    import transformers

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    from .. import __version__

    return {
        "model": model_name,
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "machine": f"{platform.system()} {platform.machine()}, python {platform.python_version()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvbudget": __version__,
        "commit": commit or "unknown",
        "seconds": round(seconds, 1) if seconds is not None else None,
    }


def plot(summary: dict, path: str | Path) -> Path:
    """Accuracy and retention vs compression, one line per policy; the full cache as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict]] = defaultdict(list)
    full = None
    for r in summary["rows"]:
        if r["policy"] == "full":
            full = r
        else:
            lines[r["policy"]].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "retention", "answer retention")):
        for name, rows in sorted(lines.items()):
            pts = sorted((r["compression"], r[key]) for r in rows if r["compression"] and r[key] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if full is not None and full[key] is not None:
            ax.axhline(full[key], color="black", linestyle="--", linewidth=1, label="full")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression (full KV bytes / kept KV bytes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(f"kvbudget: quality vs KV compression ({summary.get('config', {}).get('mode', 'multi-turn')})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_markdown(summary: dict, env: dict, path: str | Path, command: str, plot_name: str | None = "plot.png") -> Path:
    """A markdown report: command, environment, the table, per-category accuracy, the plot."""
    lines = [
        "# kvbudget report",
        "",
        f"Command: `{command}`",
        "",
        "| " + " | ".join(env) + " |",
        "|" + "---|" * len(env),
        "| " + " | ".join(str(v) for v in env.values()) + " |",
        "",
        MODE_TEXT[summary.get("config", {}).get("mode", "multi-turn")],
        "acc = task metric; retain = answer retention (1 = full cache, 0 = no context); compr = full KV",
        "bytes / kept KV bytes; overhead = scoring + eviction share of prefill.",
        "",
        "```",
        format_table(summary),
        "```",
        "",
    ]
    if summary.get("categories"):
        lines += ["## Accuracy per task category", "", "| policy | budget | " + " | ".join(summary["categories"]) + " |"]
        lines.append("|---|---|" + "---|" * len(summary["categories"]))
        for r in summary["rows"]:
            cats = r.get("by_category", {})
            vals = " | ".join(f"{cats[c]:.2f}" if cats.get(c) is not None else "-" for c in summary["categories"])
            lines.append(f"| {r['policy']} | {r['budget']} | {vals} |")
        lines.append("")
    if plot_name:
        lines += [f"![quality vs compression]({plot_name})", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
