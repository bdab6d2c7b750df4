"""SnapKV (Li et al. 2024); PyramidKV (Cai et al. 2024) = SnapKV scores + pyramid allocator;
Ada-KV (Feng et al. 2024) = SnapKV scores + head-adaptive allocation."""

import torch.nn.functional as F
from torch import Tensor

from ...compress import PRESETS, Observation, Scorer, register


@register("snapkv")
class SnapKV(Scorer):
    """Attention from the observation window, summed over its queries, then max-pooled along tokens
    (kernel 7) so that kept tokens come in small clusters."""

    paper = "SnapKV (Li et al. 2024)"
    summary = "window attention, summed over the window, 1-D max-pooled (kernel 7)"

    def __init__(self, window: int = 32, kernel: int = 7) -> None:
        super().__init__(window)
        self.queries = window
        self.kernel = kernel

    def score(self, obs: Observation) -> Tensor:
        scores = obs.attention_sum()  # [B, H, n]
        if obs.valid is not None:
            # Padding (at the end of a row) pools as -inf, like the pool's own edge, so no real
            # entry sees it: the same scores as the row alone (attention there is 0 anyway).
            scores = scores.masked_fill(~obs.valid, float("-inf"))
        b, h, n = scores.shape
        pooled = F.max_pool1d(scores.view(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(b, h, n)


PRESETS["pyramidkv"] = ("snapkv", {"allocator": "pyramid"})
PRESETS["adakv"] = ("snapkv", {"allocator": "head-adaptive"})
