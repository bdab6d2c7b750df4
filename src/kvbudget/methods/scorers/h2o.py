"""H2O (Zhang et al. 2023): heavy hitters by accumulated attention, plus recent tokens."""

import torch
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("h2o")
class H2O(Scorer):
    """Attention received, summed over every query seen so far (all blocks, then decode steps).
    As in the paper, a share of the budget (``recent``, half by default) goes to the most recent
    tokens and the rest to the heavy hitters."""

    paper = "H2O (Zhang et al. 2023)"
    summary = "accumulated attention from every query so far + recent tokens"
    queries = -1
    state_names = ("h2o",)
    stackable_padded = False  # the recent share depends on the layer's own budget

    def __init__(self, window: int = 32, recent: float = 0.5) -> None:
        super().__init__(window)
        self.recent = recent

    def score(self, obs: Observation) -> Tensor:
        acc = obs.state.get("h2o", obs.zeros()) + obs.attention_sum()
        obs.state["h2o"] = acc
        n_recent = int(obs.budget * self.recent)
        return torch.where(obs.positions >= obs.seen - n_recent, torch.inf, acc)
