"""What `kvbudget serve` is started with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..compress.budget import parse_budget
from ..errors import KVBudgetError
from ..runtime.prefill import BLOCK_SIZE


@dataclass
class ServeConfig:
    """What `kvbudget serve` was started with."""

    model_name: str
    store: Path
    policies: list[str] = field(default_factory=lambda: ["snapkv"])  # the first is the default
    budget: str | None = "512"
    memory: int = 2 * 1024**3  # bytes of KV held by all live sessions together
    block_size: int = BLOCK_SIZE
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 128


def parse_memory(value: str) -> int:
    """``2GiB``, ``512MB`` or a plain number of bytes -> bytes."""
    try:
        budget = parse_budget(value)
    except KVBudgetError:
        budget = None
    if budget is None or budget.ratio is not None:
        raise KVBudgetError(f"cannot read memory {value!r}: use bytes like 2GiB, 512MB or 1000000")
    return budget.nbytes if budget.nbytes is not None else budget.tokens
