"""Triton kernels: attention received by each cached entry, reduced over the queries, without
ever holding the [m, n] attention matrix.

Two passes, both on tensor cores (bf16/fp16 operands, fp32 accumulation; fp32 operands use
IEEE fp32 dots so float32 models keep float32 accuracy):

1. `_lse_kernel`, one program per (query tile, batch x query head): streams the key tiles and
   keeps each query row's running max and sum of exp (online softmax), giving the row's
   log-sum-exp over its *visible* keys (base 2). A row that sees nothing gets -inf.
2. `_reduce_kernel`, one program per (key tile, batch x KV head): loads the key tile once, loops
   over query tiles and, inside, over the g query heads of the group, recomputes the logits and
   p = exp2(logit - lse) and folds p into a [BLOCK_N] accumulator: sum (optionally weighted per
   query) or max. Writes [B, H, n] float32. Mode "lazy" (LazyEviction, `attention_lazy`) sums
   like "sum" and, as the query tiles come in order, also runs the scorer's per-query scan:
   which queries found each key important, when last, and the longest interval between two.

A caller that already knows each row's log-sum-exp (the model's own attention call over the same
queries and keys returned it) passes it as ``lse`` and pass 1 is skipped.

Visibility is "key position <= query position": the caller gives masked keys (padding) a
position no query reaches, so one comparison handles causality and validity. Invisible pairs
contribute exactly 0 (the reference's ``nan_to_num`` of fully masked rows).

Only this module imports triton; `kvbudget.scoring` imports it lazily on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..transfer import to_device

LOG2E = 1.4426950408889634
Queries = Tensor | Sequence[Tensor]  # one tensor, or parts of it along the batch (stacked layers)
MODES = {"sum": 0, "max": 1, "lazy": 2}
# Masked keys get this position (no query position reaches it); rows beyond m get QPOS_NONE.
# constexpr: compiled kernels may only read globals that are.
KPOS_NONE = tl.constexpr(2**31 - 1)
QOFF_ALIGN = tl.constexpr(16)  # query parts start a multiple of this many elements apart
QPOS_NONE = tl.constexpr(-(2**31))


@dataclass(frozen=True)
class Tiles:
    """Launch settings of pass 2 (pass 1 shares ``block_m`` / ``block_n``). ``query_axis``:
    which axis of pass 2's tiles holds the queries (0: [queries, keys], 1: [keys, queries])."""

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int | None = None  # None: triton's default pipelining
    query_axis: int = 0


# Per reduction, measured on H100 by benchmarks/scoring_bench.py --sweep-reduce --batch 8 (a group
# of stacked layers; docs/scoring.md).
# "weighted" (a sum with per-query weights) and "lazy" keep the tile's own sum beside the
# accumulator: twice the registers. Lazy's scan over the queries of a tile runs along the axis
# that stays inside a warp (query_axis 1): 3.7 vs 4.6 ms for 8 layers, 14.4% vs 15.9% of a 32k
# prefill (medians of 6). Since its tiles of consecutive queries take bits instead of the scan
# (`_lazy_bits`), 3 pipelining stages do not pay: triton's default is as fast (3.148 vs 3.147 ms for
# 8 stacked layers).
TILES = {
    "sum": Tiles(),
    "max": Tiles(),
    "weighted": Tiles(block_n=64),
    "lazy": Tiles(block_m=32, block_n=128, query_axis=1),
}


