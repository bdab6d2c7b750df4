"""StreamingLLM (Xiao et al. 2023): attention sinks + the most recent tokens."""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("streaming")
class Streaming(Scorer):
    """The first ``sinks`` tokens score highest, then tokens by recency."""

    paper = "StreamingLLM (Xiao et al. 2023)"
    summary = "first 4 sink tokens + most recent tokens; no attention needed"

    def __init__(self, window: int = 32, sinks: int = 4) -> None:
        super().__init__(window)
        self.sinks = sinks

    def score(self, obs: Observation) -> Tensor:
        pos = obs.positions.float()
        return pos.masked_fill(obs.positions < self.sinks, float(obs.seen + 1))
