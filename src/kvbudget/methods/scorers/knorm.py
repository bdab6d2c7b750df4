"""Key norm (Devoto et al. 2024): keys with a small L2 norm draw the most attention."""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("knorm")
class KeyNorm(Scorer):
    """Lowest key L2 norm kept first; attention-free."""

    paper = "Devoto et al. 2024"
    summary = "attention-free: lowest key L2 norm kept"

    def score(self, obs: Observation) -> Tensor:
        return -obs.keys.float().norm(dim=-1)
