"""The one attention hook: where the budgeted cache meets the model.

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

Without a plan (an ordinary `DynamicCache`) it is a plain call of transformers' own sdpa/eager
attention with the model's mask: outputs are unchanged.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward as _sdpa

from .errors import UnsupportedModelError
from .transfer import to_device

_local = threading.local()

# Padding slots of a sliding-window layer's mask get this position: outside every window.
NO_POSITION = -(2**30)

IMPLEMENTATIONS = {"sdpa": "kvbudget_sdpa", "eager": "kvbudget_eager"}


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


def _take_plan(key: Tensor) -> AttentionPlan | None:
    plan = getattr(_local, "plan", None)
    if plan is None or plan.keys is not key:
        return None
    _local.plan = None
    return plan


LSE_MODES = ("auto", "off", "reference")


def lse_mode() -> str:
    """``KVBUDGET_ATTENTION_LSE`` (read at every call): auto | off | reference."""
    mode = os.environ.get("KVBUDGET_ATTENTION_LSE", "auto").strip().lower() or "auto"
    if mode not in LSE_MODES:
        raise ValueError(f"KVBUDGET_ATTENTION_LSE must be one of {', '.join(LSE_MODES)}, got '{mode}'")
    return mode


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, n_old: int, scale: float) -> tuple[Tensor, Tensor]:
    """Attention of ``q`` [B, Hq, M, d] over ``k``/``v`` [B, Hkv, n_old + M, d | dv] where every
    one of the first ``n_old`` keys is visible to every query and the last M (the queries' own
    tokens) causally: query i sees keys 0 .. n_old + i. The query heads of a group share their
    KV head (repeat_kv order). Returns the output [B, Hq, M, dv] in q's dtype and the row
    log-sum-exp of the scaled logits over the visible keys, [B, Hq, M] float32, natural log.

    The torch reference (materialised, float32 softmax): any device and dtype. On CUDA
    `flash_attention_with_lse` gives the same with flash attention."""
    b, hq, m, d = q.shape
    h, n = k.shape[1], k.shape[2]
    if n != n_old + m:
        raise ValueError(f"{n} keys for {n_old} old entries and {m} queries")
    qg = q.float().view(b, h, hq // h, m, d)
    logits = torch.einsum("bhgmd,bhnd->bhgmn", qg, k.float()) * scale
    visible = torch.arange(n, device=q.device)[None, :] <= torch.arange(m, device=q.device)[:, None] + n_old
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = logits.logsumexp(-1)
    p = (logits - lse[..., None]).exp()
    out = torch.einsum("bhgmn,bhnd->bhgmd", p, v.float())
    return out.reshape(b, hq, m, v.shape[-1]).to(q.dtype), lse.reshape(b, hq, m)


def flash_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, n_old: int, scale: float) -> tuple[Tensor, Tensor]:
    """`attention_with_lse` on CUDA (fp16/bf16, head_dim a multiple of 8, <= 256, d == dv,
    sm80+) through ``torch.ops.aten._flash_attention_forward``: the flash-attention-2 kernel that
    torch's SDPA dispatches to, called directly because SDPA drops the log-sum-exp it computes.

    Why this op: it takes fewer KV heads than query heads as they are (GQA, query head i reads KV
    head i // g, repeat_kv's order: nothing expanded), its ``is_causal`` is aligned bottom-right
    when M < N (query i sees keys up to N - M + i: every old entry plus causal inside the block,
    exactly the plan's mask of a dense layer; torch's CausalBias LOWER_RIGHT relies on the same),
    and it returns softmax_lse [B, Hq, M] float32 in natural log. Layout [B, M, H, d]: transposed
    views, only the last dimension must be contiguous."""
    m, n = q.shape[2], k.shape[2]
    if n != n_old + m:
        raise ValueError(f"{n} keys for {n_old} old entries and {m} queries")
    out, lse = torch.ops.aten._flash_attention_forward(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        None, None, m, n, 0.0, m > 1, False, scale=scale,
    )[:2]
    return out.transpose(1, 2), lse[..., :m]


def ragged_flash(query: Tensor, keys: Tensor, values: Tensor, lens: tuple[int, ...], scale: float,
                 op: Callable | None = None) -> Tensor:
    """Attention of a block of ``query`` [1, Hq, M, d] over a ragged layer's storage, ``keys`` /
    ``values`` [sum(lens), d] with KV head h's ``lens[h]`` entries contiguous, its last M the
    block's own tokens: each query sees every older entry of its head and the block causally.
    Varlen flash attention with one sequence per KV head (its g query heads as the heads of
    that sequence, one KV head): no padding and no [Hq, M, n] mask, which the SDPA path
    materialises. ``is_causal`` is aligned bottom-right per sequence, as for the dense block.
    Returns [1, M, Hq, d] contiguous, the layout attention functions return. ``op``: the varlen
    op (default ``torch.ops.aten._flash_attention_forward``; tests pass a torch reference)."""
    _, hq, m, d = query.shape
    h = len(lens)
    g = hq // h
    q = query[0].reshape(h, g, m, d).transpose(1, 2).reshape(h * m, g, d)  # sequence h: rows h*m ..
    starts = to_device(torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32), query.device)
    cu_q = torch.arange(0, (h + 1) * m, m, dtype=torch.int32, device=query.device)
    op = op or torch.ops.aten._flash_attention_forward
    out = op(q, keys[:, None], values[:, None], cu_q, starts, m, max(lens), 0.0, m > 1, False, scale=scale)[0]
    return out.view(h, m, g, d).transpose(0, 1).reshape(1, m, hq, d)


def _flash_fits(query: Tensor, key: Tensor, value: Tensor) -> bool:
    d = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and key.dtype == query.dtype and value.dtype == query.dtype
            and d % 8 == 0 and d <= 256 and value.shape[-1] == d
            and query.shape[1] % key.shape[1] == 0)


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
    elif _FLASH_BROKEN or not _flash_fits(query, key, value):
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
    if lse_mode() == "off" or _FLASH_BROKEN or not _flash_fits(query, key, value):
        return False
    return not _unsupported(kwargs)


def _unsupported(kwargs: dict) -> bool:
    """Whether the call asks for something the flash op does not do (dropout, softcapping, sinks,
    position bias, a sliding window)."""
    return bool(kwargs.get("dropout", 0.0)) or any(
        kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias", "sliding_window"))


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
        plan = _take_plan(key)
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
