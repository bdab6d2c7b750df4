"""Compactor (Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression
with Approximate Leverage Scores"): query-agnostic; a blend of two z-normalised scores.

- **Leverage** of the keys: how much each key sticks out of the subspace the others span,
  h_i = x_i^T (X^T X)^-1 x_i over the head's centred keys X, approximated through a fixed Gaussian
  sketch (``sketch`` = 48 columns: X <- X Phi) with a small ridge.
- **Non-causal chunked attention**: the tokens fed since the last compression are cut in chunks
  of ``chunk`` (256) tokens; each chunk's queries attend to *all* the chunk's keys (no causal
  mask), the attention an entry receives is summed over those queries (mean over the query
  heads of a group), times its value's norm, averaged over its neighbours (kernel 3). Computed
  once, when the entry's own block is fed (its queries are gone afterwards), and kept as
  per-entry state.

score = blending * z(leverage) + z(attention), z over the layer's entries; ``blending`` defaults
to the fraction of the context evicted, 1 - budget / tokens seen (the peer library's default).
The first ``sinks`` (8) positions are always kept.

Deviations: leverage is taken over the keys after RoPE (the paper's are before RoPE; a scorer
sees only rotated keys, and un-rotating them needs the layer's rotary frequencies); the sketch
is one fixed seeded matrix, shared by heads and layers (so stacked and per-layer scoring agree).
In query-aware mode the queries observed are the question's, not the block's: the attention
part is then the question's attention times the value norm, for every entry, and no state is
written.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("compactor")
class Compactor(Scorer):
    paper = "Compactor (Chari & Van Durme 2025)"
    summary = "query-agnostic: z(key leverage, Gaussian sketch) x blending + z(non-causal chunk attention x |v|)"
    queries = -1
    state_names = ("compactor",)
    reads_values = True
    stackable_padded = False  # reads the layer's budget; z-normalises over its entries

    def __init__(self, window: int = 32, sinks: int = 8, chunk: int = 256, sketch: int = 48,
                 blending: float | None = None, seed: int = 0) -> None:
        super().__init__(window)
        self.sinks, self.chunk, self.sketch, self.blending, self.seed = sinks, chunk, sketch, blending, seed

    def score(self, obs: Observation) -> Tensor:
        valid = obs.positions >= 0 if obs.valid is None else obs.valid
        lev = leverage(obs.keys, valid, self.projection(obs.keys.shape[-1], obs.keys.device))
        attn = self.attention(obs)
        blend = self.blending if self.blending is not None else max(0.0, 1 - obs.budget / max(obs.seen, 1))
        scores = blend * _z(lev, valid) + _z(attn, valid)
        return scores.masked_fill(valid & (obs.positions < self.sinks), float("inf"))

    def projection(self, d: int, device: torch.device) -> Tensor:
        """The Gaussian sketch [d, sketch] (entries N(0, 1/sketch)), rebuilt from its seed."""
        gen = torch.Generator().manual_seed(self.seed)
        return (torch.randn(d, self.sketch, generator=gen) / self.sketch**0.5).to(device)

    def attention(self, obs: Observation) -> Tensor:
        """Non-causal chunked attention x value norm per entry [B, H, n] (kept as state)."""
        q = obs.queries if obs.queries is not None else torch.cat(obs.query_parts)
        b, h, n, d = obs.keys.shape
        m = q.shape[2]
        lens = obs.valid.sum(-1) if obs.valid is not None else torch.full((b, h), n, device=obs.keys.device)
        index = (lens[..., None] - m + torch.arange(m, device=lens.device)).clamp(min=0)  # each head's last m
        qpos = obs.query_positions.to(obs.positions.device)
        if m > n or not bool((obs.positions.gather(2, index) == qpos).all()):
            # The queries are not the entries' own (query-aware: the question's).
            return obs.attention_sum() * obs.values.float().norm(dim=-1)
        keys = obs.keys.gather(2, index[..., None].expand(b, h, m, d)).float()
        values = obs.values.gather(2, index[..., None].expand(b, h, m, obs.values.shape[-1])).float()
        received = _chunked(q.float().view(b, h, -1, m, d), keys, self.chunk, obs.scaling)
        raw = F.avg_pool1d((received * values.norm(dim=-1)).view(b * h, 1, m), 3, stride=1, padding=1).view(b, h, m)
        state = obs.state.get("compactor", obs.zeros()).scatter(2, index, raw)
        obs.state["compactor"] = state
        return state


def leverage(keys: Tensor, valid: Tensor, phi: Tensor, ridge: float = 1e-2) -> Tensor:
    """Approximate statistical leverage of each key among its head's valid keys [B, H, n]:
    x_i^T (X^T X + ridge I)^-1 x_i with X the centred keys times the sketch ``phi`` [d, k]."""
    w = valid[..., None].float()
    mean = (keys.float() * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)
    x = ((keys.float() - mean) @ phi) * w  # [B, H, n, k]; padding rows are zero
    gram = x.transpose(-1, -2) @ x + ridge * torch.eye(phi.shape[1], device=x.device)
    # x^T G^-1 x = |L^-1 x|^2 with G = L L^T (Cholesky; G is positive definite with the ridge).
    lower, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):  # not positive definite in floating point: a general solve
        return (x * torch.linalg.solve(gram, x.transpose(-1, -2)).transpose(-1, -2)).sum(-1).clamp(min=0)
    return torch.linalg.solve_triangular(lower, x.transpose(-1, -2), upper=False).square().sum(-2)


def _chunked(q: Tensor, k: Tensor, chunk: int, scaling: float) -> Tensor:
    """Attention each of m keys receives from the m queries of its chunk (no causal mask), summed
    over them and averaged over the query heads of the group: q [B, H, g, m, d], k [B, H, m, d]."""
    b, h, g, m, d = q.shape
    chunk = min(chunk, m)  # a block shorter than a chunk is one chunk: no padding to compute
    c = -(-m // chunk)
    pad = c * chunk - m
    qc = F.pad(q, (0, 0, 0, pad)).view(b, h, g, c, chunk, d)
    kc = F.pad(k, (0, 0, 0, pad)).view(b, h, c, chunk, d)
    logits = torch.einsum("bhgcid,bhcjd->bhgcij", qc, kc) * scaling
    real = torch.arange(c * chunk, device=q.device).view(c, chunk) < m  # [c, chunk]
    probs = logits.masked_fill(~real[:, None, :], float("-inf")).softmax(-1) * real[:, :, None]
    return probs.sum(-2).mean(2).reshape(b, h, c * chunk)[..., :m]


def _z(x: Tensor, valid: Tensor) -> Tensor:
    """z-score over each row's (layer's) valid entries, all heads together."""
    w = valid.float()
    count = w.sum(dim=(1, 2), keepdim=True).clamp(min=2)
    mean = (x * w).sum(dim=(1, 2), keepdim=True) / count
    std = (((x - mean) * w) ** 2).sum(dim=(1, 2), keepdim=True).div(count - 1).sqrt()
    return torch.where(valid, (x - mean) / std.clamp(min=1e-6), 0)
