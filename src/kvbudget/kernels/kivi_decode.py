"""Fused dequantise-and-attend decode for KIVI-encoded KV (Triton, split-K).

A KIVI layer (`kvbudget.methods.stores.kivi.KIVI`, held by `BudgetedLayer` as a `Body` before its
full-precision tail) stores, per (batch, KV head) and body entry ``t``:

* ``body.tokens["k"]`` [B, H, n, D/P] uint8: key codes, ``P = 8 / bits`` codes per byte, channel
  ``c = P*j + s`` in bits ``bits*s .. bits*s + bits - 1`` of byte ``j`` (`quant.pack`);
* ``body.chunk_id`` [B, H, n] int16/int32 and ``body.chunks["k_scale"|"k_zero"]`` [B, H, C, D]:
  keys are quantized per channel over chunks of 32 tokens; entry t uses row ``chunk_id[t]``
  (entries of one chunk may since have been evicted, so the ids are gathered, not implied);
* ``body.tokens["v"]`` [B, H, n, Dv/P] uint8 and ``"v_scale"|"v_zero"`` [B, H, n, Dv/G]: values
  quantized per token over groups of ``G`` (32) channels.

``key[t, c] = code * k_scale[chunk_id[t], c] + k_zero[chunk_id[t], c]`` and likewise for values,
computed in float32 and rounded to the model dtype, exactly as `KIVI.decode` does.

The kernel never writes the dequantised body: a program loads a block of packed bytes, and for
each of the ``P`` sub-positions ``s`` extracts the codes of channels ``P*j + s`` in registers,
applies the scales, and multiplies them with the matching strided sub-vector of the query
(``q[:, P*j + s]``, loaded once per program): ``q . k = sum_s q_s . k_s``. Values are handled
the same way with ``P`` sub-accumulators (output channels ``P*j + s``). Online softmax in
float32, split-K like `varlen_decode`; the full-precision tail goes through the varlen kernel into
extra split slots of the same scratch, and one combine merges body and tail by their LSE.

That is `_kivi_stage_kernel`, which serves any layout. `_kivi_fold_kernel`, for power-of-two
head dims and value groups (every real model: `fold_supported`), folds the scales instead of
applying them per element, with `kivi_parts.kivi_parts_body` as its block loop (codes unpacked by
inline PTX, value scales in the probabilities, one warp per program): docs/kernels.md.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kivi_parts import kivi_parts_body
from .varlen_decode import LOG2E, MAX_SPLITS, MIN_ROWS, mm, pow2, store_partial, choose_splits, combine, decode_attention, dot_precision, launch_stage, new_partials, num_sms, upcast_dot

# 32 entries x 8 warps: the dequantisation tiles fit in registers (ptxas, sm_90: 206-215 registers,
# no spills; 64 x 4 warps spills ~0.5 KB per thread).
BLOCK_N = 32
# Launch settings: (entries per block, warps, pipeline stages, programs resident per SM, register
# cap per thread or 0 for none), for bf16/fp16 (float32 tiles take FOLD_CONFIG_FP32): one warp
# per program, 16 entries (ptxas sm_90: 255 registers, 104 / 8 bytes of spills at 4 / 2 bits for
# the prefetched block; 8 programs resident per SM), the fastest of the settings swept on H100
# (docs/kernels.md): with one warp nothing crosses warps (no barriers, no
# shared-memory reductions); 2 and 4 warps measured 1.2-1.6x slower.
FOLD_CONFIG = (16, 1, 1, 8, 0)
FOLD_CONFIG_FP32 = (32, 8, 1, 1, 0)  # float32 tiles: 4 warps would spill
# Query rows of the fold kernel's tiles (the group padded to a power of two, at least this): 4, not
# 16, since tl.dot pads M itself on sm_90, and 4 x D float32 tiles cost far fewer registers.
FOLD_MIN_ROWS = 4
GATHER_CONFIG = (BLOCK_N, 8, 2, 2, 0)
TAIL_BLOCK_FOLD = 32  # full-precision tail entries per block inside the fold kernel


@triton.jit
def _load_q_part(q_rows, offs_j, s: tl.constexpr, PACK: tl.constexpr, DP, mask_g, stride_qd):
    """The query's channels ``PACK*j + s``: [G_PAD, BLOCK_DP]."""
    ch = offs_j * PACK + s
    return tl.load(q_rows + ch[None, :] * stride_qd, mask=mask_g[:, None] & (offs_j[None, :] < DP), other=0.0)


