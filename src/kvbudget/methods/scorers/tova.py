"""TOVA (Oren et al. 2024): keep what the last query attends to."""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("tova")
class TOVA(Scorer):
    """Attention from the last query only, averaged over the query heads of each KV head."""

    paper = "TOVA (Oren et al. 2024)"
    summary = "attention of the last query only"
    queries = 1

    def score(self, obs: Observation) -> Tensor:
        return obs.attention[:, :, -1]
