"""What `kvbudget serve` is started with."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..compress.budget import parse_budget
from ..errors import KVBudgetError
from ..runtime.engine import MAX_BATCH, PREFILL_TOKENS
from ..runtime.prefill import BLOCK_SIZE

GiB = 1024**3


@dataclass
class Limits:
    """What one request, one key and the whole server may use (enforced by `serve.limits` and
    the session manager; docs/serving.md has the table)."""

    max_body_bytes: int = 1024**2  # request body, counted while it is read (chunked uploads too)
    max_message_chars: int = 65536  # characters of one message's content
    max_request_tokens: int = 8192  # prompt tokens of one request (its messages' contents)
    max_json_depth: int = 32  # nesting of arrays and objects in a JSON body
    max_sessions_per_key: int = 1000
    max_stored_bytes_per_key: int = 4 * GiB  # session files of one key, on disk
    max_stored_bytes: int = 20 * GiB  # session files of every key together
    session_ttl_s: float = 7 * 86400.0  # a session idle this long is deleted with its file; 0 = never
    max_queue: int = 32  # requests admitted to model work at once (running or waiting); more get 429
    request_timeout_s: float = 300.0  # from admission to the answer (queueing included)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0 or (value == 0 and name != "session_ttl_s"):
                raise KVBudgetError(f"{name} must be positive, got {value}")


@dataclass
class ServeConfig:
    """What `kvbudget serve` was started with."""

    model_name: str
    store: Path
    policies: list[str] = field(default_factory=lambda: ["snapkv"])  # the first is the default
    budget: str | None = "512"
    memory: int = 2 * 1024**3  # bytes of KV held by all live sessions together
    block_size: int = BLOCK_SIZE
    max_batch: int = MAX_BATCH  # turns decoded together at most (1: one at a time)
    prefill_tokens: int = PREFILL_TOKENS  # prompt tokens fed between two decode steps, at most
    decode: str = "auto"  # the engine's decoding (`runtime.engine.Engine`): static slots + CUDA graphs on CUDA
    max_tokens: int = 512  # the most a request may ask for
    default_max_tokens: int = 128
    api_keys: list[str] = field(default_factory=list)  # empty: no keys (the CLI then listens on loopback only)
    limits: Limits = field(default_factory=Limits)


def parse_memory(value: str) -> int:
    """``2GiB``, ``512MB`` or a plain number of bytes -> bytes."""
    try:
        budget = parse_budget(value)
    except KVBudgetError:
        budget = None
    if budget is None or (budget.nbytes is None and budget.tokens is None):
        raise KVBudgetError(f"cannot read memory {value!r}: use bytes like 2GiB, 512MB or 1000000")
    return budget.nbytes if budget.nbytes is not None else budget.tokens


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d)?")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h`` or ``7d`` -> seconds."""
    match = _DURATION.fullmatch(value.strip().lower())
    if not match:
        raise KVBudgetError(f"cannot read duration {value!r}: use seconds (90) or 90s, 15m, 12h, 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]
