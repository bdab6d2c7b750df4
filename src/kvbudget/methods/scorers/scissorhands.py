"""Scissorhands (Liu et al. 2023): persistence of importance."""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("scissorhands")
class Scissorhands(Scorer):
    """Over a history window of recent queries, count how often each token's attention exceeds the
    uniform share 1/n of the query that sees n tokens; the most often important tokens stay."""

    paper = "Scissorhands (Liu et al. 2023)"
    summary = "how often a token's attention beat uniform in a history window of queries"

    def __init__(self, window: int = 32, history: int = 32) -> None:
        super().__init__(window)
        self.queries = history

    def score(self, obs: Observation) -> Tensor:
        attn = obs.attention  # [B, H, m, n]
        visible = obs.positions[:, :, None, :] <= obs.query_positions.to(obs.positions)[None, None, :, None]
        if obs.valid is not None:
            visible = visible & obs.valid[:, :, None, :]
        uniform = 1.0 / visible.sum(-1, keepdim=True).clamp(min=1)
        counts = (attn > uniform).sum(dim=2).float()
        # Equal counts are common: the mean attention breaks ties without outweighing one count.
        return counts + attn.mean(dim=2)
