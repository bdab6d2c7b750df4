"""Budgets: ``512`` (tokens per layer, averaged over heads), ``24MiB`` (bytes of the whole cache),
``4x`` (compression ratio of the context) or ``0.25seen`` (a fraction of every token seen so far,
growing with the conversation). Tokens are what the policies work with; the other forms are
resolved to tokens once the model (bytes) or the context length (ratio, fraction) is known, a
fraction again at every compression.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BudgetError

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


@dataclass(frozen=True)
class Budget:
    """A parsed budget: exactly one of ``tokens``, ``nbytes``, ``ratio``, ``seen`` is set.

    ``seen`` (the peer's CompressionRatioDecodingPress): the cache holds at most that fraction of
    the bytes the full cache would hold for every token seen so far (`Policy.resolve`), re-resolved
    at every compression (each prefill block and every ``decode_interval`` decoded tokens), so the
    number of entries grows with the conversation. A fraction of bytes, like a ratio: at full
    precision without per-entry state, ``floor(seen x tokens seen)`` entries per layer."""

    tokens: int | None = None
    nbytes: int | None = None
    ratio: float | None = None
    seen: float | None = None

    def __str__(self) -> str:
        if self.tokens is not None:
            return str(self.tokens)
        if self.nbytes is not None:
            return f"{self.nbytes}B"
        if self.seen is not None:
            return f"{self.seen:g}seen"
        return f"{self.ratio:g}x"

    def resolve(self, entry_bytes: int | None = None, n_layers: int | None = None, context_tokens: int | None = None) -> int:
        """Tokens per layer. ``entry_bytes`` = bytes of one token in one layer (all KV heads)."""
        if self.tokens is not None:
            return self.tokens
        if self.nbytes is not None:
            if not entry_bytes or not n_layers:
                raise BudgetError(f"budget {self}: a byte budget needs the model's dimensions")
            tokens = self.nbytes // (entry_bytes * n_layers)
            if tokens < 1:
                raise BudgetError(f"budget {self} is smaller than one token in every layer ({entry_bytes * n_layers} bytes)")
            return int(tokens)
        if context_tokens is None:
            raise BudgetError(f"budget {self}: a ratio budget needs the context length")
        if self.seen is not None:
            return max(1, int(context_tokens * self.seen))
        return max(1, int(context_tokens / self.ratio))


def parse_budget(value: "int | str | Budget") -> Budget:
    """Parse ``512``, ``"512"``, ``"24MiB"``, ``"4x"``, ``"0.25seen"``; a clear `BudgetError` otherwise."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise BudgetError(f"budget must be a positive number of tokens, bytes (24MiB) or a ratio (4x), got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise BudgetError(f"budget must be positive, got {value}")
        return Budget(tokens=value)
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+", text):
        return parse_budget(int(text))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*x", text)
    if m:
        ratio = float(m.group(1))
        if ratio < 1:
            raise BudgetError(f"compression ratio must be >= 1, got {value!r}")
        return Budget(ratio=ratio)
    m = re.fullmatch(r"(\d*\.?\d+)\s*seen", text)
    if m:
        fraction = float(m.group(1))
        if not 0 < fraction <= 1:
            raise BudgetError(f"a fraction of the tokens seen must be in (0, 1], got {value!r}")
        return Budget(seen=fraction)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)", text)
    if m:
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2)])
        if nbytes <= 0:
            raise BudgetError(f"budget must be positive, got {value!r}")
        return Budget(nbytes=nbytes)
    raise BudgetError(f"cannot read budget {value!r}: use tokens (512), bytes (24MiB), a compression ratio (4x) "
                      "or a fraction of the tokens seen (0.25seen)")
