"""Merge-on-evict (the peer's MergingPress), with Token Merging's size-weighted average (Bolya et
al. 2023, which MergingPress cites): an evicted entry is folded into its most similar kept one."""

import torch
import torch.nn.functional as F
from torch import Tensor

from ...compress import Observation
from ...compress.merger import Merger, evicted_rows, gather_rows, register_merger, scatter_rows


@register_merger("merge")
class MergeOnEvict(Merger):
    """Each evicted entry goes to the kept entry of its head whose key is most similar (cosine of
    the keys as cached, RoPE applied); the target's key and value become the size-weighted average
    of its own and those folded into it, an entry's size being 1 + the entries it has absorbed so
    far (per-entry state ``merged``, float32, counted in the bytes held). A merged entry keeps the
    target's position and the target's scorer state. An evicted entry whose best cosine is below
    ``threshold`` (0: the peer's default) is dropped, not merged.

    Differs from the peer's MergingPress, which keeps keys unchanged and blends only values with a
    weight cos x |v_e| / (|v_e| + |v_t|): here keys and values are averaged alike, by size, so an
    entry that stands for m + 1 tokens is their mean. Token Merging's proportional attention
    (log size added to a merged entry's logit) is not applied: the attention call is the model's."""

    paper = "kvpress MergingPress; ToMe (Bolya et al. 2023)"
    summary = "evicted entries averaged (K and V, by size) into their most key-similar kept entry"
    state_names = ("merged",)

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = threshold

    def merge(self, obs: Observation, kept: Tensor, evicted: Tensor) -> tuple[Tensor, Tensor]:
        size = obs.state.get("merged", obs.zeros()) + 1  # [B, H, n]
        rows, real = evicted_rows(evicted)  # [B, H, E]
        unit = F.normalize(obs.keys.float(), dim=-1)
        similarity = (gather_rows(unit, rows) @ unit.transpose(-1, -2)).masked_fill(~kept[:, :, None], -torch.inf)
        best, target = similarity.max(dim=-1)  # [B, H, E]: each evicted entry's kept entry
        weight = torch.where(real & (best >= self.threshold), size.gather(2, rows), 0.0)
        total = size.scatter_add(2, target, weight)
        received = (total > size)[..., None]
        obs.state["merged"] = total - 1

        def average(t: Tensor) -> Tensor:
            t32 = t.float()
            summed = scatter_rows(t32 * size[..., None], target, gather_rows(t32, rows) * weight[..., None])
            return torch.where(received, (summed / total[..., None]).to(t.dtype), t)

        return average(obs.keys), average(obs.values)
