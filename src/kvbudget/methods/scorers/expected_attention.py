"""Expected Attention (Devoto et al. 2025): keys scored by the attention that *future* queries are
expected to give them, from the statistics of the queries observed so far.

Future queries are modelled as a Gaussian N(mu, Sigma) per query head, fitted to the queries of
the tokens fed since the last compression (the first ``sinks`` positions left out: their
queries are outliers). Under that Gaussian the expected unnormalised attention of a key k is

    E[exp(s q.k)] = exp(s mu.k + s^2 k^T Sigma k / 2),      s = the layer's scaling (1/sqrt(d)),

normalised over the cached entries (a softmax of the exponent), averaged over the query heads of
each KV head, and multiplied by the value's L2 norm. The first ``sinks`` positions are always
kept. Query-agnostic: no question is needed (in query-aware mode the question's queries are
the sample instead).

Deviation: the paper fits the Gaussian to the queries *before* RoPE and rotates it by the RoPE
matrix averaged over the next 512 positions. A scorer here sees queries after RoPE only (the
cache records them so), so the Gaussian is fitted to the rotated queries of the recent
positions: it models queries as they were lately rather than rotated forward. The paper's form
needs the layer's rotary frequencies (``inv_freq`` and attention scaling of its rotary
embedding) or its pre-RoPE queries in the `Observation`.
"""

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("expected-attention")
class ExpectedAttention(Scorer):
    paper = "Expected Attention (Devoto et al. 2025)"
    summary = "query-agnostic: expected attention under a Gaussian of the recent queries x value norm; 4 sinks"
    queries = -1
    reads_values = True
    stackable_padded = False  # a softmax over entries: padding would change its rounding

    def __init__(self, window: int = 32, sinks: int = 4, covariance: bool = True, vnorm: bool = True) -> None:
        super().__init__(window)
        self.sinks, self.covariance, self.vnorm = sinks, covariance, vnorm

    def score(self, obs: Observation) -> Tensor:
        b, h, n, d = obs.keys.shape
        q = obs.queries if obs.queries is not None else torch.cat(obs.query_parts)
        q = q.float().view(b, h, -1, q.shape[2], d)  # [B, H, g, m, d]
        sample = obs.query_positions.to(q.device) >= self.sinks
        if int(sample.sum()) < 2:  # too few queries past the sinks: use them all
            sample = torch.ones_like(sample)
        q = q[..., sample, :]
        mu = q.mean(dim=3)  # [B, H, g, d]
        k = obs.keys.float()
        logits = obs.scaling * torch.einsum("bhgd,bhnd->bhgn", mu, k)
        if self.covariance:
            centered = q - mu[..., None, :]
            cov = centered.transpose(-1, -2) @ centered / q.shape[3]  # [B, H, g, d, d]
            logits = logits + obs.scaling**2 / 2 * torch.einsum("bhnd,bhgde,bhne->bhgn", k, cov, k)
        if obs.valid is not None:
            logits = logits.masked_fill(~obs.valid[:, :, None], float("-inf"))
        scores = logits.softmax(dim=-1).mean(dim=2)
        if self.vnorm:
            scores = scores * obs.values.float().norm(dim=-1)
        return scores.masked_fill((obs.positions >= 0) & (obs.positions < self.sinks), float("inf"))
