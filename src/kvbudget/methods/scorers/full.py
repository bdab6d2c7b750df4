"""The reference row of every table: keep everything."""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("full")
class Full(Scorer):
    """Keeps every entry; the cache grows with the context like transformers' DynamicCache."""

    paper = "-"
    summary = "keeps everything (reference)"
    saves = "nothing"
    evicts = False

    def score(self, obs: Observation) -> Tensor:
        return obs.zeros()
