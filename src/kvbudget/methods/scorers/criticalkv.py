"""CriticalKV (Feng et al. 2025, "Identify Critical KV Cache in LLM Inference from an Output
Perturbation Perspective"): an entry matters as much as removing it perturbs the attention
output, which depends on its value as projected by the head's output matrix, not only on the
attention it receives.

Two stages over a base scorer's attention scores (window attention, SnapKV's, by default):

1. the best ``first_stage`` share of the budget (half) is chosen by the base scores alone;
2. the other entries are ranked by (score + eps) * ||W_o^h v||_1, the L1 norm of the value
   projected through the output projection of each query head h of the group (mean over the
   group).

``criticaladakv`` (= ``criticalkv+head-adaptive``) lets the heads of a layer share its budget as
Ada-KV does. Difference from the paper's CriticalAdaKV: there, stage 1 takes half of each head's
*adaptive* budget; here half of the uniform share per head, then Ada-KV's top-k over the layer.

The output projection: a scorer sees no model weights (`Observation` has none), so until the
observation carries the layer's ``o_proj.weight`` stage 2 weighs by ||v||_1 (W_o taken as the
identity). `projected_norms` computes the paper's form when the weight is given.
"""

import torch
from torch import Tensor

from ...compress import PRESETS, SCORERS, Observation, Scorer, register
from ...errors import KVBudgetError, UnknownPolicyError


def projected_norms(values: Tensor, out_proj: Tensor | None) -> Tensor:
    """||W_o^h v||_1 per entry, averaged over the query heads h of each KV head: [B, H, n].
    ``values`` [B, H, n, dv]; ``out_proj`` the layer's output projection weight [hidden, Hq * dv]
    (nn.Linear layout: column block h belongs to query head h), or None for ||v||_1."""
    v = values.float()
    if out_proj is None:
        return v.abs().sum(-1)
    b, h, n, dv = v.shape
    w = out_proj.float().view(out_proj.shape[0], -1, dv).permute(1, 2, 0)  # [Hq, dv, hidden]
    w = w.view(h, -1, dv, w.shape[-1])  # [H, g, dv, hidden]: query heads grouped by KV head
    return torch.einsum("bhnd,hgde->bhgne", v, w).abs().sum(-1).mean(2)


@register("criticalkv")
class CriticalKV(Scorer):
    paper = "CriticalKV (Feng et al. 2025)"
    summary = "two stages: half the budget by window attention, the rest by attention x |v|_1 (W_o: not exposed yet)"
    reads_values = True
    stackable_padded = False  # stage 1 reads the layer's budget

    def __init__(self, window: int = 32, base: str = "snapkv", first_stage: float = 0.5, eps: float = 1e-4) -> None:
        super().__init__(window)
        if base not in SCORERS or base in ("criticalkv", "full"):
            raise UnknownPolicyError(f"criticalkv: unknown base scorer '{base}'")
        if not 0 <= first_stage <= 1:
            raise KVBudgetError(f"criticalkv: first_stage must be in [0, 1], got {first_stage}")
        self.base = SCORERS[base](window=window)
        self.queries, self.state_names = self.base.queries, self.base.state_names
        self.position_state = self.base.position_state
        self.stackable = self.base.stackable
        self.first_stage, self.eps = first_stage, eps

    def reconstruction_ids(self, fed: Tensor, tokenizer) -> Tensor | None:
        return self.base.reconstruction_ids(fed, tokenizer)

    def score(self, obs: Observation) -> Tensor:
        scores = self.base.score(obs).float()
        if obs.valid is not None:
            scores = scores.masked_fill(~obs.valid, float("-inf"))
        # Stage 1: the protected window is kept anyway; the first stage chooses among the rest.
        protected = min(self.window, obs.budget // 2)
        first = min(int(self.first_stage * (obs.budget - protected)), scores.shape[-1])
        free = scores.masked_fill(obs.positions >= obs.seen - protected, float("-inf"))
        chosen = free.topk(first, dim=-1).indices
        # Stage 2: the rest by attention x ||W_o v||_1; stage-1 entries above all of them.
        # W_o: None until the observation carries the layer's output projection (module docstring).
        weighted = (scores + self.eps) * projected_norms(obs.values, None)
        return weighted.scatter(-1, chosen, float("inf"))


PRESETS["criticaladakv"] = ("criticalkv", {"allocator": "head-adaptive"})
