"""Attention received by each cached entry, reduced over many queries, without the full matrix.

Scorers such as H2O, A2SF, KVzip and LazyEviction look at the attention of *every* query since
the last compression: with a 2048-token block over 4096 cached entries and 32 query heads the
float32 matrix is 1 GiB per layer, and building, masking and softmaxing it dominated prefill.
They only need a reduction over the query axis (a sum, a max, a per-query weighted sum), so:

- ``materialise``: the reference, the whole [B, H, g, m, n] matrix at once (float32).
- ``chunked`` (CPU, CUDA without triton, and few query rows without their log-sum-exp): the queries in chunks whose logits stay under
  `CHUNK_BYTES`; each chunk's softmax is exact (it spans every key), the reduction accumulates.
- ``triton`` (CUDA): `kvbudget.kernels.attn_scores`, two passes (row log-sum-exp, then the
  reduction), nothing of size m x n ever in memory; one pass when the caller already has the
  log-sum-exp (``lse``: the model's attention call returned it).

``auto`` (the default) picks triton on CUDA when it imports, unless there are few query rows
(`TRITON_MIN_ROWS`) and their log-sum-exp is not known; chunked otherwise. The environment
variable ``KVBUDGET_SCORING=materialise|chunked|triton|auto`` forces one (benchmarks compare
them); it is read at every call.

LazyEviction's per-query scan (`attention_lazy`) dispatches the same way: `lazy_scan` over query
chunks in torch, or the Triton reduction's "lazy" mode.

Semantics everywhere (those of `Observation.group_attention`): softmax(Q K^T * scaling) over the
cached entries, a key visible to a query when its position is <= the query's and it is valid;
a query that sees no key contributes 0. Reductions average the g query heads of each KV head
(``sum``) or take their max (``max``, as KVzip).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

# float32 logits of one query chunk (the softmax makes a second one). Decode-time compressions
# run here (SnapKV's 32 window queries over many stacked layers), so it bounds what an answer
# needs above the cache: on the 8B shape at 32k a SnapKV 2048 compression during an answer rose
# 0.53 GB above what the answer held with 256 MiB chunks, 0.35 GB with 64 (docs/benchmarks.md,
# "Memory during an answer").
CHUNK_BYTES = 64 * 2**20
BACKENDS = ("auto", "materialise", "chunked", "triton")
KPOS_NONE = 2**31 - 1  # position of a masked key: beyond every query


def key_positions(positions: Tensor, valid: Tensor | None) -> Tensor:
    """Key positions with padding moved beyond every query, so one comparison (key position <=
    query position) handles both causality and validity."""
    pos = positions.to(torch.int32)
    if valid is None:
        return pos
    return pos.masked_fill(~valid, KPOS_NONE)


def group_probs(queries: Tensor, keys: Tensor, kpos: Tensor, qpos: Tensor, scaling: float,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """softmax over the visible keys for the queries given: [B, H, g, m, n] float32. The QK^T
    product runs in ``dtype`` (float32 = the reference; the keys' half dtype on CUDA is faster,
    with its rounding of the logits)."""
    b, hq, m, d = queries.shape
    h = keys.shape[1]
    q = queries.to(dtype).view(b, h, hq // h, m, d)
    logits = torch.einsum("bhgmd,bhnd->bhgmn", q, keys.to(dtype)).float().mul_(scaling)
    future = kpos[:, :, None, None, :] > qpos.to(device=kpos.device, dtype=kpos.dtype)[None, None, None, :, None]
    # In place where it can be: at most two chunk-sized float32 tensors at once (logits, probs).
    # A query whose visible keys were all evicted earlier contributes nothing (not NaN).
    return logits.masked_fill_(future, float("-inf")).softmax(-1).nan_to_num_(0.0)


# Below this many query rows (batch x query heads x queries) the two-pass kernel's grid is too
# small to fill the GPU and one small materialised chunk is as fast: one layer of the 8B shape
# with SnapKV's window of 32 took 91 us either way on the H100 (docs/scoring.md). A
# group of stacked layers is far above it: SnapKV's window over 8 stacked layers, 8192 rows,
# took 0.13 ms of GPU time in the two passes (0.07 ms in pass 2 alone, given the LSE) against
# about 0.8 ms chunked (docs/scoring.md).
# With the rows' log-sum-exp known only pass 2 runs, one program per key tile and KV head,
# whatever the number of queries: the kernel then always.
TRITON_MIN_ROWS = 8192


def backend(keys: Tensor, rows: int | None = None, lse: bool = False) -> str:
    """The path a reduction takes for these keys and this many query ``rows`` (batch x query
    heads x queries; None: many), ``lse``: the rows' log-sum-exp is known (module docstring)."""
    forced = os.environ.get("KVBUDGET_SCORING", "auto").strip().lower() or "auto"
    if forced not in BACKENDS:
        raise ValueError(f"KVBUDGET_SCORING must be one of {', '.join(BACKENDS)}, got '{forced}'")
    if forced != "auto":
        return forced
    few = rows is not None and rows < TRITON_MIN_ROWS and not lse
    if keys.is_cuda and not few and keys.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_available():
        return "triton"
    return "chunked"


