"""The floor any method must beat: keep uniformly random entries (seeded)."""

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("random")
class Random(Scorer):
    """Uniform random scores; the seed depends on the policy seed, the layer and the step."""

    stackable = False  # a seed per layer
    paper = "-"
    summary = "uniform random eviction (seeded floor)"

    def score(self, obs: Observation) -> Tensor:
        gen = torch.Generator().manual_seed(obs.seed)
        return torch.rand(obs.positions.shape, generator=gen).to(obs.keys.device)
