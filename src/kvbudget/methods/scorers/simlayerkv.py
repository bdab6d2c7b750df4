"""SimLayerKV (Zhang et al. 2024, "SimLayerKV: A Simple Framework for Layer-Level KV Cache
Reduction"): some layers are *lazy*: their last tokens attend almost only to the initial and the
most recent tokens; such a layer keeps only those.

At each compression a layer is lazy when the last ``last`` (1) queries, averaged over its heads,
put more than ``threshold`` (0.9, the paper's value for Llama-3 models) of their attention on the
first ``sinks`` (4) positions and on the entries a lazy layer would keep besides them, the most
recent budget - sinks. A lazy layer then scores sinks highest and the rest by recency
(StreamingLLM's choice); any other layer scores as SnapKV does (window attention, pooled).

Memory: every layer holds its budget. In the paper a lazy layer holds only its sinks and a fixed
recent window (1024) while the others keep the full cache; freeing the lazy layers' surplus for
the others needs layer budgets decided at compression time from the scorer's verdict, which the
allocators (fixed before scoring) cannot express.
"""

import torch
from torch import Tensor

from ...compress import Observation, register
from ...errors import KVBudgetError
from .snapkv import SnapKV


@register("simlayerkv")
class SimLayerKV(SnapKV):
    paper = "SimLayerKV (Zhang et al. 2024)"
    summary = "lazy layers (last query >90% on sinks + recent) keep sinks + recent, others SnapKV"
    stackable_padded = False  # reads the layer's budget

    def __init__(self, window: int = 32, threshold: float = 0.9, last: int = 1, sinks: int = 4) -> None:
        super().__init__(window)
        if not 0 <= threshold <= 1 or last < 1:
            raise KVBudgetError(f"simlayerkv: need 0 <= threshold <= 1 and last >= 1, got {threshold}, {last}")
        self.queries = max(window, last)
        self.threshold, self.last, self.sinks = threshold, last, sinks

    def lazy(self, obs: Observation) -> Tensor:
        """[B] bool: whether each layer (batch row) is lazy now."""
        recent = obs.positions >= obs.seen - max(obs.budget - self.sinks, 0)
        kept = (obs.positions >= 0) & ((obs.positions < self.sinks) | recent)
        if obs.valid is not None:
            kept = kept & obs.valid
        mass = (obs.attention[:, :, -self.last :] * kept[:, :, None]).sum(-1)  # [B, H, last]
        return mass.mean(dim=(1, 2)) > self.threshold

    def score(self, obs: Observation) -> Tensor:
        streaming = obs.positions.float().masked_fill(obs.positions < self.sinks, float(obs.seen + 1))
        return torch.where(self.lazy(obs)[:, None, None], streaming, super().score(obs))
