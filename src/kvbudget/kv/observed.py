"""The queries a layer keeps for its policy's scorer, from the attention hook.

A scorer asks for none (attention-free), the latest k (a window: SnapKV and its kin) or every
query since the last compression (accumulating: H2O, A2SF). With them may come each query's
log-sum-exp over the keys it attended to, from the attention call itself: the scoring reuses it
instead of recomputing it. It is valid only while those keys are exactly the layer's entries
(keys are only appended, visibility is causal by position): anything that removes or re-encodes
entries drops it (`drop_lse`), and so does any observed chunk without one, until `clear` starts
a new interval, or (a window of the latest queries, kept across compressions) until the rows
observed since with one fill the window again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ObservedQueries:
    keep: int = 0  # 0: none, k > 0: the latest k, -1: every query since the last compression
    queries: Tensor | None = None  # [B, Hq, m, d], after RoPE
    positions: Tensor | None = None  # [m]
    scaling: float | None = None  # the layer's attention scaling
    lse: Tensor | None = None  # [B, Hq, m] float32, natural log; covers every row or is None
    # The LSE of the latest rows that came with one while ``lse`` is None: fewer rows than
    # ``queries`` ([B, Hq, r]); it becomes ``lse`` when it covers them all.
    lse_tail: Tensor | None = None

    def observe(self, query: Tensor, scaling: float | None, seen: int, lse: Tensor | None = None) -> None:
        """Receive the queries of the tokens just processed (the last of ``seen`` tokens), and
        with ``lse`` ([B, Hq, q]) each one's log-sum-exp."""
        self.scaling = scaling
        if self.keep == 0:
            return
        q_len = query.shape[2]
        pos = torch.arange(seen - q_len, seen, device=query.device)
        query = query.detach()
        lse = None if lse is None else lse.detach()
        if self.queries is not None:
            query = torch.cat([self.queries, query], dim=2)
            pos = torch.cat([self.positions, pos])
            # The rows with an LSE are the latest ones since the last chunk without: a chunk
            # without one drops it for every row before it.
            before = self.lse if self.lse is not None else self.lse_tail
            lse = lse if lse is None or before is None else torch.cat([before, lse], dim=2)
        if self.keep > 0:
            query, pos = query[:, :, -self.keep :], pos[-self.keep :]
            lse = None if lse is None else lse[:, :, -self.keep :]
        # Never a mix of rows with and without LSE for the scoring: ``lse`` covers every row.
        whole = lse is not None and lse.shape[2] == query.shape[2]
        self.queries, self.positions = query, pos
        self.lse, self.lse_tail = (lse, None) if whole else (None, lse)

    def wants_lse(self) -> bool:
        """Whether the attention call should compute the LSE: queries are kept and the rows kept
        can all come with one (a window of the latest queries always can, every query of the
        interval only while no chunk of it lacked one)."""
        if self.keep == 0:
            return False
        return self.keep > 0 or self.queries is None or self.lse is not None

    def clear(self) -> None:
        """Start a new interval (after a compression that read every query of the last one)."""
        self.queries = self.positions = self.lse = self.lse_tail = None

    def drop_lse(self) -> None:
        self.lse = self.lse_tail = None

    def moved(self, move) -> None:
        """Every tensor held moved with ``move(tensor)`` (a device change)."""
        for name in ("queries", "positions", "lse", "lse_tail"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, move(value))

    def saved(self) -> "ObservedQueries":
        """A copy to restore later (the tensors are shared: they are never written in place)."""
        return copy.copy(self)
