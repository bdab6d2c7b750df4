"""KeyDiff (Park et al. 2025): keep the most distinctive keys; attention-free."""

import torch.nn.functional as F
from torch import Tensor

from ...compress import Observation, Scorer, register


@register("keydiff")
class KeyDiff(Scorer):
    """Negative cosine similarity between each key and the mean key of its head."""

    paper = "KeyDiff (Park et al. 2025)"
    summary = "attention-free: keys least similar to the head's mean key"
    stackable_padded = False  # a mean over entries: padding would change its rounding

    def score(self, obs: Observation) -> Tensor:
        keys = obs.keys.float()
        if obs.valid is None:
            mean = keys.mean(dim=2, keepdim=True)
        else:
            w = obs.valid[..., None].float()
            mean = (keys * w).sum(2, keepdim=True) / w.sum(2, keepdim=True)
        return -F.cosine_similarity(keys, mean, dim=-1)
