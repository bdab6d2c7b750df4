"""Attention that also returns each query's log-sum-exp, and varlen attention over ragged heads.

`attention_with_lse` is the torch reference (materialised, float32 softmax; any device);
`flash_attention_with_lse` and `ragged_flash` call the flash-attention-2 kernel that torch's SDPA
dispatches to on CUDA, directly, because SDPA drops the log-sum-exp it computes and takes no
per-sequence lengths.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor

from ..transfer import to_device


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


def flash_fits(query: Tensor, key: Tensor, value: Tensor) -> bool:
    d = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and key.dtype == query.dtype and value.dtype == query.dtype
            and d % 8 == 0 and d <= 256 and value.shape[-1] == d
            and query.shape[1] % key.shape[1] == 0)