@triton.jit
def _key_part(kbytes, s: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr,
              ks_rows, kz_rows, offs_j, kmask, stride_td):
    """Dequantised keys of channels ``PACK*j + s`` for a block of entries: [BLOCK_N, BLOCK_DP] f32."""
    code = ((kbytes >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    ch = (offs_j * PACK + s)[None, :] * stride_td
    scale = tl.load(ks_rows + ch, mask=kmask, other=0.0).to(tl.float32)
    zero = tl.load(kz_rows + ch, mask=kmask, other=0.0).to(tl.float32)
    return code * scale + zero


@triton.jit
def _value_part(vbytes, s: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr, GV: tl.constexpr,
                vs_rows, vz_rows, offs_jv, vmask, stride_vsg):
    """Dequantised values of channels ``PACK*j + s`` (group ``(PACK*j + s) // GV``): [BLOCK_N, BLOCK_DVP]."""
    code = ((vbytes >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    grp = ((offs_jv * PACK + s) // GV)[None, :] * stride_vsg
    scale = tl.load(vs_rows + grp, mask=vmask, other=0.0).to(tl.float32)
    zero = tl.load(vz_rows + grp, mask=vmask, other=0.0).to(tl.float32)
    return code * scale + zero


@triton.jit
def _store_part(po_rows, acc, inv_l, offs_jv, s: tl.constexpr, PACK: tl.constexpr, DVP, mask_g):
    ch = offs_jv * PACK + s
    tl.store(po_rows + ch[None, :], acc * inv_l[:, None], mask=mask_g[:, None] & (offs_jv[None, :] < DVP))


@triton.jit
def _kivi_stage_kernel(
    q_ptr, kc_ptr, vc_ptr, vs_ptr, vz_ptr, cid_ptr, ks_ptr, kz_ptr, blens_ptr, po_ptr, plse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcj,
    stride_vcb, stride_vch, stride_vcn, stride_vcj,
    stride_vsb, stride_vsh, stride_vsn, stride_vsg,
    stride_cb, stride_ch, stride_cn,
    stride_tb, stride_th, stride_tc, stride_td,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    H_KV, GROUP, N_BODY, DP, DVP, split_len, qk_scale,
    BITS: tl.constexpr, PACK: tl.constexpr, GV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DVP: tl.constexpr, G_PAD: tl.constexpr,
    HAS_LENS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h = pid_bh % H_KV
    if HAS_LENS:
        length = tl.minimum(tl.load(blens_ptr + pid_bh).to(tl.int32), N_BODY)
    else:
        length = N_BODY
    lo = pid_s * split_len
    hi = tl.minimum(length, lo + split_len)
    hi = tl.where(pid_s == tl.num_programs(1) - 1, length, hi)

    h64 = h.to(tl.int64)
    kc_base = kc_ptr + b * stride_kcb + h64 * stride_kch
    vc_base = vc_ptr + b * stride_vcb + h64 * stride_vch
    vs_base = vs_ptr + b * stride_vsb + h64 * stride_vsh
    vz_base = vz_ptr + b * stride_vsb + h64 * stride_vsh
    cid_base = cid_ptr + b * stride_cb + h64 * stride_ch
    ks_base = ks_ptr + b * stride_tb + h64 * stride_th
    kz_base = kz_ptr + b * stride_tb + h64 * stride_th

    offs_g = tl.arange(0, G_PAD)
    offs_j = tl.arange(0, BLOCK_DP)
    offs_jv = tl.arange(0, BLOCK_DVP)
    mask_g = offs_g < GROUP
    qhead = (h * GROUP + offs_g).to(tl.int64)
    q_rows = q_ptr + b * stride_qb + qhead[:, None] * stride_qh
    # The P strided sub-vectors of the query, loaded once (constexpr branches: P is 1, 2 or 4).
    q0 = _load_q_part(q_rows, offs_j, 0, PACK, DP, mask_g, stride_qd)
    if PACK >= 2:
        q1 = _load_q_part(q_rows, offs_j, 1, PACK, DP, mask_g, stride_qd)
    else:
        q1 = q0
    if PACK >= 4:
        q2 = _load_q_part(q_rows, offs_j, 2, PACK, DP, mask_g, stride_qd)
        q3 = _load_q_part(q_rows, offs_j, 3, PACK, DP, mask_g, stride_qd)
    else:
        q2 = q0
        q3 = q0
    dt = q0.dtype

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc0 = tl.zeros([G_PAD, BLOCK_DVP], tl.float32)
    acc1 = tl.zeros([G_PAD, BLOCK_DVP], tl.float32)
    acc2 = tl.zeros([G_PAD, BLOCK_DVP], tl.float32)
    acc3 = tl.zeros([G_PAD, BLOCK_DVP], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        # Keys: packed bytes once, then P sub-tiles of dequantised channels.
        cid = tl.load(cid_base + rows * stride_cn, mask=mask_n, other=0).to(tl.int64)
        ks_rows = ks_base + cid[:, None] * stride_tc
        kz_rows = kz_base + cid[:, None] * stride_tc
        kmask = mask_n[:, None] & (offs_j[None, :] < DP)
        kbytes = tl.load(kc_base + rows[:, None] * stride_kcn + offs_j[None, :] * stride_kcj,
                         mask=kmask, other=0).to(tl.int32)
        k0 = _key_part(kbytes, 0, BITS, PACK, ks_rows, kz_rows, offs_j, kmask, stride_td).to(dt)
        qk = mm(q0, tl.trans(k0), DOT_PREC, UPCAST)
        if PACK >= 2:
            k1 = _key_part(kbytes, 1, BITS, PACK, ks_rows, kz_rows, offs_j, kmask, stride_td).to(dt)
            qk += mm(q1, tl.trans(k1), DOT_PREC, UPCAST)
        if PACK >= 4:
            k2 = _key_part(kbytes, 2, BITS, PACK, ks_rows, kz_rows, offs_j, kmask, stride_td).to(dt)
            qk += mm(q2, tl.trans(k2), DOT_PREC, UPCAST)
            k3 = _key_part(kbytes, 3, BITS, PACK, ks_rows, kz_rows, offs_j, kmask, stride_td).to(dt)
            qk += mm(q3, tl.trans(k3), DOT_PREC, UPCAST)
        qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = p.to(dt)
        # Values: per-token scales of each channel's group.
        vs_rows = vs_base + rows[:, None] * stride_vsn
        vz_rows = vz_base + rows[:, None] * stride_vsn
        vmask = mask_n[:, None] & (offs_jv[None, :] < DVP)
        vbytes = tl.load(vc_base + rows[:, None] * stride_vcn + offs_jv[None, :] * stride_vcj,
                         mask=vmask, other=0).to(tl.int32)
        v0 = _value_part(vbytes, 0, BITS, PACK, GV, vs_rows, vz_rows, offs_jv, vmask, stride_vsg).to(dt)
        acc0 = acc0 * alpha[:, None] + mm(pv, v0, DOT_PREC, UPCAST)
        if PACK >= 2:
            v1 = _value_part(vbytes, 1, BITS, PACK, GV, vs_rows, vz_rows, offs_jv, vmask, stride_vsg).to(dt)
            acc1 = acc1 * alpha[:, None] + mm(pv, v1, DOT_PREC, UPCAST)
        if PACK >= 4:
            v2 = _value_part(vbytes, 2, BITS, PACK, GV, vs_rows, vz_rows, offs_jv, vmask, stride_vsg).to(dt)
            acc2 = acc2 * alpha[:, None] + mm(pv, v2, DOT_PREC, UPCAST)
            v3 = _value_part(vbytes, 3, BITS, PACK, GV, vs_rows, vz_rows, offs_jv, vmask, stride_vsg).to(dt)
            acc3 = acc3 * alpha[:, None] + mm(pv, v3, DOT_PREC, UPCAST)
        m_i = m_new

    # Epilogue: normalised partial output (channels P*j + s from sub-accumulator s) and LSE.
    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    inv_l = 1.0 / l_safe
    slot = pid_s
    po_rows = po_ptr + b * stride_ob + qhead[:, None] * stride_oh + slot * stride_os
    _store_part(po_rows, acc0, inv_l, offs_jv, 0, PACK, DVP, mask_g)
    if PACK >= 2:
        _store_part(po_rows, acc1, inv_l, offs_jv, 1, PACK, DVP, mask_g)
    if PACK >= 4:
        _store_part(po_rows, acc2, inv_l, offs_jv, 2, PACK, DVP, mask_g)
        _store_part(po_rows, acc3, inv_l, offs_jv, 3, PACK, DVP, mask_g)
    lse = tl.where(nonempty, m_i + tl.log2(l_safe), float("-inf"))
    tl.store(plse_ptr + b * stride_lb + qhead * stride_lh + slot, lse, mask=mask_g)



@triton.jit
def _tail_split(q_ptr, k_ptr, v_ptr, lens_ptr, po_ptr, plse_ptr, b, h, pid_bh, pid_t, slot, is_last,
                stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_os, stride_lb, stride_lh, GROUP, T_LEN, split_len, qk_scale,
                HAS_LENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                G_PAD: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One split of the full-precision tail ``k`` [B, Hkv, T, D] (the varlen stage, dense layout)."""
    if HAS_LENS:
        length = tl.minimum(tl.load(lens_ptr + pid_bh).to(tl.int32), T_LEN)
    else:
        length = T_LEN
    lo = pid_t * split_len
    hi = tl.minimum(length, lo + split_len)
    hi = tl.where(is_last, length, hi)
    h64 = h.to(tl.int64)
    k_base = k_ptr + b * stride_kb + h64 * stride_kh
    v_base = v_ptr + b * stride_vb + h64 * stride_vh
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_g = offs_g < GROUP
    qhead = (h * GROUP + offs_g).to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + qhead[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_n[:, None], other=0.0)
        qk = mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd, mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new
    store_partial(po_ptr, plse_ptr, acc, m_i, l_i, b, qhead, mask_g, offs_dv, BLOCK_DV, slot,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh)


@triton.jit
def _kivi_fold_kernel(
    q_ptr, kc_ptr, vc_ptr, vs_ptr, vz_ptr, cid_ptr, ks_ptr, kz_ptr, blens_ptr, po_ptr, plse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcj,
    stride_vcb, stride_vch, stride_vcn, stride_vcj,
    stride_vsb, stride_vsh, stride_vsn, stride_vsg,
    stride_cb, stride_ch, stride_cn,
    stride_tb, stride_th, stride_tc, stride_td,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    H_KV, GROUP, N_BODY, split_len, qk_scale,
    tk_ptr, tv_ptr, tlens_ptr,
    stride_tkb, stride_tkh, stride_tkn, stride_tkd, stride_tvb, stride_tvh, stride_tvn, stride_tvd,
    T_LEN, tail_split, S_BODY,
    BITS: tl.constexpr, PACK: tl.constexpr, GV: tl.constexpr, NG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, G_PAD: tl.constexpr,
    HAS_LENS: tl.constexpr, TAIL_LENS: tl.constexpr, TAIL_BLOCK: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ASM: tl.constexpr = False,
):
    """`_kivi_stage_kernel` without per-element scale gathers (`kivi_parts.kivi_parts_body`);
    the tail in extra programs.

    Needs power-of-two D, Dv and value group GV (NG = Dv / GV groups), unit channel strides.
    Programs ``pid_s < S_BODY`` attend over a split of the body; programs ``pid_s >= S_BODY``
    over the full-precision tail, into the split slots after the body's."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    h = pid_bh % H_KV
    if pid_s >= S_BODY:  # the full-precision tail: extra split slots after the body's
        _tail_split(q_ptr, tk_ptr, tv_ptr, tlens_ptr, po_ptr, plse_ptr, b, h, pid_bh, pid_s - S_BODY, pid_s,
                    pid_s == tl.num_programs(1) - 1,
                    stride_qb, stride_qh, stride_tkb, stride_tkh, stride_tkn, stride_tkd,
                    stride_tvb, stride_tvh, stride_tvn, stride_tvd,
                    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, GROUP, T_LEN, tail_split, qk_scale,
                    TAIL_LENS, TAIL_BLOCK, BLOCK_D, BLOCK_DV, G_PAD, DOT_PREC, UPCAST)
    else:
        if HAS_LENS:
            length = tl.minimum(tl.load(blens_ptr + pid_bh).to(tl.int32), N_BODY)
        else:
            length = N_BODY
        lo = pid_s * split_len
        hi = tl.minimum(length, lo + split_len)
        hi = tl.where(pid_s == S_BODY - 1, length, hi)

        h64 = h.to(tl.int64)
        kc_base = kc_ptr + b * stride_kcb + h64 * stride_kch
        vc_base = vc_ptr + b * stride_vcb + h64 * stride_vch
        vs_base = vs_ptr + b * stride_vsb + h64 * stride_vsh
        vz_base = vz_ptr + b * stride_vsb + h64 * stride_vsh
        cid_base = cid_ptr + b * stride_cb + h64 * stride_ch
        ks_base = ks_ptr + b * stride_tb + h64 * stride_th
        kz_base = kz_ptr + b * stride_tb + h64 * stride_th

        offs_g = tl.arange(0, G_PAD)
        mask_g = offs_g < GROUP
        qhead = (h * GROUP + offs_g).to(tl.int64)
        kivi_parts_body(q_ptr, kc_base, vc_base, vs_base, vz_base, cid_base, ks_base, kz_base, po_ptr, plse_ptr,
                        b, qhead, mask_g, lo, hi, pid_s,
                        stride_qb, stride_qh, stride_kcn, stride_vcn, stride_vsn, stride_cn, stride_tc,
                        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, qk_scale,
                        BITS, PACK, GV, NG, BLOCK_N, BLOCK_D, G_PAD, DOT_PREC, UPCAST, ASM)


@functools.lru_cache(maxsize=1024)
def fold_splits(programs: int, n: int, block_n: int, resident: int) -> tuple[int, int]:
    """(splits, entries per split) for ``programs`` heads of ``n`` body entries when ``resident``
    programs run at once: the fewest splits minimising rounds x (blocks per split + 2), i.e. whole
    waves of the GPU (a last wave a fifth full costs as much as a full one) and a per-program
    start-up of about two blocks."""
    blocks = max(1, -(-n // block_n))
    best = None
    for splits in range(1, min(blocks, MAX_SPLITS) + 1):
        per = -(-blocks // splits)
        cost = -(-programs * splits // resident) * (per + 2)
        if best is None or cost < best[0]:
            best = (cost, splits, per)
    _, splits, per = best
    return -(-blocks // per), per * block_n


def fold_supported(q: Tensor, body, d: int, dv: int, gv: int) -> bool:
    """`_kivi_fold_kernel` covers power-of-two head dims and value groups with unit channel strides
    (every real model); other layers take `_kivi_stage_kernel`."""
    pow2_dims = all(x == pow2(x) for x in (d, dv, gv))
    unit = q.stride(-1) == 1 and all(
        t.stride(-1) == 1 for t in (*body.tokens.values(), body.chunks["k_scale"], body.chunks["k_zero"]))
    return pow2_dims and unit


def kivi_supported(q: Tensor, body, store, tail_k: Tensor) -> str | None:
    """None when the fused kernel handles this layer, else the reason it does not. ``store`` is
    read for ``fused_decode`` (its body is plain KIVI), ``bits`` and ``value_group(dim)``."""
    if q.shape[1] % tail_k.shape[1]:
        return "query heads do not divide over KV heads"
    if body is None or len(body) == 0:
        return None  # only the full-precision tail: the varlen kernel
    if not getattr(store, "fused_decode", False):  # subclasses (MiKV) may decode differently
        return f"store {type(store).__name__} is not plain KIVI"
    if body.chunk_id is None:
        return "no chunk ids in the body"
    pack = 8 // store.bits
    d, dv = tail_k.shape[-1], body.tokens["v"].shape[-1] * pack
    if d % pack or d // pack < 16 or dv // pack < 16:
        return f"head dim {d} too small for the tensor-core dot at {store.bits} bits"
    if dv % store.value_group(dv):
        return "value groups do not divide the head dim"
    return None


def kivi_decode_attention(
    q: Tensor, body, store, tail_k: Tensor, tail_v: Tensor, scale: float,
    tail_lens: Tensor | None = None, body_lens: Tensor | None = None,
    num_splits: int | None = None, out: Tensor | None = None,
) -> Tensor:
    """Decode attention of ``q`` [B, Hq, D] over a KIVI layer: the encoded ``body``
    (`kvbudget.store.Body`, [B, Hkv, n] entries, decoded in registers with ``store``'s bits and
    groups) followed by the full-precision tail ``tail_k`` [B, Hkv, t, D] / ``tail_v`` [B, Hkv, t, Dv].

    ``body_lens`` / ``tail_lens`` [B, Hkv] (optional): entries held per head in the body / tail
    (default: all ``n`` / ``t``; a static-capacity layout passes them). ``num_splits`` forces the
    body's split count; ``out`` [B, Hq, Dv] receives the result when given. Same result as ``body.decode(store, dtype)``, concatenation with the tail
    and attention in float32. No host sync (split counts come from shapes).
    """
    if (reason := kivi_supported(q, body, store, tail_k)) is not None:
        raise ValueError(f"fused KIVI kernel cannot run: {reason}")
    b, hkv, t, d = tail_k.shape
    hq, dv = q.shape[1], tail_v.shape[-1]
    if body is None or len(body) == 0:
        lens = tail_lens if tail_lens is not None else torch.full((b, hkv), t, dtype=torch.int32, device=q.device)
        return decode_attention(q, tail_k, tail_v, lens, scale, out=out)
    n = len(body)
    bits = store.bits
    pack = 8 // bits
    gv = store.value_group(dv)
    fold = fold_supported(q, body, d, dv, gv)
    if fold:
        block_n, warps, stages, waves, maxnreg = FOLD_CONFIG_FP32 if q.dtype == torch.float32 else FOLD_CONFIG
    else:
        block_n, warps, stages, waves, maxnreg = GATHER_CONFIG
    regs = {"maxnreg": maxnreg} if maxnreg else {}
    sms = num_sms(q.device)
    if num_splits is None and fold:
        s_body, body_split = fold_splits(b * hkv, n, block_n, sms * waves)
    elif num_splits is None:
        # choose_splits aims at 2 programs per SM; `waves` / 2 times that many here.
        s_body, body_split = choose_splits(b * hkv, n, block_n, sms * waves // 2)
    else:
        s_body, body_split = num_splits, max(block_n, -(-n // num_splits // block_n) * block_n)
    tail_block = TAIL_BLOCK_FOLD if fold else (64 if d <= 128 else 32)
    s_tail, tail_split = choose_splits(b * hkv, t, tail_block, sms) if t > 0 else (0, 0)
    part_o, part_lse = new_partials(q, s_body + s_tail, dv)

    kc, vc = body.tokens["k"], body.tokens["v"]
    vs, vz = body.tokens["v_scale"], body.tokens["v_zero"]
    ks, kz = body.chunks["k_scale"], body.chunks["k_zero"]
    if vs.stride() != vz.stride():
        vs, vz = vs.contiguous(), vz.contiguous()
    if ks.stride() != kz.stride():
        ks, kz = ks.contiguous(), kz.contiguous()
    cid = body.chunk_id
    blens = body_lens.reshape(-1) if body_lens is not None else cid  # dummy pointer when absent
    group = hq // hkv
    args = (
        q, kc, vc, vs, vz, cid, ks, kz, blens, part_o, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        *kc.stride(), *vc.stride(), *vs.stride(), *cid.stride(), *ks.stride(),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        hkv, group, n,
    )
    if fold:
        # One launch for the body and the tail (its splits take the slots after the body's).
        tk_, tv_ = (tail_k, tail_v) if t > 0 else (q, q)
        tlens = tail_lens.reshape(-1) if tail_lens is not None else cid  # dummy pointer when absent
        _kivi_fold_kernel[(b * hkv, s_body + s_tail)](
            *args, body_split, scale * LOG2E, tk_, tv_, tlens,
            *(tail_k.stride() if t > 0 else (0,) * 4), *(tail_v.stride() if t > 0 else (0,) * 4),
            t, max(tail_split, 1), s_body,
            BITS=bits, PACK=pack, GV=gv, NG=dv // gv, BLOCK_N=block_n,
            BLOCK_D=d, BLOCK_DV=dv, G_PAD=max(FOLD_MIN_ROWS, pow2(group)), HAS_LENS=body_lens is not None,
            TAIL_LENS=tail_lens is not None, TAIL_BLOCK=tail_block,
            DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.device),
            # The PTX unpack: NVIDIA GPUs only (a ROCm build also reports is_cuda).
            ASM=q.is_cuda and torch.version.hip is None and q.dtype in (torch.bfloat16, torch.float16),
            num_warps=warps, num_stages=stages, **regs,
        )
    else:
        _kivi_stage_kernel[(b * hkv, s_body)](
            *args, d // pack, dv // pack, body_split, scale * LOG2E, BITS=bits, PACK=pack, GV=gv, BLOCK_N=block_n,
            BLOCK_DP=pow2(d // pack), BLOCK_DVP=pow2(dv // pack), G_PAD=max(MIN_ROWS, pow2(group)),
            HAS_LENS=body_lens is not None, DOT_PREC=dot_precision(q.dtype), UPCAST=upcast_dot(q.device),
            num_warps=warps, num_stages=stages, **regs,
        )
        if s_tail:
            lens = tail_lens.reshape(-1) if tail_lens is not None else torch.full((b * hkv,), t, dtype=torch.int32, device=q.device)
            launch_stage(q, tail_k, tail_v, None, lens, scale, part_o, part_lse, s_body, s_tail, tail_split, tail_block)
    out = q.new_empty(b, hq, dv) if out is None else out
    return combine(part_o, part_lse, out)
