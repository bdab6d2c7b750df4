"""The frontier of a sweep: the most quality each byte size buys.

Each configuration (a policy at a budget, or a store alone) is one point: its compression in bytes
(full KV bytes / bytes held) against a quality measure (pooled answer retention by default). The
frontier is the upper envelope of those points: at each compression, the best quality among the
configurations that hold at most that many bytes. `best_per_budget` says in one line per ratio
budget which configuration keeps the most within it, and which it does not beat: a configuration
beats another only where their retention intervals separate (eval.retention).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..compress.budget import parse_budget
from ..errors import BudgetError


@dataclass(frozen=True)
class Point:
    """One configuration of a summary table: ``quality`` (with its interval [``low``, ``high``]
    where known) at ``compression`` (full KV bytes / bytes held)."""

    policy: str
    budget: str  # "-" for a policy without a budget (a store alone, the full cache)
    compression: float
    quality: float
    low: float | None = None
    high: float | None = None

    @property
    def label(self) -> str:
        """``kvzip+kivi4 8x``; the policy alone where it has no budget."""
        return self.policy if self.budget == "-" else f"{self.policy} {self.budget}"

    def cell(self) -> str:
        """Quality and interval: ``0.83 [0.70,0.98]``."""
        interval = f" [{self.low:.2f},{self.high:.2f}]" if self.low is not None and self.high is not None else ""
        return f"{self.quality:.2f}{interval}"

    def overlaps(self, other: Point) -> bool:
        """Whether the two intervals overlap (neither beats the other); False where one is unknown."""
        if None in (self.low, self.high, other.low, other.high):
            return False
        return not (self.low > other.high or other.low > self.high)


def points(rows: list[dict], key: str = "retention", mode: str | None = None) -> list[Point]:
    """The configurations of summary ``rows`` (eval.summary) with a compression and a ``key``
    value, in ``mode`` when given; the interval comes with ``retention``."""
    out = []
    for r in rows:
        if (mode is not None and r.get("mode", "multi-turn") != mode) or not r.get("compression") or r.get(key) is None:
            continue
        low, high = (r.get("retention_low"), r.get("retention_high")) if key == "retention" else (None, None)
        out.append(Point(r["policy"], str(r["budget"]), float(r["compression"]), float(r[key]), low, high))
    return out


def envelope(pts: list[Point]) -> list[Point]:
    """The frontier: the points no other point beats with at most their bytes (compression at
    least theirs and quality higher), by compression ascending (quality then descends). The best
    quality at compression ``c`` is that of the first frontier point with compression >= ``c``."""
    out: list[Point] = []
    for p in sorted(pts, key=lambda p: (-p.compression, -p.quality)):
        if not out or p.quality > out[-1].quality:
            out.append(p)
    return out[::-1]


def ratio_budgets(rows: list[dict]) -> list[float]:
    """The ratio budgets (``4x``) of summary ``rows``, ascending; token and byte budgets have no
    compression of their own to compare at."""
    ratios = set()
    for r in rows:
        try:
            ratio = parse_budget(str(r["budget"])).ratio
        except BudgetError:  # "-": no budget
            continue
        if ratio is not None:
            ratios.add(ratio)
    return sorted(ratios)


def best_at(pts: list[Point], ratio: float) -> tuple[Point | None, list[Point]]:
    """The point of highest quality among those holding at most 1/``ratio`` of the full cache's
    bytes (compression >= ``ratio``), and the others there whose interval overlaps its own."""
    within = [p for p in pts if p.compression >= ratio]
    if not within:
        return None, []
    best = max(within, key=lambda p: (p.quality, p.compression))
    tied = sorted((p for p in within if p is not best and best.overlaps(p)), key=lambda p: -p.quality)
    return best, tied


def best_per_budget(rows: list[dict], mode: str | None = None) -> list[str]:
    """One line per ratio budget of summary ``rows``: the configuration with the highest pooled
    retention within that many times fewer bytes, and those it ties with, e.g.
    ``8x: kvzip+kivi4 8x 0.83 [0.70,0.98] at 8.1x — best; tied with kvzip 8x 0.74 [0.61,0.86] at 8.1x``."""
    pts = points(rows, "retention", mode)
    lines = []
    for ratio in ratio_budgets([r for r in rows if mode is None or r.get("mode", "multi-turn") == mode]):
        best, tied = best_at(pts, ratio)
        head = f"{ratio:g}x:"
        if best is None:
            lines.append(f"{head} no configuration holds {ratio:g}x fewer bytes")
            continue
        line = f"{head} {best.label} {best.cell()} at {best.compression:.1f}x — best"
        if tied:
            line += "; tied with " + ", ".join(f"{p.label} {p.cell()}" for p in tied)
        elif best.low is not None and any(p is not best and p.compression >= ratio for p in pts):
            line += ", its interval above every other's"
        lines.append(line)
    return lines
