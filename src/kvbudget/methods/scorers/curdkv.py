"""CurDKV (Sengupta et al. 2025, "Value-Guided KV Compression for LLMs via Approximated CUR
Decomposition", arXiv 2509.15038): keep the rows (tokens) a CUR decomposition of the keys and
values would select, by their leverage scores; attention-free and value-guided.

Leverage is approximated as the paper does, by a Gaussian random projection: keys and values are
multiplied by a fixed G [d, r] (r = 20, entries N(0, 1/r)) and a token's key (value) leverage is
its projected squared norm over the head's total. With ``local`` > 0 (16, the peer library's
default) the leverages are normalised within windows of that many consecutive positions
instead, so every stretch of the context gets its share. The score is the product of key and
value leverage, normalised per head (so that heads compare under a head-adaptive allocator);
the first ``sinks`` (4) positions are always kept.
"""

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register
from ...errors import KVBudgetError


@register("curdkv")
class CurDKV(Scorer):
    paper = "CurDKV (Sengupta et al. 2025)"
    summary = "attention-free: key leverage x value leverage (Gaussian projection, windows of 16); 4 sinks"
    reads_values = True
    stackable_padded = False  # sums over entries: padding would change their rounding

    def __init__(self, window: int = 32, rank: int = 20, local: int = 16, sinks: int = 4, seed: int = 0) -> None:
        super().__init__(window)
        if rank < 1 or local < 0:
            raise KVBudgetError(f"curdkv: need rank >= 1 and local >= 0, got rank={rank}, local={local}")
        self.rank, self.local, self.sinks, self.seed = rank, local, sinks, seed

    def score(self, obs: Observation) -> Tensor:
        held = obs.positions >= 0 if obs.valid is None else obs.valid
        gen = torch.Generator().manual_seed(self.seed)
        g = (torch.randn(obs.keys.shape[-1], self.rank, generator=gen) / self.rank**0.5).to(obs.keys.device)
        k2 = torch.where(held, (obs.keys.float() @ g).square().sum(-1), 0)
        v2 = torch.where(held, (obs.values.float() @ g).square().sum(-1), 0)
        scores = self.normalise(k2, obs) * self.normalise(v2, obs)
        scores = scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)  # heads comparable (Ada-KV)
        return scores.masked_fill(held & (obs.positions < self.sinks), float("inf"))

    def normalise(self, x: Tensor, obs: Observation) -> Tensor:
        """``x`` over its head's total, or (``local``) over its window of positions' total."""
        if not self.local:
            return x / x.sum(-1, keepdim=True).clamp(min=1e-12)
        b, h, n = x.shape
        group = (obs.positions.clamp(min=0) // self.local).long()
        totals = x.new_zeros(b, h, obs.seen // self.local + 1).scatter_add_(2, group, x)
        return x / totals.gather(2, group).clamp(min=1e-12)
