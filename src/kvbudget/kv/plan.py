"""Attention plans: what a cache layer's ``update`` tells the attention call that follows it.

transformers calls ``cache.update(k, v, layer)`` and then the attention function with the keys it
got back. A `BudgetedLayer` hands over, in an `AttentionPlan`, what the model's shared causal
mask cannot know: how many entries each KV head really holds, where the new tokens start and,
for a sliding-window layer, the positions of its entries. The attention hook (`kv.hook`) takes
the plan whose keys are the ones it is called with, masks with it and passes the queries back
to the layer.

Every plan must be taken by the attention call that follows its update: a plan left untaken
means the model's attention bypassed the hook, and the next plan (or `check_taken` after a
forward) raises `UnsupportedModelError` instead of attending with the model's own mask, which
is wrong once entries are evicted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import UnsupportedModelError

_local = threading.local()

# Padding slots of a sliding-window layer's mask get this position: outside every window.
NO_POSITION = -(2**30)


@dataclass
class AttentionPlan:
    """What one `BudgetedLayer.update` tells the attention call that follows it."""

    keys: Tensor  # the exact tensor update() returned: identity check against the call
    head_lens: Tensor | None  # [H] entries held per head before the new tokens; None = all equal
    n_old: int  # entries before the new tokens in the (padded) key tensor
    layer: Any  # the BudgetedLayer, which receives the queries
    # [H, n_old + q] bool: which key slots hold an entry (padding between a head's entries and
    # the new tokens does not), when the layer built it already; None: made from head_lens.
    visible: Tensor | None = None
    # A ragged layer's storage after the update, when it holds the new tokens: keys and values
    # [sum(lens), d] with head h's entries (its old ones, then the new tokens) contiguous, and
    # the per-head lengths on the host: the layout of varlen flash attention (`ragged_flash`).
    segments: tuple[Tensor, Tensor, tuple[int, ...]] | None = None
    # A sliding-window layer: its window, the positions of the old slots ([B, H, n_old], padding
    # at `NO_POSITION`) and the position of the first new token.
    window: int | None = None
    key_positions: Tensor | None = None
    start: int = 0

    def mask(self, q_len: int, n_query_heads: int) -> Tensor | None:
        """Boolean mask [1 or B, 1 or Hq, q, n_old + q]: True = may attend. None = everything visible."""
        if self.window is not None:
            return self._window_mask(q_len, n_query_heads)
        if self.head_lens is None and q_len == 1:
            return None
        if self.visible is not None:
            return self._ragged_mask(q_len, n_query_heads)
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

    def _window_mask(self, q_len: int, n_query_heads: int) -> Tensor:
        """`mask` of a sliding-window layer, by position: the query at position p sees the keys at
        p - window < pos <= p (padding lies at `NO_POSITION`, outside every window)."""
        old = self.key_positions.long()
        b, h = old.shape[:2]
        q_pos = self.start + torch.arange(q_len, device=old.device)
        k_pos = torch.cat([old, q_pos.expand(b, h, q_len)], dim=-1)[:, :, None, :]  # [B, H, 1, kv]
        allowed = (k_pos <= q_pos[:, None]) & (k_pos > q_pos[:, None] - self.window)  # [B, H, q, kv]
        g = n_query_heads // h
        return allowed[:, :, None].expand(b, h, g, *allowed.shape[2:]).reshape(b, h * g, *allowed.shape[2:])

    def _ragged_mask(self, q_len: int, n_query_heads: int) -> Tensor:
        """`mask` from ``visible``: slot c is seen by query i when it holds an entry and is not a
        later new token (c - n_old <= i; every old slot passes). Fewer ops than from head_lens:
        on a GPU each is a launch, per layer and block."""
        h, kv_len = self.visible.shape
        device = self.visible.device
        later = torch.arange(kv_len, device=device) - self.n_old
        causal = later[None, :] <= torch.arange(q_len, device=device)[:, None]  # [q, n_old + q]
        allowed = self.visible[:, None, :] & causal
        # Query heads of one group share their KV head (repeat_kv order: kv head j -> q heads j*g..).
        g = n_query_heads // h
        return allowed[:, None].expand(h, g, q_len, kv_len).reshape(1, h * g, q_len, kv_len)


@dataclass
class RowPlans:
    """Handed to the attention hook by a batch of caches, one per row (`kv.batch.BatchLayer`):
    each row's own plan, with the keys and values its layer's update returned. The hook attends
    row by row, each exactly as it would for that cache alone."""

    keys: Tensor  # the tensor the batch's update returned: identity check against the call
    rows: list[tuple[Any, Tensor, Tensor]]  # (plan, keys, values) of each row, in batch order
    lengths: list[int]  # each row's own new tokens: the first of the call's (right-padded) queries

    def attend_rows(self, query: Tensor, call) -> Tensor:
        """``call(query_row, keys, values)`` for each row with its plan set, over the row's own
        queries, concatenated over the batch (the layout attention functions return: ``[B, q,
        Hq, dv]``; a row's padding positions are zeros)."""
        q = query.shape[2]
        out = []
        for i, (plan, keys, values) in enumerate(self.rows):
            set_plan(plan)
            got = call(query[i : i + 1, :, : self.lengths[i]], keys, values)
            out.append(torch.nn.functional.pad(got, (0, 0, 0, 0, 0, q - self.lengths[i])) if self.lengths[i] < q else got)
        return torch.cat(out)


def set_plan(plan: AttentionPlan | None) -> None:
    """Called by a cache layer's ``update`` right before transformers calls the attention
    function. Raises `UnsupportedModelError` when the plan before it was never taken."""
    check_taken()
    _local.plan = plan


def check_taken() -> None:
    """Raise `UnsupportedModelError` when a plan is still waiting for the attention call that
    should have taken it (the model's attention does not go through kvbudget's hook)."""
    plan = getattr(_local, "plan", None)
    if plan is None:
        return
    _local.plan = None
    raise UnsupportedModelError(
        "the model's attention did not go through kvbudget's attention hook: evicted entries would "
        "be attended with the model's own mask. Attach the hook "
        "with kvbudget.attach(model) (kb.Session, kb.BudgetedCache(model) and policy.new_cache(model) "
        "do), and use a model whose attention goes through transformers' attention interface "
        "(sdpa or eager)"
    )


def discard_plan() -> None:
    """Forget a plan left by a forward pass that raised before its attention call."""
    _local.plan = None


def take_plan(key: Tensor) -> AttentionPlan | None:
    plan = getattr(_local, "plan", None)
    if plan is None or plan.keys is not key:
        return None
    _local.plan = None
    return plan



@dataclass(frozen=True)
class Extras:
    """What a model's attention adds to plain softmax attention, as the attention call passes it:
    logit softcapping (Gemma 2), one sink logit per query head (GPT-OSS). The static decode
    kernels apply them; eager paths leave them to the model's own attention function."""

    softcap: float | None = None
    sinks: Tensor | None = None  # [Hq]

    @classmethod
    def of(cls, kwargs: dict) -> "Extras":
        sinks = kwargs.get("s_aux", kwargs.get("sinks"))
        return cls(kwargs.get("softcap") or None, sinks)
