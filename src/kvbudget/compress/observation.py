"""`Observation`: what a scorer may look at for one layer (or for layers stacked along the batch).

Its attention helpers compute, from the observed queries and the cached keys, the attention a
scorer reads, without materialising the whole matrix where a reduction is enough
(`compress.scoring`: Triton on CUDA, query chunks elsewhere). They work with any attention
implementation of the model, since they never read the model's attention weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import scoring


@dataclass
class Observation:
    """What a scorer may look at for one layer. Tensors are padded [B, H, n, ...] views."""

    layer_idx: int  # index among the budgeted layers
    n_layers: int  # number of budgeted layers
    keys: Tensor  # [B, H, n, d], RoPE applied
    values: Tensor | None  # [B, H, n, dv]; None for stacked padded (or Ada-KV) layers unless `Scorer.reads_values`
    positions: Tensor  # [B, H, n] original token positions (-1 on padding)
    valid: Tensor | None  # [B, H, n] bool, None = no padding (padding is at the end of a row)
    queries: Tensor | None  # [B, Hq, m, d] latest queries (after RoPE), as many as the scorer asked
    query_positions: Tensor | None  # [m]
    scaling: float  # the layer's attention scaling
    budget: int  # entries per head this layer keeps (stacked layers of several budgets: the largest)
    seen: int  # tokens seen so far (position of the next token)
    seed: int  # for seeded random choices
    state: dict[str, Tensor] = field(default_factory=dict)  # per-entry running state, [B, H, n]
    # [B, Hq, m] float32, natural log: each query's log-sum-exp of the scaled logits over exactly
    # the keys visible to it here, from the model's own attention call (`BudgetedLayer.lse`);
    # None: the reductions compute it. Never set for only some of the queries.
    lse: Tensor | None = None
    # Stacked layers: their queries, one [B, Hq, m, d] part per layer, left unconcatenated (the
    # Triton reductions read each where it lies); `queries` is None until a torch path asks.
    query_parts: list[Tensor] | None = None
    # A sliding-window layer's window: entries at positions <= seen - window are visible to no
    # later token, and are never kept over visible ones.
    window: int | None = None

    @cached_property
    def attention(self) -> Tensor:
        """softmax(Q K^T * scaling) of the observed queries, causal by position, averaged over the
        query heads of each KV head: [B, H, m, n] (float32). Materialises the whole matrix: for
        scorers with few queries (a window); reductions over many queries use `attention_sum`,
        `attention_max` or `attention_chunks`."""
        return self.group_attention().mean(2)

    def group_attention(self) -> Tensor:
        """The same attention before averaging the query heads of each group: [B, H, g, m, n].
        Softmax is over the cached entries (tokens the queries belong to are not in the cache)."""
        q = self._queries()
        return scoring.group_probs(q, self.keys, scoring.key_positions(self.positions, self.valid),
                                   self.query_positions, self.scaling)

    def attention_sum(self, weights: Tensor | None = None) -> Tensor:
        """``attention.sum(2)`` without the [m, n] matrix: the attention each entry received,
        summed over the queries (each times ``weights[i]``, [m], when given): [B, H, n] float32.
        Triton on CUDA, query chunks elsewhere (`kvbudget.scoring`)."""
        if "attention" in self.__dict__:  # already materialised: reuse it
            a = self.attention
            return (a if weights is None else a * weights.to(a)[:, None]).sum(2)
        return self._reduce("sum", weights)

    def attention_max(self) -> Tensor:
        """``group_attention().amax(dim=(2, 3))`` without the matrix: the largest attention each
        entry received from any query head of its group and any query: [B, H, n] float32."""
        return self._reduce("max")

    def attention_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """``attention`` a chunk of queries at a time, for per-query logic: (index of the chunk's
        first query, [B, H, mc, n] float32), in query order."""
        if "attention" in self.__dict__:  # already materialised: one chunk
            return iter([(0, self.attention)])
        q = self._queries()
        kpos = scoring.key_positions(self.positions, self.valid)
        return scoring.attention_chunks(q, self.keys, kpos, self.query_positions.to(self.keys.device), self.scaling)

    def attention_lazy(self, last: Tensor, gap: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """LazyEviction's scan of the queries in order (`scoring.lazy_scan`), from the state
        ``last`` / ``gap`` [B, H, n] so far: (attention received, summed over the queries; when
        each entry was last important; the longest interval between two such moments), each
        [B, H, n] float32. Triton on CUDA, query chunks elsewhere."""
        if "attention" in self.__dict__:  # already materialised: one chunk
            return scoring.lazy_scan([(0, self.attention)], self.positions, self.valid, self.query_positions, last, gap)
        return scoring.attention_lazy(self._query_input(), self.keys, self.positions, self.valid,
                                      self.query_positions, self.scaling, last, gap, lse=self.lse)

    def _reduce(self, mode: str, weights: Tensor | None = None) -> Tensor:
        return scoring.attention_reduce(self._query_input(), self.keys, self.positions, self.valid,
                                        self.query_positions, self.scaling, mode, weights, lse=self.lse)

    def _query_input(self) -> scoring.Queries:
        return self.query_parts if self.queries is None and self.query_parts is not None else self._queries()

    def _queries(self) -> Tensor:
        if self.queries is None and self.query_parts is not None:
            self.queries = torch.cat(self.query_parts)
        if self.queries is None:
            raise RuntimeError("this scorer needs queries but none were observed")
        return self.queries

    def zeros(self) -> Tensor:
        """A [B, H, n] float tensor of zeros, for scorers that build a score step by step."""
        return torch.zeros(self.positions.shape, dtype=torch.float32, device=self.keys.device)