@triton.jit
def _query_row(q_ptr, qoff_ptr, b, QB, s_qb):
    # Batch row b of the queries: row b % QB of the part b // QB, which starts qoff[b // QB]
    # elements from q_ptr (`_query_parts`: the stacked layers' queries, never concatenated).
    # The offset is a multiple of QOFF_ALIGN (checked on the host): without the hint the
    # compiler no longer knows the rows' alignment and loads the queries element by element
    # (measured on H100: H2O's compression share 13% -> 19%).
    off = tl.multiple_of(tl.load(qoff_ptr + b // QB), QOFF_ALIGN)
    return q_ptr + off + (b % QB).to(tl.int64) * s_qb


@triton.jit
def _lse_kernel(
    q_ptr, qoff_ptr, k_ptr, kpos_ptr, qpos_ptr, lse_ptr, kend_ptr,
    m, n, D, qk_scale, QB,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_pb, s_ph, s_pn,
    HQ: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    hq = pid_bh % HQ
    h = hq // G  # the KV head this query head reads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < m
    q_base = _query_row(q_ptr, qoff_ptr, b, QB, s_qb) + hq.to(tl.int64) * s_qh
    q = tl.load(
        q_base + rows[:, None].to(tl.int64) * s_qm + dims[None, :] * s_qd,
        mask=row_ok[:, None] & (dims[None, :] < D), other=0.0,
    )
    qpos = tl.load(qpos_ptr + rows, mask=row_ok, other=QPOS_NONE)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    p_base = kpos_ptr + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph

    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    # Keys past kend are visible to no row of this tile (positions ascend): not even loaded.
    kend = tl.load(kend_ptr + (b * (HQ // G) + h).to(tl.int64) * tl.num_programs(0) + pid_m)
    for start in range(0, kend, BLOCK_N):
        idx = start + cols
        col_ok = idx < n
        k = tl.load(
            k_base + idx[:, None].to(tl.int64) * s_kn + dims[None, :] * s_kd,
            mask=col_ok[:, None] & (dims[None, :] < D), other=0.0,
        )
        kpos = tl.load(p_base + idx.to(tl.int64) * s_pn, mask=col_ok, other=KPOS_NONE)
        if IEEE:
            logits = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            logits = tl.dot(q, tl.trans(k))
        logits = logits * qk_scale
        visible = kpos[None, :] <= qpos[:, None]
        logits = tl.where(visible, logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        # Rows that have seen nothing yet keep max -inf: shift by 0 instead (exp2(-inf) = 0).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), 1)
        run_max = new_max
    # log2(0) = -inf: a row with no visible key gets lse -inf and contributes nothing in pass 2.
    seen = run_sum > 0
    lse = tl.where(seen, run_max + tl.log2(tl.where(seen, run_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * m + rows, lse, mask=row_ok)


@triton.jit
def _max_and_max_before(a_all, a_before, b_all, b_before):
    # Combines runs of rows as (max over the run, max over the run but its last row): associative,
    # and the second value of a prefix is the max over the rows strictly before it.
    return tl.maximum(a_all, b_all), tl.maximum(a_all, b_before)


@triton.jit
def _lazy_step(attn, thr, qpos, last, gap, QAXIS: tl.constexpr):
    """LazyEviction's scan (`kvbudget.scoring.lazy_scan`) over one query tile, rows in order.
    ``attn`` (mean over the group) holds the tile's queries along axis ``QAXIS`` and its keys
    along the other: [BLOCK_M, BLOCK_N] for 0, [BLOCK_N, BLOCK_M] for 1. ``thr`` [BLOCK_M] (the
    queries' thresholds, `_importance_thresholds`), ``qpos`` [BLOCK_M]; ``last`` / ``gap``
    [BLOCK_N] carried from the earlier queries.
    Query i finds key j important when attn > thr; then gap = max(gap, qpos_i - last) and last
    = max(last, qpos_i) (a running max, as the reference's cummax, so unsorted positions give
    the same result). The queries of the tile all at once: the `last` each important query
    meets is the carried one or the latest important query before it in the tile (an exclusive
    prefix max)."""
    qf = tl.expand_dims(qpos.to(tl.float32), 1 - QAXIS)
    important = attn > tl.expand_dims(thr, 1 - QAXIS)
    at = tl.where(important, qf, float("-inf"))
    _, before = tl.associative_scan((at, tl.zeros_like(at) - float("inf")), QAXIS, _max_and_max_before)
    # Queries that are not important count 0, as the reference's: `gap` only grows from 0.
    since = tl.where(important, qf - tl.maximum(tl.expand_dims(last, QAXIS), before), 0.0)
    return tl.maximum(last, tl.max(at, QAXIS)), tl.maximum(gap, tl.max(since, QAXIS))


@triton.jit
def _high_bit(x):
    """Index of the highest set bit of each ``x`` > 0 (uint32). uint32 -> float32 rounds to
    nearest, so the float's exponent is that index or one more (rounded up to the next power
    of two): compared back once. (No clz in triton's interpreter, which the CPU tests run.)"""
    e = tl.minimum((x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127, 31)
    return tl.where(x < (tl.full(x.shape, 1, tl.uint32) << e.to(tl.uint32)), e - 1, e)


@triton.jit
def _all_ones(x):
    """uint32 with every bit set, shaped as ``x``: from int32 -1, as triton's interpreter cannot
    make it in uint32 (its `~` on uint32 fails the same way: ``x ^ _all_ones(x)`` instead)."""
    return tl.full(x.shape, -1, tl.int32).to(tl.uint32, bitcast=True)


@triton.jit
def _longest_run(z):
    """Length of the longest run of set bits in each ``z`` (uint32), up to 31 (every bit set
    gives 31; `_lazy_bits` asks only of bits strictly between two set ones): binary lifting over
    runs of 16, 8, 4, 2 and 1 bits (``a_k`` marks where k set bits start)."""
    a1 = z
    a2 = a1 & (a1 >> 1)
    a4 = a2 & (a2 >> 2)
    a8 = a4 & (a4 >> 4)
    a16 = a8 & (a8 >> 8)
    starts = _all_ones(z)  # where a run of the length found so far starts
    length = tl.zeros(z.shape, tl.uint32)  # at most 31 here: every shift stays below 32
    starts, length = _lengthen(starts, length, a16, 16)
    starts, length = _lengthen(starts, length, a8, 8)
    starts, length = _lengthen(starts, length, a4, 4)
    starts, length = _lengthen(starts, length, a2, 2)
    starts, length = _lengthen(starts, length, a1, 1)
    return length


@triton.jit
def _lengthen(starts, length, a, k: tl.constexpr):
    """One step of `_longest_run`: where a run of ``length`` set bits starting at a set bit of
    ``starts`` goes on for ``k`` more (``a`` marks where k set bits start), take it."""
    longer = starts & (a >> length)
    found = longer != 0
    return tl.where(found, longer, starts), tl.where(found, length + k, length)


@triton.jit
def _lazy_bits(attn, thr, q0, last, gap, QAXIS: tl.constexpr, BLOCK_M: tl.constexpr):
    """`_lazy_step` for a tile whose query positions are consecutive, q0, q0 + 1, ... (a prefill
    block; decode steps), without the scan: each key's important queries of the tile as the bits
    of one 32-bit integer (BLOCK_M <= 32). An important query closes the interval from the latest
    important moment before it, the carried ``last`` or an important query of the tile: so the
    first important query after ``last`` closes one from ``last``, each later one from the
    important query before it, and the longest of those is 1 + the longest run of unset bits
    between them. (Important queries at or before ``last`` close nothing: their bits are
    cleared first.) The new ``last`` is the latest important query. Same values as
    `_lazy_step` (integer positions, exact in float32), a few integer operations per key
    instead of a scan over the tile (which made LazyEviction's pass 2 twice H2O's). All of it
    in 32 bits: shifts stay below 32 (a shift by the width is undefined), and 64-bit integers
    and float64 conversions, as the first version had, cost several instructions each."""
    r = tl.arange(0, BLOCK_M)
    important = attn > tl.expand_dims(thr, 1 - QAXIS)
    bit = tl.expand_dims(1 << r, 1 - QAXIS)  # int32; bit 31 wraps to the sign bit, as wanted
    # Distinct bits: their sum is their OR, also through the sign bit (wrapping int32 adds).
    bits = tl.sum(tl.where(important, bit, 0), QAXIS).to(tl.uint32, bitcast=True)
    seen = bits != 0
    latest = _high_bit(tl.where(seen, bits, 1))
    ones = _all_ones(bits)
    cut = tl.maximum(tl.floor(last - q0).to(tl.int32) + 1, 0)  # rows at or before `last`
    later = tl.where(cut > 31, 0, bits & (ones << tl.minimum(cut, 31).to(tl.uint32)))
    closes = later != 0
    safe = tl.where(closes, later, 1)
    hi = _high_bit(safe)
    low_bit = safe & ((safe ^ ones) + 1)  # the lowest set bit, alone
    lo = _high_bit(low_bit)
    # Bits strictly between lo and hi: below hi, and at or above lo but lo itself.
    between = ((tl.full(bits.shape, 1, tl.uint32) << hi.to(tl.uint32)) - 1) & ((ones << lo.to(tl.uint32)) ^ low_bit)
    inside = tl.where(hi > lo, _longest_run((later ^ ones) & between) + 1, 0).to(tl.float32)
    first = q0 + lo.to(tl.float32)
    gap = tl.where(closes, tl.maximum(gap, tl.maximum(first - last, inside)), gap)
    last = tl.where(seen, tl.maximum(last, q0 + latest.to(tl.float32)), last)
    return last, gap


@triton.jit
def _reduce_kernel(
    q_ptr, qoff_ptr, k_ptr, kpos_ptr, qpos_ptr, lse_ptr, w_ptr, out_ptr, qstart_ptr,
    m, n, D, qk_scale, out_scale, QB,
    s_qb, s_qh, s_qm, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_pb, s_ph, s_pn,
    H: tl.constexpr, G: tl.constexpr, MODE: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    QAXIS: tl.constexpr,
):
    # QAXIS: the axis of the [.., ..] tiles that holds the queries; the keys hold the other.
    # 0: logits = q @ k^T [BLOCK_M, BLOCK_N]; 1: logits = k @ q^T [BLOCK_N, BLOCK_M].
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    idx = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    rows0 = tl.arange(0, BLOCK_M)
    col_ok = idx < n
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    k = tl.load(
        k_base + idx[:, None].to(tl.int64) * s_kn + dims[None, :] * s_kd,
        mask=col_ok[:, None] & (dims[None, :] < D), other=0.0,
    )
    kt = tl.trans(k)
    q_row = _query_row(q_ptr, qoff_ptr, b, QB, s_qb)
    kpos = tl.load(kpos_ptr + b.to(tl.int64) * s_pb + h.to(tl.int64) * s_ph + idx.to(tl.int64) * s_pn,
                   mask=col_ok, other=KPOS_NONE)
    # Accumulated per (query row, key) over the query tiles and reduced over the rows once at
    # the end: a reduction per tile crosses the warps through shared memory every time.
    # Probabilities are >= 0: 0 is also max's identity here.
    if QAXIS == 0:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    if MODE == 2:
        # out is [3, B*H, n]: the sums, then the scan's `last` and `gap`, which come in holding
        # the state carried from earlier queries and are rewritten at the end.
        bh = tl.num_programs(1).to(tl.int64)
        state = out_ptr + (bh + pid_bh) * n + idx
        last = tl.load(state, mask=col_ok, other=0.0)
        gap = tl.load(state + bh * n, mask=col_ok, other=0.0)
    # Query tiles before qstart see none of these keys (positions ascend): skipped.
    qstart = tl.load(qstart_ptr + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_n)
    for start in range(qstart, m, BLOCK_M):
        rows = start + rows0
        row_ok = rows < m
        qpos = tl.load(qpos_ptr + rows, mask=row_ok, other=QPOS_NONE)
        visible = tl.expand_dims(kpos, QAXIS) <= tl.expand_dims(qpos, 1 - QAXIS)
        tile = tl.zeros_like(acc)  # the tile's own sum, where it is needed
        for gi in range(G):
            hq = h * G + gi
            q = tl.load(
                q_row + hq.to(tl.int64) * s_qh
                + rows[:, None].to(tl.int64) * s_qm + dims[None, :] * s_qd,
                mask=row_ok[:, None] & (dims[None, :] < D), other=0.0,
            )
            lse = tl.load(lse_ptr + (b.to(tl.int64) * H * G + hq) * m + rows, mask=row_ok, other=0.0)
            if QAXIS == 0:
                a, bt = q, kt
            else:
                a, bt = k, tl.trans(q)
            if IEEE:
                logits = tl.dot(a, bt, input_precision="ieee")
            else:
                logits = tl.dot(a, bt)
            # A visible pair always has a finite lse (its row saw at least this key).
            p = tl.where(visible, tl.exp2(logits * qk_scale - tl.expand_dims(lse, 1 - QAXIS)), 0.0)
            if MODE == 1:
                acc = tl.maximum(acc, p)
            elif MODE == 2 or WEIGHTED:
                tile += p
            else:
                acc += p
        if MODE == 2:
            # w holds each row's importance threshold here, [B*H, m].
            thr = tl.load(w_ptr + pid_bh.to(tl.int64) * m + rows, mask=row_ok, other=float("inf"))
            if BLOCK_M <= 32:
                # Consecutive positions (every prefill block) take the bits; others the scan.
                shift = qpos - rows
                low = tl.min(tl.where(row_ok, shift, 2**31 - 1))
                if low == tl.max(tl.where(row_ok, shift, -(2**31))):
                    last, gap = _lazy_bits(tile * out_scale, thr, (low + start).to(tl.float32), last, gap,
                                           QAXIS, BLOCK_M)
                else:
                    last, gap = _lazy_step(tile * out_scale, thr, qpos, last, gap, QAXIS)
            else:
                last, gap = _lazy_step(tile * out_scale, thr, qpos, last, gap, QAXIS)
            acc += tile
        if WEIGHTED:
            w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
            acc += tile * tl.expand_dims(w, 1 - QAXIS)
    total = tl.max(acc, QAXIS) if MODE == 1 else tl.sum(acc, QAXIS)
    tl.store(out_ptr + pid_bh.to(tl.int64) * n + idx, total * out_scale, mask=col_ok)
    if MODE == 2:
        tl.store(state, last, mask=col_ok)
        tl.store(state + bh * n, gap, mask=col_ok)


def _tile_bounds(kpos: Tensor, qpos: Tensor, block_m: int, block_n: int) -> tuple[Tensor, Tensor]:
    """Which tiles can matter, so that causally hidden ones are skipped (a quarter of the work of
    a prefill block: its new keys are visible only to the queries after them).

    ``kend`` [B*H, query tiles]: the keys that any row of a query tile may see all lie before it;
    ``qstart`` [B*H, key tiles]: no query row before it sees any key of the key tile. Both rely
    on positions ascending along keys (kept entries keep their order; padding, at `KPOS_NONE`,
    comes last) and along queries; when either is not sorted nothing is skipped."""
    b, h, n = kpos.shape
    m = qpos.shape[0]
    n_mt, n_nt = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    # Checked on the device (no host sync): unsorted positions fall back to "skip nothing".
    sorted_ok = (kpos[..., 1:] >= kpos[..., :-1]).all() & (qpos[1:] >= qpos[:-1]).all()
    flat = kpos.reshape(b * h, n).contiguous()
    last_row = (torch.arange(n_mt, device=kpos.device) * block_m + block_m - 1).clamp(max=m - 1)
    qmax = qpos[last_row].expand(b * h, n_mt).contiguous()
    kend = torch.searchsorted(flat, qmax, right=True).to(torch.int32)
    padded = torch.nn.functional.pad(flat, (0, n_nt * block_n - n), value=KPOS_NONE.value)
    kmin = padded.view(b * h, n_nt, block_n).amin(-1)
    first = torch.searchsorted(qpos.contiguous(), kmin.contiguous())  # first row with qpos >= kmin
    qstart = (first // block_m * block_m).to(torch.int32)
    kend = torch.where(sorted_ok, kend, torch.full_like(kend, n))
    qstart = torch.where(sorted_ok, qstart, torch.zeros_like(qstart))
    return kend, qstart


def _base2_lse(lse: Tensor, shape: tuple[int, int, int], device: torch.device) -> Tensor:
    """A natural-log LSE [B, Hq, m] in the kernels' convention: base 2 (they take exp2 of logits
    scaled by ``scaling * log2(e)``), contiguous float32. -inf (a row that saw nothing) becomes
    +inf, so that exp2(logit - lse) is 0 for every key, not inf, whatever the row can see."""
    if tuple(lse.shape) != shape:
        raise ValueError(f"lse has shape {tuple(lse.shape)}, the queries need {shape}")
    lse2 = lse.to(device=device, dtype=torch.float32) * LOG2E
    return lse2.masked_fill(lse2 == float("-inf"), float("inf")).contiguous()


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def attention_reduce(
    queries: Queries,
    keys: Tensor,
    key_positions: Tensor,
    query_positions: Tensor,
    scaling: float,
    mode: str = "sum",
    weights: Tensor | None = None,
    lse: Tensor | None = None,
    **tiles: int | None,
) -> Tensor:
    """Attention received per cached entry, reduced over queries: [B, H, n] float32.

    ``queries`` [B, Hq, m, d], or parts of it along the batch, each [b, Hq, m, d] (stacked
    layers' queries, read where they lie: `_query_parts`), ``keys`` [B, H, n, d] (same dtype), ``key_positions`` [B, H, n]
    with masked entries at `KPOS_NONE`, ``query_positions`` [m]. ``mode`` "sum": sum over
    queries (times ``weights`` [m] if given) of the mean over the g query heads of each KV head;
    "max": max over queries and over the g query heads.
    ``lse`` [B, Hq, m] (natural log): each row's log-sum-exp over exactly its visible keys,
    already known: pass 1 is skipped. A row whose lse is -inf contributes nothing.
    ``tiles``: `Tiles` fields overriding the mode's defaults in `TILES` (block sizes are powers
    of two, >= 16; benchmarks/scoring_bench.py compares them).
    """
    if mode not in ("sum", "max"):
        raise ValueError(f"mode must be one of ['max', 'sum'], got '{mode}'")
    if weights is not None:
        if mode != "sum":
            raise ValueError("weights only apply to mode 'sum'")
        weights = weights.to(device=key_positions.device, dtype=torch.float32).contiguous()
    b, h, n = key_positions.shape
    out = torch.empty(b, h, n, dtype=torch.float32, device=key_positions.device)
    if _n_queries(queries) == 0 or n == 0:
        return out.zero_()
    config = replace(TILES["weighted" if weights is not None else mode], **tiles)
    _launch(queries, keys, key_positions, query_positions, scaling, mode, weights, out, config, lse)
    return out


def attention_lazy(
    queries: Queries,
    keys: Tensor,
    key_positions: Tensor,
    query_positions: Tensor,
    scaling: float,
    last: Tensor,
    gap: Tensor,
    lse: Tensor | None = None,
    **tiles: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """LazyEviction's scan over the queries in order, without the [m, n] attention:
    (received, last, gap), each [B, H, n] float32 (`kvbudget.scoring.lazy_scan` is the torch
    reference and says what they are). ``last`` and ``gap`` [B, H, n] are the state carried in
    (not modified); the other arguments are `attention_reduce`'s."""
    b, h, n = key_positions.shape
    received = torch.zeros(b, h, n, dtype=torch.float32, device=key_positions.device)
    out = torch.stack([received, last.to(received), gap.to(received)])  # the kernel's [3, B*H, n]
    if _n_queries(queries) == 0 or n == 0:
        return out.unbind(0)
    kpos = key_positions.to(torch.int32)
    qpos = query_positions.to(device=key_positions.device, dtype=torch.int32).contiguous()
    thr = _importance_thresholds(kpos, qpos)
    _launch(queries, keys, kpos, qpos, scaling, "lazy", thr, out, replace(TILES["lazy"], **tiles), lse)
    return out.unbind(0)


def _importance_thresholds(kpos: Tensor, qpos: Tensor) -> Tensor:
    """1 / the number of keys each query sees per (batch x KV head, query): [B*H, m] float32,
    LazyEviction's importance threshold (the uniform share). Counted by a binary search over each
    row's key positions sorted (they already are in kvbudget, but neither correctness nor a host
    sync depends on it): no [m, n] comparison."""
    b, h, n = kpos.shape
    flat = kpos.reshape(b * h, n).sort(-1).values
    counts = torch.searchsorted(flat, qpos.expand(b * h, -1).contiguous(), right=True)
    # A query that sees one key gives it all its attention, exactly 1 in the reference's softmax:
    # never above the share 1/1. Here p = exp2(logit - lse) may round to just above 1 (a given
    # lse comes from another kernel), so such rows get no threshold to cross.
    share = (1.0 / counts.clamp(min=1)).to(torch.float32)
    return share.masked_fill(counts <= 1, float("inf")).contiguous()


_NO_OFFSET: dict[torch.device, Tensor] = {}


def _n_queries(queries: Queries) -> int:
    return (queries if isinstance(queries, Tensor) else queries[0]).shape[2]


def _query_parts(queries: Queries) -> tuple[Tensor, Tensor, int]:
    """The queries as the kernels read them: (the first part, each part's offset in elements
    from it as int64 on the device, batch rows per part). Parts are the stacked layers' queries
    (`Policy.compress`), each [b, Hq, m, d]: concatenating them copied 128 MiB per group of 8
    layers of the 8B shape (1 of the 8 ms of GPU time of an H2O compression, measured on H100),
    so the kernels read every part where it lies. Parts not alike (shape, strides, dtype,
    device) or not `QOFF_ALIGN` elements apart are concatenated after all."""
    if isinstance(queries, Tensor):
        dev = queries.device
        if dev not in _NO_OFFSET:
            _NO_OFFSET[dev] = torch.zeros(1, dtype=torch.int64, device=dev)
        return queries, _NO_OFFSET[dev], queries.shape[0]
    first = queries[0]
    size = first.element_size()
    gaps = [q.data_ptr() - first.data_ptr() for q in queries]
    if any(q.shape != first.shape or q.stride() != first.stride() or q.dtype != first.dtype
           or q.device != first.device for q in queries) or any(gap % (size * QOFF_ALIGN.value) for gap in gaps):
        return _query_parts(torch.cat(list(queries)))
    return first, to_device(torch.tensor([gap // size for gap in gaps], dtype=torch.int64), first.device), first.shape[0]


def _launch(
    queries: Tensor, keys: Tensor, key_positions: Tensor, query_positions: Tensor, scaling: float,
    mode: str, rows: Tensor | None, out: Tensor, tiles: Tiles, lse: Tensor | None,
) -> None:
    """Pass 1 unless ``lse`` is given, then pass 2 into ``out`` (``mode``'s layout). ``rows``:
    the per-query weights of "sum" (None: unweighted), the [B*H, m] thresholds of "lazy"."""
    queries, qoff, qb = _query_parts(queries)
    b, hq, m, d = queries.shape
    b = qoff.shape[0] * qb
    h, n = keys.shape[1], keys.shape[2]
    if hq % h:
        raise ValueError(f"{hq} query heads do not split into {h} KV heads")
    g = hq // h
    if keys.dtype != queries.dtype:
        keys = keys.to(queries.dtype)
    kpos = key_positions.to(torch.int32)
    qpos = query_positions.to(device=queries.device, dtype=torch.int32).contiguous()
    bd = _block_d(d)
    ieee = queries.dtype == torch.float32
    qk_scale = float(scaling) * LOG2E
    q_strides = queries.stride()
    k_strides = keys.stride()
    p_strides = kpos.stride()
    # fp32 tiles take twice the registers/shared memory: halve the query tile.
    bm = tiles.block_m if not ieee else max(16, tiles.block_m // 2)
    # A window of few queries (SnapKV's 32) fills no wider query tile: rows past m are masked work.
    bm = min(bm, max(16, triton.next_power_of_2(m)))
    bn = tiles.block_n
    kend, qstart = _tile_bounds(kpos, qpos, bm, bn)
    if lse is not None:
        lse = _base2_lse(lse, (b, hq, m), queries.device)
    else:
        lse = torch.empty(b, hq, m, dtype=torch.float32, device=queries.device)
        _lse_kernel[(triton.cdiv(m, bm), b * hq)](
            queries, qoff, keys, kpos, qpos, lse, kend, m, n, d, qk_scale, qb, *q_strides, *k_strides, *p_strides,
            HQ=hq, G=g, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, num_warps=tiles.num_warps,
        )
    weighted = mode == "sum" and rows is not None
    extra = {} if tiles.num_stages is None else {"num_stages": tiles.num_stages}
    _reduce_kernel[(triton.cdiv(n, bn), b * h)](
        queries, qoff, keys, kpos, qpos, lse, lse if rows is None else rows, out, qstart, m, n, d, qk_scale,
        1.0 if mode == "max" else 1.0 / g, qb,
        *q_strides, *k_strides, *p_strides,
        H=h, G=g, MODE=MODES[mode], WEIGHTED=weighted,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, IEEE=ieee, QAXIS=tiles.query_axis, num_warps=tiles.num_warps, **extra,
    )
