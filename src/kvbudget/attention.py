"""The one attention hook: where the budgeted cache meets the model.

transformers calls ``cache.update(k, v, layer)`` and then the attention function with the keys it
got back. A `BudgetedLayer` hands over, through `set_plan`, what the model's shared causal mask
cannot know: how many entries each KV head really holds (heads and layers may hold different
numbers once entries are evicted) and where the new tokens start. The hook then

1. builds the right mask for that layer (kept entries visible, causal inside the new tokens,
   per-head padding hidden), and
2. hands the query states of the tokens just processed (after RoPE) to the layer, which keeps the
   few that its policy's scorer asked for (`BudgetedLayer.observe`).

Without a plan (ordinary `DynamicCache`, sliding-window layers of hybrid models) it is a plain
call of transformers' own sdpa/eager attention with the model's mask: outputs are unchanged.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa

_local = threading.local()

IMPLEMENTATIONS = {"sdpa": "kvbudget_sdpa", "eager": "kvbudget_eager"}


@dataclass
class AttentionPlan:
    """What one `BudgetedLayer.update` tells the attention call that follows it."""

    keys: Tensor  # the exact tensor update() returned: identity check against the call
    head_lens: Tensor | None  # [H] entries held per head before the new tokens; None = all equal
    n_old: int  # entries before the new tokens in the (padded) key tensor
    layer: Any  # the BudgetedLayer, which receives the queries

    def mask(self, q_len: int, n_query_heads: int) -> Tensor | None:
        """Boolean mask [1, 1 or Hq, q, n_old + q]: True = may attend. None = everything visible."""
        if self.head_lens is None and q_len == 1:
            return None
        device = self.keys.device
        kv_len = self.n_old + q_len
        new = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        if self.head_lens is None:
            old = torch.ones(q_len, self.n_old, dtype=torch.bool, device=device)
            return torch.cat([old, new], dim=1).view(1, 1, q_len, kv_len)
        n_heads = self.head_lens.shape[0]
        old = torch.arange(self.n_old, device=device)[None, :] < self.head_lens.to(device)[:, None]
        old = old[:, None, :].expand(n_heads, q_len, self.n_old)
        full = torch.cat([old, new.expand(n_heads, q_len, q_len)], dim=2)
        # Query heads of one group share their KV head (repeat_kv order: kv head j -> q heads j*g..).
        return full.repeat_interleave(n_query_heads // n_heads, dim=0).unsqueeze(0)


def set_plan(plan: AttentionPlan | None) -> None:
    """Called by `BudgetedLayer.update` right before transformers calls the attention function."""
    _local.plan = plan


def _take_plan(key: Tensor) -> AttentionPlan | None:
    plan = getattr(_local, "plan", None)
    if plan is None or plan.keys is not key:
        return None
    _local.plan = None
    return plan


def _eager(module, query, key, value, attention_mask, **kwargs):
    # Each model file has its own eager function (softcapping, sinks...): use the model's.
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        neg = torch.finfo(query.dtype).min
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~attention_mask, neg
        )
    return fn(module, query, key, value, attention_mask, **kwargs)


def _make(base: Callable) -> Callable:
    def kvbudget_attention(module, query, key, value, attention_mask, **kwargs):
        plan = _take_plan(key)
        if hasattr(plan, "attend"):  # static decoding (kvbudget.static): the kernel masks by length
            return plan.attend(query, kwargs.get("scaling", getattr(module, "scaling", None))), None
        if plan is not None:
            attention_mask = plan.mask(query.shape[2], query.shape[1])
            plan.layer.observe(query, kwargs.get("scaling", getattr(module, "scaling", None)))
        return base(module, query, key, value, attention_mask, **kwargs)

    return kvbudget_attention


_registered = False


def register() -> None:
    """Register the hooked implementations with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(IMPLEMENTATIONS["sdpa"], _make(_sdpa))
    AttentionInterface.register(IMPLEMENTATIONS["eager"], _make(_eager))
    # Hybrid models still need the model's own masks for layers without a plan (sliding windows).
    AttentionMaskInterface.register(IMPLEMENTATIONS["sdpa"], sdpa_mask)
    AttentionMaskInterface.register(IMPLEMENTATIONS["eager"], eager_mask)
    _registered = True


def attach(model) -> None:
    """Switch ``model`` to the hooked version of its attention (sdpa or eager). Idempotent."""
    register()
    current = model.config._attn_implementation
    if current in IMPLEMENTATIONS.values():
        return
    if current not in IMPLEMENTATIONS:
        raise ValueError(
            f"kvbudget supports sdpa or eager attention, the model uses '{current}': "
            "load it with attn_implementation='sdpa'"
        )
    model.set_attn_implementation(IMPLEMENTATIONS[current])
