"""Answer retention pooled over questions, with a bootstrap interval (DESIGN.md, Measuring).

Per question, retention is (lp_policy - lp_none) / (lp_full - lp_none): how much of the full
cache's gain in the gold answer's mean log-probability the policy keeps. A per-question mean is
dominated by questions where the context barely helps (a gain of 0.2 nats turns small noise
into ratios of 7 or -2), so the table reports the pooled ratio: the summed gains of the policy
over the summed gains of the full cache, over the questions where the full cache gains at least
`MIN_GAIN` nats. Its 95% interval comes from resampling those questions (a seeded bootstrap); a
policy beats another only where their intervals do not overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The full cache must raise the gold answer's mean log-probability by at least this many nats
# over no context for a question to count: below it the context barely matters.
MIN_GAIN = 1.0
RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Pooled:
    """Pooled retention ``value`` with its interval [``low``, ``high``] over ``n`` questions
    that pass `MIN_GAIN` (of ``total`` with log-probabilities)."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    total: int

    def separates(self, other: "Pooled") -> bool:
        """Whether the two intervals do not overlap (only then does one policy beat the other)."""
        if None in (self.low, self.high, other.low, other.high):
            return False
        return self.low > other.high or other.low > self.high


def gain(row: dict) -> float | None:
    """What the full cache adds to the gold answer's mean log-probability (nats), or None."""
    if row.get("lp_full") is None or row.get("lp_none") is None:
        return None
    return row["lp_full"] - row["lp_none"]


def question_retention(row: dict) -> float | None:
    """One question's retention; None where the full cache gains less than `MIN_GAIN`."""
    g = gain(row)
    if g is None or g < MIN_GAIN or row.get("answer_logprob") is None:
        return None
    return (row["answer_logprob"] - row["lp_none"]) / g


def pooled(rows: list[dict], seed: int = 0) -> Pooled:
    """Pooled retention of ``rows`` (one per question) and its bootstrap interval."""
    total = sum(gain(r) is not None and r.get("answer_logprob") is not None for r in rows)
    kept = [r for r in rows if question_retention(r) is not None]
    if not kept:
        return Pooled(None, None, None, 0, total)
    num = np.array([r["answer_logprob"] - r["lp_none"] for r in kept])
    den = np.array([gain(r) for r in kept])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(kept), size=(RESAMPLES, len(kept)))
    boot = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return Pooled(float(num.sum() / den.sum()), float(low), float(high), len(kept), total)
