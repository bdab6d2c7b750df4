"""Sampling a token from next-token logits: temperature and nucleus (top-p), with a seed.

Greedy decoding (`answer.greedy`) stays the default and the tested path; a request that asks
for a temperature above 0 samples instead. Each answer gets its own generator, seeded, so that
the same request with the same seed gives the same answer, whatever runs beside it."""

from __future__ import annotations

import torch
from torch import Tensor


class Sampler:
    """Draws a token from logits [1, vocab] at ``temperature`` among the smallest set of tokens
    whose probability reaches ``top_p``."""

    def __init__(self, temperature: float, top_p: float = 1.0, seed: int | None = None) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive to sample, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def __call__(self, logits: Tensor) -> int:
        probs = (logits[0].float().cpu() / self.temperature).softmax(-1)
        if self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Keep a token while the probability of the tokens before it is below top_p.
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))
