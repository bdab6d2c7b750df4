"""The block loop of the fused KIVI decode kernel: codes by sub-position, scales folded on both sides.

`kivi_decode._kivi_fold_kernel` runs it over each split of a layer's encoded body
(`kivi_decode`'s docstrings give the layout and the split-K scheme). How a block of entries is
decoded is where such a kernel spends its time (docs/kernels.md):

* **No reshape.** Byte ``j`` holds channels ``P*j + s`` (``P = 8 / bits`` sub-positions ``s``).
  Instead of interleaving the unpacked codes back into channel order (a reshape that costs a
  byte extraction and a layout change per code), each sub-position ``s`` stays its own
  ``[N, D/P]`` tile and meets the matching strided part of the query, ``q[:, P*j + s]``: the
  logits are a sum of ``P`` tensor-core dots with ``K = D/P``.
* **Four instructions per pair of codes.** On the GPU, four bytes at a time, each byte's field is
  moved into the mantissa of 1.0 and ``1 + centre / 2**bits`` subtracted in packed bf16/fp16
  arithmetic (`_unpack_asm`: prmt, shift, lop3, sub per two codes): ``(code - centre) / 2**bits``
  exactly, with no integer-to-float conversion. The ``2**bits`` goes into the query (keys) and
  the probabilities (values), both exact.
* **Value scales in the probabilities.** ``v[t, c] = vs[t, g] (code - centre) + vz[t, g] +
  centre vs[t, g]`` with ``g = c // GV``: a block's value codes are read as ``[NG, GV/P, N]``
  (group, byte, entry) and meet ``p * vs[:, g]`` in one batched dot per sub-position; the zero
  points add ``sum_t p_t (vz + centre vs)[t, g]`` per group. No per-element value dequantisation;
  the value codes are centred on the middle of their range ((2^b - 1) / 2: half-integers, exact),
  which keeps the rounding of ``p * vs`` to the model dtype about as accurate as rounding the
  dequantised value.
* **Entries along the mma's M axis.** Logits are ``[N, G]`` and value accumulators
  ``[NG, GV/P, G]``: the 16 entries of a block fill the 16 rows of the tensor-core tile and the G
  (4) query rows pad to 8, where the other way round G padded to 16.
* **One warp per program, next block prefetched.** Nothing crosses warps (no barriers, no
  shared-memory reductions), and the next block's bytes and scales are loaded before this block's
  math: 8 programs resident per SM.

Keys, per chunk: ``q . k_t = sum_c (q_c s_c)(code - 2^(b-1)) +
q . (z + 2^(b-1) s)`` per chunk row, the lowest chunk id of a block first and every other id of
the block after it (blocks line up with KIVI's chunks of 32 unless entries were evicted).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .varlen_decode import mm


@triton.constexpr_function
def _unpack_asm(bits, s, centre, fp16):
    """PTX turning the 4 bytes of ``$2`` into 4 values ``(field_s - centre) / 2**bits`` in bf16
    (fp16 when ``fp16``) packed in ``$0``, ``$1``: each byte's field is moved into the mantissa of
    1.0 (the field's lowest bit worth ``2**-bits``), then ``1 + centre / 2**bits`` is subtracted.
    Exact: the results are small multiples of ``2**-bits``."""
    bits, s, centre = int(bits), int(s), float(centre)
    mant, one = (10, 0x3C00) if fp16 else (7, 0x3F80)
    shift = mant - bits - bits * s
    mask = ((1 << bits) - 1) << (mant - bits)
    k = one + int(centre * (1 << (mant - bits)))
    move = f"shl.b32 t, t, {shift};" if shift >= 0 else f"shr.b32 t, t, {-shift};"
    sub = "sub.rn.f16x2" if fp16 else "sub.rn.bf16x2"
    # prmt 0x4140 / 0x4342: bytes 0, 1 / 2, 3 into the low byte of each 16-bit lane.
    lane = f"{move} lop3.b32 t, t, {mask | mask << 16}, {one | one << 16}, 0xEA; {sub}"
    return (f"{{ .reg .b32 t, k; mov.b32 k, {k | k << 16}; prmt.b32 t, $2, 0, 0x4140; {lane} $0, t, k; "
            f"prmt.b32 t, $2, 0, 0x4342; {lane} $1, t, k; }}")


@triton.jit
def _part(bytes_, s: tl.constexpr, BITS: tl.constexpr, CENTRE: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """Codes of sub-position ``s`` of packed bytes as ``(code - CENTRE) / 2**BITS`` in DT (exact)."""
    if ASM and DT == tl.float16:
        out = tl.inline_asm_elementwise(_unpack_asm(BITS, s, CENTRE, True), "=r,=r,r", [bytes_],
                                        dtype=tl.float16, is_pure=True, pack=4)
    elif ASM:
        out = tl.inline_asm_elementwise(_unpack_asm(BITS, s, CENTRE, False), "=r,=r,r", [bytes_],
                                        dtype=tl.bfloat16, is_pure=True, pack=4)
    else:  # the interpreter and float32 models
        code = (bytes_.to(tl.int32) >> (s * BITS)) & ((1 << BITS) - 1)
        out = ((code.to(tl.float32) - CENTRE) * (1.0 / (1 << BITS))).to(DT)
    return out


@triton.jit
def _query_part(q_rows, offs_j, s: tl.constexpr, PACK: tl.constexpr, BITS: tl.constexpr, mask_g):
    """``2**BITS q[:, PACK*j + s]`` [G, D/PACK] float32 (the codes come divided by 2**BITS)."""
    q = tl.load(q_rows + offs_j[None, :] * PACK + s, mask=mask_g[:, None], other=0.0)
    return q.to(tl.float32) * (1 << BITS)


@triton.jit
def _chunk_logits(q0, q1, q2, q3, k0, k1, k2, k3, ks_row, kz_row, offs_j,
                  BITS: tl.constexpr, PACK: tl.constexpr, DT: tl.constexpr,
                  DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``q . k`` (before the softmax scale) of a block's entries [N, G] if all belonged to the
    chunk whose scale / zero rows start at ``ks_row`` / ``kz_row``: per sub-position s, the centred
    codes ``k_s`` [N, D/PACK] against the query part times that part's scales, rounded to DT, on
    tensor cores; plus the chunk's bias ``q . (z + 2**(BITS-1) s)``."""
    half: tl.constexpr = 1 << (BITS - 1)
    ch = offs_j * PACK
    sc = tl.load(ks_row + ch).to(tl.float32)
    zc = tl.load(kz_row + ch).to(tl.float32)
    out = mm(k0, tl.trans((q0 * sc[None, :]).to(DT)), DOT_PREC, UPCAST)
    bias = q0 * (zc + half * sc)[None, :]
    if PACK >= 2:
        sc = tl.load(ks_row + ch + 1).to(tl.float32)
        zc = tl.load(kz_row + ch + 1).to(tl.float32)
        out += mm(k1, tl.trans((q1 * sc[None, :]).to(DT)), DOT_PREC, UPCAST)
        bias += q1 * (zc + half * sc)[None, :]
    if PACK >= 4:
        sc = tl.load(ks_row + ch + 2).to(tl.float32)
        zc = tl.load(kz_row + ch + 2).to(tl.float32)
        out += mm(k2, tl.trans((q2 * sc[None, :]).to(DT)), DOT_PREC, UPCAST)
        bias += q2 * (zc + half * sc)[None, :]
        sc = tl.load(ks_row + ch + 3).to(tl.float32)
        zc = tl.load(kz_row + ch + 3).to(tl.float32)
        out += mm(k3, tl.trans((q3 * sc[None, :]).to(DT)), DOT_PREC, UPCAST)
        bias += q3 * (zc + half * sc)[None, :]
    return out + tl.sum(bias, 1)[None, :] * (1.0 / (1 << BITS))


@triton.jit
def _value_dot(acc, alpha3, pg, vb3, s: tl.constexpr, BITS: tl.constexpr, CENTRE: tl.constexpr, DT: tl.constexpr,
               ASM: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One sub-position's value accumulator [NG, GV/P, G] after one more block: codes [NG, GV/P, N]
    times ``pg`` [NG, N, G], the probabilities times each group's value scales."""
    return acc * alpha3 + mm(_part(vb3, s, BITS, CENTRE, DT, ASM), pg, DOT_PREC, UPCAST)


@triton.jit
def _store_value_part(po_rows, acc, zacc, inv_l, offs_grp, offs_jj, s: tl.constexpr, PACK: tl.constexpr,
                      GVP: tl.constexpr, mask_g):
    """Channels ``PACK * (g * GVP + jj) + s`` of the normalised partial output."""
    ch = PACK * (offs_grp[:, None, None] * GVP + offs_jj[None, :, None]) + s  # [NG, GVP, 1]
    tl.store(po_rows + ch, (acc + zacc[:, None, :]) * inv_l[None, None, :], mask=mask_g[None, None, :])


@triton.jit
def kivi_parts_body(
    q_ptr, kc_base, vc_base, vs_base, vz_base, cid_base, ks_base, kz_base, po_ptr, plse_ptr,
    b, qhead, mask_g, lo, hi, slot,
    stride_qb, stride_qh, stride_kcn, stride_vcn, stride_vsn, stride_cn, stride_tc,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, qk_scale,
    BITS: tl.constexpr, PACK: tl.constexpr, GV: tl.constexpr, NG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, G_PAD: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, ASM: tl.constexpr,
):
    """Entries ``lo .. hi`` of one (batch, KV head)'s body into split slot ``slot``. The tiles
    hold the entries along the mma's M axis (16 rows, all used) and the G query rows along N
    (padded to 8): logits [N, G], value accumulators [NG, GV/P, G]."""
    DP: tl.constexpr = BLOCK_D // PACK
    GVP: tl.constexpr = GV // PACK
    KCENTRE: tl.constexpr = 1 << (BITS - 1)
    VCENTRE: tl.constexpr = ((1 << BITS) - 1) / 2
    BIG: tl.constexpr = 2147483647
    offs_j = tl.arange(0, DP)
    offs_jj = tl.arange(0, GVP)
    offs_grp = tl.arange(0, NG)
    offs_bn = tl.arange(0, BLOCK_N)
    q_rows = q_ptr + b * stride_qb + qhead[:, None] * stride_qh
    dt = q_ptr.dtype.element_ty
    q0 = _query_part(q_rows, offs_j, 0, PACK, BITS, mask_g)
    q1 = q0
    q2 = q0
    q3 = q0
    if PACK >= 2:
        q1 = _query_part(q_rows, offs_j, 1, PACK, BITS, mask_g)
    if PACK >= 4:
        q2 = _query_part(q_rows, offs_j, 2, PACK, BITS, mask_g)
        q3 = _query_part(q_rows, offs_j, 3, PACK, BITS, mask_g)
    vcol = offs_grp[:, None, None] * GVP + offs_jj[None, :, None]  # value bytes as [NG, GVP, N]

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc0 = tl.zeros([NG, GVP, G_PAD], tl.float32)
    acc1 = tl.zeros([NG, GVP, G_PAD], tl.float32)
    acc2 = tl.zeros([NG, GVP, G_PAD], tl.float32)
    acc3 = tl.zeros([NG, GVP, G_PAD], tl.float32)
    zacc = tl.zeros([NG, G_PAD], tl.float32)
    n_mask = lo + offs_bn < hi
    cid, kb, vb3, vs, vz = _load_block(kc_base, vc_base, vs_base, vz_base, cid_base, lo, hi, offs_bn, offs_j,
                                       offs_grp, vcol, stride_kcn, stride_vcn, stride_vsn, stride_cn)
    for n0 in range(lo, hi, BLOCK_N):
        # The next block's loads go out before this block's math (measured: KIVI-2 1.24x faster at
        # 32k, KIVI-4 unchanged; a program has only one warp to hide their latency).
        x_mask = n0 + BLOCK_N + offs_bn < hi
        cid_x, kb_x, vb3_x, vs_x, vz_x = _load_block(kc_base, vc_base, vs_base, vz_base, cid_base, n0 + BLOCK_N, hi,
                                                     offs_bn, offs_j, offs_grp, vcol,
                                                     stride_kcn, stride_vcn, stride_vsn, stride_cn)
        vsf = vs.to(tl.float32)
        vzf = vz.to(tl.float32)

        k0 = _part(kb, 0, BITS, KCENTRE, dt, ASM)
        k1 = k0
        k2 = k0
        k3 = k0
        if PACK >= 2:
            k1 = _part(kb, 1, BITS, KCENTRE, dt, ASM)
        if PACK >= 4:
            k2 = _part(kb, 2, BITS, KCENTRE, dt, ASM)
            k3 = _part(kb, 3, BITS, KCENTRE, dt, ASM)
        c0 = tl.min(tl.where(n_mask, cid, BIG), 0)
        c1 = tl.max(tl.where(n_mask, cid, 0), 0)
        qk = _chunk_logits(q0, q1, q2, q3, k0, k1, k2, k3, ks_base + c0.to(tl.int64) * stride_tc,
                           kz_base + c0.to(tl.int64) * stride_tc, offs_j, BITS, PACK, dt, DOT_PREC, UPCAST)
        # Other chunks of the block, highest first (ids in any order, with gaps, all work).
        c = c1
        while c > c0:
            rows_c = _chunk_logits(q0, q1, q2, q3, k0, k1, k2, k3, ks_base + c.to(tl.int64) * stride_tc,
                                   kz_base + c.to(tl.int64) * stride_tc, offs_j, BITS, PACK, dt, DOT_PREC, UPCAST)
            qk = tl.where(cid[:, None] == c, rows_c, qk)
            c = tl.max(tl.where(n_mask & (cid < c), cid, 0), 0)

        qk = tl.where(n_mask[:, None], qk * qk_scale, float("-inf"))  # [N, G]
        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        p3 = p[None, :, :]  # [1, N, G]
        pg = (p3 * (vsf * (1 << BITS))[:, :, None]).to(dt)  # [NG, N, G]
        zacc = zacc * alpha[None, :] + tl.sum(p3 * (vzf + VCENTRE * vsf)[:, :, None], 1)
        alpha3 = alpha[None, None, :]
        acc0 = _value_dot(acc0, alpha3, pg, vb3, 0, BITS, VCENTRE, dt, ASM, DOT_PREC, UPCAST)
        if PACK >= 2:
            acc1 = _value_dot(acc1, alpha3, pg, vb3, 1, BITS, VCENTRE, dt, ASM, DOT_PREC, UPCAST)
        if PACK >= 4:
            acc2 = _value_dot(acc2, alpha3, pg, vb3, 2, BITS, VCENTRE, dt, ASM, DOT_PREC, UPCAST)
            acc3 = _value_dot(acc3, alpha3, pg, vb3, 3, BITS, VCENTRE, dt, ASM, DOT_PREC, UPCAST)
        m_i = m_new
        n_mask, cid, kb, vb3, vs, vz = x_mask, cid_x, kb_x, vb3_x, vs_x, vz_x

    nonempty = l_i > 0.0
    inv_l = 1.0 / tl.where(nonempty, l_i, 1.0)
    po_rows = po_ptr + b * stride_ob + qhead[None, None, :] * stride_oh + slot * stride_os  # [1, 1, G]
    _store_value_part(po_rows, acc0, zacc, inv_l, offs_grp, offs_jj, 0, PACK, GVP, mask_g)
    if PACK >= 2:
        _store_value_part(po_rows, acc1, zacc, inv_l, offs_grp, offs_jj, 1, PACK, GVP, mask_g)
    if PACK >= 4:
        _store_value_part(po_rows, acc2, zacc, inv_l, offs_grp, offs_jj, 2, PACK, GVP, mask_g)
        _store_value_part(po_rows, acc3, zacc, inv_l, offs_grp, offs_jj, 3, PACK, GVP, mask_g)
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(plse_ptr + b * stride_lb + qhead * stride_lh + slot, lse, mask=mask_g)


@triton.jit
def _load_block(kc_base, vc_base, vs_base, vz_base, cid_base, n0, hi, offs_bn, offs_j, offs_grp, vcol,
                stride_kcn, stride_vcn, stride_vsn, stride_cn):
    """A block's chunk ids [N], key bytes [N, D/P], value bytes [NG, GV/P, N] and value scales and
    zero points [NG, N] (in their stored dtype)."""
    n_mask = n0 + offs_bn < hi
    rows = (n0 + offs_bn).to(tl.int64)
    cid = tl.load(cid_base + rows * stride_cn, mask=n_mask, other=0).to(tl.int32)
    kb = tl.load(kc_base + rows[:, None] * stride_kcn + offs_j[None, :], mask=n_mask[:, None], other=0)
    vb3 = tl.load(vc_base + rows[None, None, :] * stride_vcn + vcol, mask=n_mask[None, None, :], other=0)
    vsz = rows[None, :] * stride_vsn + offs_grp[:, None]
    vs = tl.load(vs_base + vsz, mask=n_mask[None, :], other=0.0)
    vz = tl.load(vz_base + vsz, mask=n_mask[None, :], other=0.0)
    return cid, kb, vb3, vs, vz