_TRITON: bool | None = None


def triton_available() -> bool:
    """Whether the Triton kernels import (triton installed and working)."""
    global _TRITON
    if _TRITON is None:
        try:
            from ..kernels import attn_scores  # noqa: F401
        except Exception:  # noqa: BLE001 - any import failure means: use the torch path
            _TRITON = False
        else:
            _TRITON = True
    return _TRITON


def chunk_size(b: int, hq: int, n: int, max_bytes: int | None = None) -> int:
    """Queries per chunk so that one chunk's float32 logits fit in ``max_bytes`` (default
    `CHUNK_BYTES`, read at each call)."""
    return max(1, (max_bytes or CHUNK_BYTES) // max(1, b * hq * n * 4))


def attention_chunks(queries: Tensor, keys: Tensor, kpos: Tensor, qpos: Tensor, scaling: float,
                     chunk: int | None = None, mean: bool = True) -> Iterator[tuple[int, Tensor]]:
    """(start, probabilities) per query chunk: [B, H, mc, n] averaged over the query heads of each
    KV head (``mean``), else [B, H, g, mc, n]. On CUDA the product runs in the keys' dtype."""
    b, hq, m, _ = queries.shape
    n = keys.shape[2]
    dtype = keys.dtype if keys.is_cuda and keys.dtype in (torch.float16, torch.bfloat16) else torch.float32
    step = chunk or chunk_size(b, hq, n)
    for start in range(0, m, step):
        p = group_probs(queries[:, :, start : start + step], keys, kpos, qpos[start : start + step], scaling, dtype)
        yield start, (p.mean(2) if mean else p)


Queries = Tensor | Sequence[Tensor]  # [B, Hq, m, d], or parts of it along the batch (stacked layers)


def joined(queries: Queries) -> Tensor:
    """The queries as one tensor (parts concatenated along the batch: the torch paths)."""
    return queries if isinstance(queries, Tensor) else torch.cat(list(queries))


def query_rows(queries: Queries) -> int:
    """Batch x query heads x queries of ``queries`` (one tensor or parts along the batch)."""
    if isinstance(queries, Tensor):
        return queries.shape[0] * queries.shape[1] * queries.shape[2]
    return sum(q.shape[0] * q.shape[1] * q.shape[2] for q in queries)


def _prepare(queries: Queries, keys: Tensor, positions: Tensor, valid: Tensor | None,
             query_positions: Tensor, path: str | None, lse: Tensor | None) -> tuple[Tensor, Tensor, str]:
    """What every reduction starts from: key positions (padding beyond every query), query
    positions on the keys' device, and the path (``path``, else `backend`'s choice)."""
    path = path or backend(keys, query_rows(queries), lse is not None)
    return key_positions(positions, valid), query_positions.to(keys.device), path


def attention_reduce(queries: Queries, keys: Tensor, positions: Tensor, valid: Tensor | None,
                     query_positions: Tensor, scaling: float, mode: str = "sum",
                     weights: Tensor | None = None, path: str | None = None,
                     chunk: int | None = None, lse: Tensor | None = None) -> Tensor:
    """Attention each entry receives, reduced over the queries: [B, H, n] float32.

    ``mode`` "sum": sum over queries (each times ``weights[i]`` when given, [m]) of the mean over
    the g query heads of each KV head; "max": the max over queries and query heads. ``path``
    overrides `backend`; ``chunk`` the queries per chunk of the chunked path. ``lse`` ([B, Hq, m]
    float32, natural log): each query's log-sum-exp over exactly its visible keys, known already
    (the model's attention call computed it); the triton path then skips its first pass, the
    torch paths ignore it (their softmax is exact anyway). ``queries`` may come as parts along
    the batch (stacked layers' queries): the triton path reads them where they lie, the torch
    paths concatenate them.
    """
    if mode not in ("sum", "max"):
        raise ValueError(f"mode must be 'sum' or 'max', got '{mode}'")
    if weights is not None and mode != "sum":
        raise ValueError("weights only apply to mode 'sum'")
    kpos, qpos, path = _prepare(queries, keys, positions, valid, query_positions, path, lse)
    if path == "triton":
        from ..kernels.attn_scores import attention_reduce as triton_reduce

        return triton_reduce(queries, keys, kpos, qpos, scaling, mode, weights, lse=lse)
    queries = joined(queries)
    if path == "materialise":
        p = group_probs(queries, keys, kpos, qpos, scaling)
        if mode == "max":
            return p.amax(dim=(2, 3))
        p = p.mean(2)
        return (p if weights is None else p * weights.to(p)[:, None]).sum(2)
    out = torch.zeros(positions.shape, dtype=torch.float32, device=keys.device)
    for start, p in attention_chunks(queries, keys, kpos, qpos, scaling, chunk, mean=mode == "sum"):
        if mode == "max":
            torch.maximum(out, p.amax(dim=(2, 3)), out=out)
        elif weights is None:
            out += p.sum(2)
        else:
            w = weights[start : start + p.shape[2]].to(p)
            out += (p * w[:, None]).sum(2)
    return out


def lazy_scan(chunks: Iterable[tuple[int, Tensor]], positions: Tensor, valid: Tensor | None,
              query_positions: Tensor, last: Tensor, gap: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LazyEviction's scan in torch (the reference; the CPU path), over ``chunks`` of the
    attention averaged over each group's query heads ((first query, [B, H, mc, n]), in query
    order: `attention_chunks`). Query i finds entry j important when its attention exceeds the
    uniform share 1 / (entries query i sees). Scanning the queries in order, at each important
    (i, j): ``gap[j]`` = max(gap[j], qpos_i - last[j]), then ``last[j]`` = max(last[j], qpos_i).
    ``last`` and ``gap`` [B, H, n] float32 come in holding the state so far. Returns (received:
    the attention each entry received, summed over the queries; last; gap), each [B, H, n]."""
    pos = positions.float()
    qpos_all = query_positions.to(positions.device).float()
    received = torch.zeros(positions.shape, dtype=torch.float32, device=last.device)
    # `last` carries the latest important moment from one chunk to the next, so the scan equals
    # one over all queries.
    for start, attn in chunks:  # [B, H, mc, n]
        qpos = qpos_all[start : start + attn.shape[2]][None, None, :, None]
        visible = pos[:, :, None, :] <= qpos
        if valid is not None:
            visible = visible & valid[:, :, None, :]
        important = attn > 1.0 / visible.sum(-1, keepdim=True).clamp(min=1)
        events = torch.where(important, qpos, torch.tensor(float("-inf"), device=attn.device))
        previous = torch.cat([last[:, :, None], events], dim=2).cummax(dim=2).values
        gaps = torch.where(important, qpos - previous[:, :, :-1], 0.0)
        gap = torch.maximum(gap, gaps.amax(dim=2))
        last = previous[:, :, -1]
        received += attn.sum(dim=2)
    return received, last, gap


def attention_lazy(queries: Queries, keys: Tensor, positions: Tensor, valid: Tensor | None,
                   query_positions: Tensor, scaling: float, last: Tensor, gap: Tensor,
                   path: str | None = None, chunk: int | None = None,
                   lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`lazy_scan` over the attention of ``queries``, without the [m, n] matrix: (received, last,
    gap), [B, H, n] float32. Triton on CUDA (`kvbudget.kernels.attn_scores.attention_lazy`),
    query chunks elsewhere; ``path``, ``chunk`` and ``lse`` as in `attention_reduce`."""
    kpos, qpos, path = _prepare(queries, keys, positions, valid, query_positions, path, lse)
    if path == "triton":
        from ..kernels.attn_scores import attention_lazy as triton_lazy

        return triton_lazy(queries, keys, kpos, qpos, scaling, last, gap, lse=lse)
    queries = joined(queries)
    if path == "materialise":
        chunk = queries.shape[2]
    return lazy_scan(attention_chunks(queries, keys, kpos, qpos, scaling, chunk), positions, valid, qpos, last, gap)
