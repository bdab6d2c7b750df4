"""LagKV (Liang et al. 2025, "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens
Are Important"): attention-free; a token matters when its key and value stand out against the
range of the tokens that come *after* it.

Per head, the entries after the first ``sinks`` (4) are cut, in order, into partitions of
``lag`` (128) entries. Each partition's keys are min-max normalised per channel with the minimum
and maximum of the *next* partition, and a token's key score is the spread (standard deviation
over channels) of its normalised key, softmaxed over its partition; the same for values; the
token's score is the mean of the two, turned into its rank inside the partition over ``lag``
(so every partition keeps about the same share). The last full partition (it has no
reference) and the entries after it score 1 and are kept, as are the sinks. With fewer than
``sinks + 2 lag`` entries nothing can be compared: entries score by recency.
"""

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register
from ...errors import KVBudgetError


@register("lagkv")
class LagKV(Scorer):
    paper = "LagKV (Liang et al. 2025)"
    summary = "attention-free: spread of K and V min-max normalised by the next partition of 128 tokens"
    reads_values = True

    def __init__(self, window: int = 32, lag: int = 128, sinks: int = 4) -> None:
        super().__init__(window)
        if lag < 2:
            raise KVBudgetError(f"lagkv: lag must be >= 2, got {lag}")
        self.lag, self.sinks = lag, sinks

    def score(self, obs: Observation) -> Tensor:
        b, h, n, _ = obs.keys.shape
        lens = obs.valid.sum(-1, keepdim=True) if obs.valid is not None else torch.full((b, h, 1), n, device=obs.keys.device)
        index = torch.arange(n, device=obs.keys.device)
        # Default: recency after the sinks (heads too short to compare), sinks on top.
        scores = ((index - self.sinks) / (lens - self.sinks).clamp(min=1)).clamp(max=1).float().expand(b, h, n).clone()
        parts = (lens - self.sinks).clamp(min=0) // self.lag  # full partitions per head [B, H, 1]
        top = int(parts.max())
        if top >= 2:
            span = slice(self.sinks, self.sinks + top * self.lag)
            ranks = (self.spread(obs.keys[:, :, span], top) + self.spread(obs.values[:, :, span], top)) / 2
            ranks = ranks.argsort(-1).argsort(-1).float() / self.lag  # [B, H, top - 1, lag]
            part = ((index - self.sinks) // self.lag).expand(b, h, n)
            scored = (index >= self.sinks) & (part < parts - 1)  # partitions with a successor
            flat = torch.zeros(b, h, n, device=scores.device)
            flat[:, :, self.sinks : self.sinks + (top - 1) * self.lag] = ranks.flatten(2)
            scores = torch.where(scored, flat, torch.where(parts >= 2, 1.0, scores))
        return scores.masked_fill(index < self.sinks, 1.0)

    def spread(self, x: Tensor, parts: int) -> Tensor:
        """Softmaxed spread of each of the first ``parts - 1`` partitions' entries, normalised by
        the next partition's per-channel range: [B, H, parts - 1, lag]."""
        x = x.float().unflatten(2, (parts, self.lag))  # [B, H, P, lag, d]
        ref = x[:, :, 1:]
        low, high = ref.amin(dim=3, keepdim=True), ref.amax(dim=3, keepdim=True)
        return ((x[:, :, :-1] - low) / (high - low).clamp(min=1e-6)).std(dim=-1).softmax(dim=-1)
