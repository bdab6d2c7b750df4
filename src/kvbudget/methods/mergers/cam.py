"""CaM (Zhang et al. 2024, "CaM: Cache Merging for Memory-efficient LLMs Inference"): the value
of an evicted entry is merged into the kept entries that follow it, as often as its attention
holds up against theirs."""

import torch
from torch import Tensor

from ...compress import Observation
from ...compress.merger import Merger, evicted_rows, gather_rows, register_merger, scatter_rows


@register_merger("cam")
class CaM(Merger):
    """For each evicted entry e, its merge window is the next ``span`` kept entries of its head
    (by position); e's value, divided by the window's size m, is added to each of their values,
    times p = clamp(A_e / mean(A over the window), 0, 1), with A the attention an entry receives
    from the observed window of queries (summed over them, averaged over the query group). Keys
    are unchanged; an evicted entry with no kept entry after it is dropped.

    Differs from the paper: (1) the paper draws the merge as a Bernoulli(p) mask; here the value
    is added times p, the mask's expectation: deterministic, so a session is reproducible and a
    merged cache does not depend on a random draw; (2) the paper's A is the attention accumulated
    over every decoding step (H2O's), here the attention of the last ``window`` queries (the
    observation window the scorers read), so no per-entry state is held; (3) the paper merges one
    token per decoding step; here every entry a compression evicts (after each prefill block and
    every ``decode_interval`` tokens) is merged at once, as the peer's CAMPress does."""

    paper = "CaM (Zhang et al. 2024)"
    summary = "evicted values added to the next 32 kept values, weighted by relative attention"

    def __init__(self, window: int = 32, span: int = 32) -> None:
        self.queries = window
        self.span = span

    def merge(self, obs: Observation, kept: Tensor, evicted: Tensor) -> tuple[Tensor, Tensor]:
        if obs.queries is None and obs.query_parts is None:
            return obs.keys, obs.values  # nothing observed yet: no attention to weigh by
        attention = obs.attention_sum()  # [B, H, n]
        rows, real = evicted_rows(evicted)  # [B, H, E]
        # Kept entries of each head in order, and for each entry how many kept ones precede it:
        # an evicted entry's window starts at that rank.
        order = (~kept).to(torch.uint8).argsort(dim=-1, stable=True)
        rank = kept.long().cumsum(-1).gather(2, rows)  # [B, H, E]
        slot = rank[..., None] + torch.arange(self.span, device=rank.device)  # [B, H, E, span]
        inside = (slot < kept.sum(-1)[..., None, None]) & real[..., None]
        b, h, e, s = slot.shape
        target = order.gather(2, slot.clamp(max=order.shape[-1] - 1).view(b, h, e * s)).view(b, h, e, s)
        size = inside.sum(-1)  # [B, H, E]: the window's size m
        mean = (attention.gather(2, target.view(b, h, e * s)).view(b, h, e, s) * inside).sum(-1) / size.clamp(min=1)
        p = (attention.gather(2, rows) / mean).nan_to_num(nan=0.0, posinf=1.0).clamp(0, 1)
        share = torch.where(inside, (p / size.clamp(min=1))[..., None], 0.0)  # [B, H, E, span]
        values = obs.values.float()
        merged = scatter_rows(values, target, gather_rows(values, rows)[:, :, :, None] * share[..., None])
        return obs.keys, merged.to(obs.values.dtype)
