"""The frontier of a sweep (eval.frontier): the upper envelope of quality against bytes held, the
one line per budget that names the best configuration and its ties, and the plot that draws them."""

import json

from matplotlib.figure import Figure

from kvbudget.eval.frontier import Point, best_at, best_per_budget, envelope, points, ratio_budgets
from kvbudget.eval.report import plot, write_report
from kvbudget.eval.summary import summarize


def _row(policy: str, budget: str, compression: float, retention: float, low: float, high: float,
         mode: str = "multi-turn") -> dict:
    """One summary row (eval.summary) with what the frontier reads."""
    return {"mode": mode, "policy": policy, "budget": budget, "compression": compression, "accuracy": retention / 2,
            "retention": retention, "retention_low": low, "retention_high": high}


ROWS = [
    _row("full", "-", 1.0, 1.0, 1.0, 1.0),
    _row("kivi4", "-", 2.9, 1.01, 0.99, 1.03),
    _row("snapkv", "4x", 4.0, 0.41, 0.32, 0.49),
    _row("kvzip", "4x", 4.0, 0.54, 0.43, 0.65),
    _row("kvzip+kivi4", "4x", 4.1, 0.95, 0.90, 0.99),
    _row("kvzip", "8x", 8.1, 0.40, 0.30, 0.50),
    _row("kvzip+kivi4", "8x", 8.2, 0.83, 0.70, 0.98),
    _row("snapkv+kivi4", "8x", 8.2, 0.75, 0.62, 0.88),
    _row("streaming", "16x", 16.3, 0.30, 0.2, 0.4),
    _row("kvzip+kivi4", "16x", 16.5, 0.52, 0.45, 0.60),
]


def test_envelope_keeps_the_best_quality_at_or_below_each_byte_size():
    front = envelope(points(ROWS))
    assert [p.label for p in front] == ["kivi4", "kvzip+kivi4 4x", "kvzip+kivi4 8x", "kvzip+kivi4 16x"]
    # Ascending compression, descending quality: a point more compressed and better would have beaten it.
    assert [p.compression for p in front] == sorted(p.compression for p in front)
    assert [p.quality for p in front] == sorted((p.quality for p in front), reverse=True)
    # The full cache is on the frontier only where nothing holding fewer bytes keeps as much.
    assert [p.label for p in envelope(points(ROWS[:1] + ROWS[2:4]))] == ["full", "kvzip 4x"]
    # Equal compression: the better one only; a single point is its own frontier.
    same = [Point("a", "4x", 4.0, 0.5), Point("b", "4x", 4.0, 0.7)]
    assert envelope(same) == [same[1]] and envelope([]) == []


def test_points_read_one_mode_and_the_interval_with_retention_only():
    rows = ROWS + [_row("kvzip", "4x", 4.0, 0.99, 0.98, 1.0, mode="query-aware")]
    assert len(points(rows, mode="multi-turn")) == len(ROWS) and len(points(rows, mode="query-aware")) == 1
    acc = points(ROWS, "accuracy")
    assert all(p.low is None and p.high is None for p in acc) and acc[1].quality == 1.01 / 2
    assert points([_row("x", "4x", None, 0.5, 0.4, 0.6)]) == []  # no compression: no point


def test_best_per_budget_names_the_best_and_its_ties():
    assert ratio_budgets(ROWS) == [4.0, 8.0, 16.0]
    best, tied = best_at(points(ROWS), 8.0)
    # kivi4 (2.9x) and the 4x rows hold too many bytes for 8x; snapkv+kivi4's interval overlaps.
    assert best.label == "kvzip+kivi4 8x" and [p.label for p in tied] == ["snapkv+kivi4 8x"]
    lines = best_per_budget(ROWS)
    assert lines == [
        "4x: kvzip+kivi4 4x 0.95 [0.90,0.99] at 4.1x — best; tied with kvzip+kivi4 8x 0.83 [0.70,0.98]",
        "8x: kvzip+kivi4 8x 0.83 [0.70,0.98] at 8.2x — best; tied with snapkv+kivi4 8x 0.75 [0.62,0.88]",
        "16x: kvzip+kivi4 16x 0.52 [0.45,0.60] at 16.5x — best, its interval above every other's",
    ]
    # A store alone counts at every budget its own compression meets; nothing meets 32x.
    assert best_per_budget([_row("kivi2", "-", 5.0, 0.9, 0.8, 1.0), _row("snapkv", "4x", 4.0, 0.4, 0.3, 0.5),
                            _row("snapkv", "32x", 30.0, 0.1, 0.0, 0.2)]) == [
        "4x: kivi2 0.90 [0.80,1.00] at 5.0x — best, its interval above every other's",
        "32x: no configuration holds 32x fewer bytes",
    ]


def test_plot_draws_points_intervals_and_the_frontier(tmp_path, monkeypatch):
    drawn = {}
    savefig = Figure.savefig

    def keep(fig, path, **kw):  # the figure as it is written, to look at what it draws
        drawn["fig"] = fig
        return savefig(fig, path, **kw)

    monkeypatch.setattr(Figure, "savefig", keep)
    path = plot(ROWS, tmp_path / "plot.png", "test")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    ax = drawn["fig"].axes[1]  # the retention panel
    labels = [line.get_label() for line in ax.get_lines()]
    assert "frontier" in labels and "kvzip+kivi4" in labels and "full" in labels
    frontier = ax.get_lines()[labels.index("frontier")]
    assert list(frontier.get_xdata()) == [1.0, 2.9, 4.1, 8.2, 16.5]  # from 1x: every byte allowed
    assert ax.get_xscale() == "log" and ax.containers  # intervals drawn as error bars
    colours = {line.get_label(): (line.get_color(), line.get_marker()) for line in ax.get_lines()}
    # kvzip and kvzip+kivi4: one family, one colour; the store sets the marker.
    assert colours["kvzip"][0] == colours["kvzip+kivi4"][0] and colours["kvzip"][1] != colours["kvzip+kivi4"][1]


def test_report_writes_the_best_line_per_budget(tmp_path):
    def result(policy: str, budget: str, lp: float, i: int, kv_bytes: int) -> dict:
        return {"task": f"t{i}", "question_index": 0, "mode": "multi-turn", "policy": policy, "budget": budget,
                "score": 0.0, "answer_logprob": lp, "lp_full": -1.0, "lp_none": -5.0, "metric": "contains",
                "kv_bytes": kv_bytes, "peak_bytes": 200, "prefill_s": 1.0, "compress_s": 0.1, "decode_s": 1.0,
                "new_tokens": 4, "compression": 800 / kv_bytes, "entries_kept": 0.5}

    rows = [result(p, b, lp - 0.1 * (i % 2), i, kv) for i in range(8)
            for p, b, lp, kv in (("full", "-", -1.0, 800), ("snapkv", "8x", -4.0, 100), ("kvzip+kivi4", "8x", -1.5, 98))]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md, page = write_report(tmp_path, {"model": "m", "command": "kvbudget bench", "note": "Grid: why these rows."})
    text = md.read_text()
    assert "\nGrid: why these rows.\n" in text and "| note |" not in text  # a paragraph, not a provenance cell
    assert "## Best per byte budget" in text
    line = best_per_budget(summarize(rows)["rows"])[0]
    assert line.startswith("8x: kvzip+kivi4 8x") and "above every other's" in line
    assert f"- {line}" in text and "kvzip+kivi4 8x" in page.read_text()
    assert (tmp_path / "plot.png").stat().st_size > 10_000
