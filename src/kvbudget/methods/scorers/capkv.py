"""CAPKV (arXiv 2604.25975): keep the entries that add the most *capacity* to what the head can
still output, weighted by how well they align with the queries seen so far.

Per query head, with the keys and a query anchor mu_q (the mean of the queries fed since the last
compression, the first ``sinks`` positions left out) L2-normalised:

    w_i = exp(tau <k_i, mu_q>),   A = I + sum_i w_i v_i v_i^T,   s_i = w_i v_i^T A^-1 v_i

(u_i, the entry's output direction, approximated by its value v_i), averaged over the query heads
of each KV head; the first ``sinks`` (4) positions are always kept. tau = 5.

Deviations: the anchor is the mean of the queries after RoPE (the peer library rotates the
pre-RoPE mean by the RoPE matrix averaged over the next 512 positions, which needs the layer's
rotary frequencies); no per-head max shift of the exponent (the normalised alignment keeps it
within [-tau, tau], and a shift would rescale the weights against the identity in A).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("capkv")
class CAPKV(Scorer):
    paper = "CAPKV (arXiv 2604.25975)"
    summary = "w_i v_i^T A^-1 v_i, A = I + sum w v v^T, w = exp(5 cos(k_i, mean query)); 4 sinks"
    queries = -1
    reads_values = True
    stackable_padded = False  # sums over entries: padding would change their rounding

    def __init__(self, window: int = 32, tau: float = 5.0, sinks: int = 4) -> None:
        super().__init__(window)
        self.tau, self.sinks = tau, sinks

    def score(self, obs: Observation) -> Tensor:
        b, h, n, d = obs.keys.shape
        q = obs.queries if obs.queries is not None else torch.cat(obs.query_parts)
        q = q.float().view(b, h, -1, q.shape[2], d)  # [B, H, g, m, d]
        sample = obs.query_positions.to(q.device) >= self.sinks
        anchor = q[..., sample, :].mean(3) if bool(sample.any()) else q.mean(3)  # [B, H, g, d]
        held = obs.positions >= 0 if obs.valid is None else obs.valid
        counted = held & (obs.positions >= self.sinks)
        align = torch.einsum("bhgd,bhnd->bhgn", F.normalize(anchor, dim=-1), F.normalize(obs.keys.float(), dim=-1))
        w = torch.exp(self.tau * align.clamp(-1, 1)) * counted[:, :, None]  # [B, H, g, n]
        v = obs.values.float()
        eye = torch.eye(v.shape[-1], device=v.device)
        capacity = eye + torch.einsum("bhgn,bhnd,bhne->bhgde", w, v, v)
        solved = torch.linalg.solve(capacity, v.transpose(-1, -2)[:, :, None].expand(-1, -1, w.shape[2], -1, -1))
        scores = (w * (v.transpose(-1, -2)[:, :, None] * solved).sum(-2)).mean(2)  # [B, H, n]
        return scores.masked_fill(held & (obs.positions < self.sinks), float("inf"))
