"""The one attention hook: where the budgeted cache meets the model (`kv.plan` holds the plans).

transformers calls ``cache.update(k, v, layer)`` and then the attention function with the keys it
got back. A `BudgetedLayer` hands over, through `set_plan`, what the model's shared causal mask
cannot know: how many entries each KV head really holds (heads and layers may hold different
numbers once entries are evicted) and where the new tokens start. The hook then

1. builds the right mask for that layer (kept entries visible, causal inside the new tokens,
   per-head padding hidden), and
2. hands the query states of the tokens just processed (after RoPE) to the layer, which keeps the
   few that its policy's scorer asked for (`BudgetedLayer.observe`).

When the layer keeps *every* query (accumulating scorers: H2O, A2SF) and is dense, the hook can
also hand over each query's log-sum-exp over the keys it attended to: the attention call then
runs through an op that returns it (`attend_with_lse`), and the scoring kernel skips its own
first pass over the same queries and keys (docs/scoring.md, "Reusing the model's log-sum-exp").
``KVBUDGET_ATTENTION_LSE`` chooses: ``auto`` (default: on CUDA in fp16/bf16, flash attention),
``off``, or ``reference`` (the materialised `attention_with_lse` on any device: tests). Under
``auto`` every multi-token block over a dense layer takes the flash call, LSE wanted or not: it
is also faster than SDPA with the plan's materialised mask.

A sliding-window layer's plan also carries the positions of its entries: its mask lets a query
at position p see the entries at positions p - window < pos <= p (transformers' sliding window,
by position, so it stays right after eviction), and such a block always takes the masked path.

Every plan must be taken by the attention call that follows its update: a plan left untaken
means the model's attention bypassed the hook (another attention implementation, or a model
that does not call attention through transformers' interface), and the next plan raises
`UnsupportedModelError` naming the layer, instead of attending with the model's own mask, which
is wrong once entries are evicted.

Sessions decoded together in one forward (`kv.batch`) hand over one plan per row (`RowPlans`):
the hook attends each row with its own plan, as in a forward of that session alone.

Without a plan (an ordinary `DynamicCache`) it is a plain call of transformers' own sdpa/eager
attention with the model's mask: outputs are unchanged.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa

from ..errors import UnsupportedModelError
from ..kernels.flash import attention_with_lse, flash_attention_with_lse, flash_fits, ragged_flash
from .plan import AttentionPlan, Extras, RowPlans, take_plan

IMPLEMENTATIONS = {"sdpa": "kvbudget_sdpa", "eager": "kvbudget_eager"}

LSE_MODES = ("auto", "off", "reference")


def lse_mode() -> str:
    """``KVBUDGET_ATTENTION_LSE`` (read at every call): auto | off | reference."""
    mode = os.environ.get("KVBUDGET_ATTENTION_LSE", "auto").strip().lower() or "auto"
    if mode not in LSE_MODES:
        raise ValueError(f"KVBUDGET_ATTENTION_LSE must be one of {', '.join(LSE_MODES)}, got '{mode}'")
    return mode


_FLASH_BROKEN = False  # set at the first failure of the op: every later call takes the old path


def attend_with_lse(plan: AttentionPlan, query: Tensor, key: Tensor, value: Tensor, scaling: float | None,
                    kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """The plan's attention and each query's log-sum-exp, or None where this cannot be done (then
    the caller takes the ordinary path and observes no LSE): ``KVBUDGET_ATTENTION_LSE=off``, a
    layer whose heads hold different numbers of entries (its mask is not a plain bottom-right
    causal one), features the op does not have (dropout, softcapping, sinks, position bias), or
    no fast op for these tensors (CPU, float32) in ``auto``. Returns (output [B, M, Hq, dv]
    contiguous, the layout attention functions return; lse [B, Hq, M] float32 natural log)."""
    global _FLASH_BROKEN
    mode = lse_mode()
    if mode == "off" or plan.head_lens is not None:
        return None
    if _unsupported(kwargs):
        return None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if mode == "reference":
        fn = attention_with_lse
    elif _FLASH_BROKEN or not flash_fits(query, key, value):
        return None
    else:
        fn = flash_attention_with_lse
    try:
        out, lse = fn(query, key, value, plan.n_old, scale)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:  # op missing or refusing
        if fn is attention_with_lse:
            raise
        _FLASH_BROKEN = True
        warnings.warn(f"kvbudget: flash attention with log-sum-exp unavailable ({exc}); "
                      "scoring computes its own", RuntimeWarning, stacklevel=2)
        return None
    return out.transpose(1, 2).contiguous(), lse


def _flash_allowed(query: Tensor, key: Tensor, value: Tensor, kwargs: dict) -> bool:
    """Whether the flash op may stand in for the model's attention here: ``KVBUDGET_ATTENTION_LSE``
    not off, no feature the op lacks, tensors it takes, and the op not found broken."""
    if lse_mode() == "off" or _FLASH_BROKEN or not flash_fits(query, key, value):
        return False
    return not _unsupported(kwargs)


def _unsupported(kwargs: dict) -> bool:
    """Whether the call asks for something the flash op does not do (dropout, softcapping, sinks,
    position bias, a sliding window)."""
    return bool(kwargs.get("dropout", 0.0)) or any(
        kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias", "sliding_window"))


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


def _make(base: Callable, with_lse: bool = False) -> Callable:
    """The hooked attention over ``base``. ``with_lse``: the base computes plain softmax attention
    (sdpa), so the op of `attend_with_lse` may stand in for it; the eager functions of some models
    add softcapping or sinks, which it does not."""

    def kvbudget_attention(module, query, key, value, attention_mask, **kwargs):
        plan = take_plan(key)
        if isinstance(plan, RowPlans):  # sessions decoded together (kv.batch): each row as if alone
            return plan.attend_rows(query, lambda q, k, v: kvbudget_attention(module, q, k, v, None, **kwargs)[0]), None
        scaling = kwargs.get("scaling", getattr(module, "scaling", None))
        if hasattr(plan, "attend"):  # static decoding (kvbudget.static): the kernel masks by length
            return plan.attend(query, scaling, Extras.of(kwargs)), None
        if plan is not None and plan.window is None:
            wants = plan.layer.wants_lse()
            # A block of new tokens over a dense layer goes through flash attention even when its
            # scorer does not want the LSE: measured on the H100 it is 1.4-2x faster than SDPA with
            # the plan's materialised mask (docs/benchmarks.md, table 4). One token: the SDPA path.
            if with_lse and plan.segments is not None and query.shape[2] > 1 and _flash_allowed(query, key, value, kwargs):
                # A block over a ragged layer (Ada-KV): varlen flash over its storage. No LSE
                # (this op returns it per packed row): a scorer that wants it computes its own.
                out = ragged_flash(query, *plan.segments, scaling if scaling is not None else query.shape[-1] ** -0.5)
                plan.layer.observe(query, scaling)
                return out, None
            if with_lse and (wants or query.shape[2] > 1):
                got = attend_with_lse(plan, query, key, value, scaling, kwargs)
                if got is not None:
                    plan.layer.observe(query, scaling, lse=got[1] if wants else None)
                    return got[0], None
        if plan is not None:
            attention_mask = plan.mask(query.shape[2], query.shape[1])
            plan.layer.observe(query, scaling)
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

    AttentionInterface.register(IMPLEMENTATIONS["sdpa"], _make(_sdpa, with_lse=True))
    AttentionInterface.register(IMPLEMENTATIONS["eager"], _make(_eager))
    # Hybrid models still need the model's own masks for layers without a plan (sliding windows).
    AttentionMaskInterface.register(IMPLEMENTATIONS["sdpa"], sdpa_mask)
    AttentionMaskInterface.register(IMPLEMENTATIONS["eager"], eager_mask)
    _registered = True


# Implementations whose attention is plain softmax attention: the hooked sdpa stands in for them
# (on CUDA its blocks run through flash attention anyway).
_AS_SDPA = ("flash_attention_2", "flash_attention_3", "flex_attention")


def attach(model) -> None:
    """Switch ``model`` to the hooked version of its attention (sdpa or eager; a flash or flex
    implementation becomes the hooked sdpa). Idempotent; outputs are unchanged for any cache but
    kvbudget's."""
    register()
    current = model.config._attn_implementation
    if current in IMPLEMENTATIONS.values():
        return
    if current in _AS_SDPA:
        current = "sdpa"
    if current not in IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"kvbudget hooks sdpa or eager attention, the model uses '{current}': "
            "load it with attn_implementation='sdpa'"
        )
    model.set_attn_implementation(IMPLEMENTATIONS[current])
