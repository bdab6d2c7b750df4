"""KIVI's encode and decode as one Triton kernel each: quantize + pack, unpack + dequantize.

The torch path (`methods/stores/quant.py`, as `methods/stores/kivi.py` calls it) is a chain of ~25 element-wise
and reduction kernels over float32 temporaries: pad, cast, masked min / max, divide, round, clamp,
shift, sum for an encode; unpack, gather each entry's key-scale row, cast, multiply, add for a
decode. On an H100, 8B shape, they take 1.6 ms to encode or decode 8 layers of a 2048-token
block, and a KIVI-4 prefill at 32k took 24-31% longer than the full cache's (flushes, and the
body decoded for each block's attention). Here one program handles one chunk of ``group``
tokens of one (sequence, head) to encode (reading the full-precision keys and values once,
writing the packed codes and scales once), or 32 entries to decode: 0.2-0.3 ms for the same
work (docs/kernels.md, "KIVI encode and decode").

**Same numbers as the torch path, bit for bit.** Every step is the float32 operation torch does,
in the same order and rounding: the scale is ``(hi - lo) * (1 / levels)`` (what torch computes
on CUDA for a division by a Python scalar, and what `quant.quantize` now writes out so that CPU
does the same), codes ``round_half_even((x - lo) / scale)`` with an IEEE division (`div_rn`) and
rounding by adding and subtracting 1.5 * 2^23 (exact for the code range), dequantisation
``code * scale + zero`` with the product rounded before the sum (``enable_fp_fusion=False``: no
FMA contraction). Layouts are those of `KIVI.encode` (docs/kernels.md, "Fused KIVI decode").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def supported(head_dim: int, value_dim: int, bits: int, group: int, vgroup: int) -> str | None:
    """None if the kernels cover this layout (``group`` tokens per key chunk, ``vgroup`` channels
    per value group), else why not (the torch path runs)."""
    if bits not in (2, 4, 8):
        return f"{bits}-bit codes"
    per = 8 // bits
    for name, d in (("head dim", head_dim), ("value dim", value_dim), ("token group", group), ("value group", vgroup)):
        if d < per or d & (d - 1):
            return f"{name} {d} is not a power of two >= {per}"
    if value_dim % vgroup:
        return f"value dim {value_dim} is not a whole number of groups of {vgroup}"
    return None


@triton.jit
def _scale(lo, hi, inv_levels):
    return tl.maximum((hi - lo) * inv_levels, 1e-8)


@triton.jit
def _codes(x, lo, scale, LEVELS: tl.constexpr):
    """``round_half_even((x - lo) / scale)`` clamped to ``[0, LEVELS]``, as int32: adding and
    subtracting 1.5 * 2^23 rounds half to even exactly for |q| < 2^22 (larger ones clamp anyway)."""
    q = tl.math.div_rn(x - lo, scale)
    q = (q + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(q, 0.0), LEVELS).to(tl.int32)


@triton.jit
def _encode_kernel(k_ptr, v_ptr, valid_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr,
                   m, n_chunks, inv_levels,
                   D: tl.constexpr, DV: tl.constexpr, GROUP: tl.constexpr, VGROUP: tl.constexpr,
                   BITS: tl.constexpr, P: tl.constexpr, LEVELS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    t = c * GROUP + tl.arange(0, GROUP)
    in_seq = t < m
    shift = tl.arange(0, P) * BITS

    # Keys: per channel over the chunk's valid tokens. Tile [GROUP, D / P, P]: channel P*j + s.
    t3 = t[:, None, None]
    ch = tl.arange(0, D // P)[None, :, None] * P + tl.arange(0, P)[None, None, :]
    ok = in_seq[:, None, None]
    x = tl.load(k_ptr + bh * m * D + t3 * D + ch, mask=ok, other=0.0).to(tl.float32)
    valid = tl.load(valid_ptr + bh * m + t, mask=in_seq, other=0) != 0
    live = valid[:, None, None]
    lo = tl.min(tl.where(live, x, float("inf")), axis=0)  # [D / P, P]
    hi = tl.max(tl.where(live, x, float("-inf")), axis=0)
    empty = lo == float("inf")  # no valid token: a harmless range, as `quant.quantize`
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    scale = _scale(lo, hi, inv_levels)
    codes = _codes(x, lo[None], scale[None], LEVELS)
    packed = tl.sum(codes << shift[None, None, :], axis=2)  # disjoint bit fields: sum = or
    jb = tl.arange(0, D // P)[None, :]
    tl.store(kc_ptr + bh * m * (D // P) + t[:, None] * (D // P) + jb, packed.to(tl.uint8), mask=in_seq[:, None])
    row = tl.arange(0, D // P)[:, None] * P + tl.arange(0, P)[None, :]  # [D / P, P]
    tl.store(ks_ptr + (bh * n_chunks + c) * D + row, scale.to(ks_ptr.dtype.element_ty))
    tl.store(kz_ptr + (bh * n_chunks + c) * D + row, lo.to(kz_ptr.dtype.element_ty))

    # Values: per token over groups of VGROUP channels. Tile [GROUP, NG, VGROUP / P, P].
    NG: tl.constexpr = DV // VGROUP
    GP: tl.constexpr = VGROUP // P
    t4 = t[:, None, None, None]
    g4 = tl.arange(0, NG)[None, :, None, None]
    j4 = tl.arange(0, GP)[None, None, :, None]
    s4 = tl.arange(0, P)[None, None, None, :]
    ok4 = in_seq[:, None, None, None]
    y = tl.load(v_ptr + bh * m * DV + t4 * DV + g4 * VGROUP + j4 * P + s4, mask=ok4, other=0.0).to(tl.float32)
    vlo = tl.min(tl.min(y, axis=3), axis=2)  # [GROUP, NG]
    vhi = tl.max(tl.max(y, axis=3), axis=2)
    vscale = _scale(vlo, vhi, inv_levels)
    vcodes = _codes(y, vlo[:, :, None, None], vscale[:, :, None, None], LEVELS)
    vpacked = tl.sum(vcodes << shift[None, None, None, :], axis=3)  # [GROUP, NG, GP]
    t3v = t[:, None, None]
    byte = tl.arange(0, NG)[None, :, None] * GP + tl.arange(0, GP)[None, None, :]
    tl.store(vc_ptr + bh * m * (DV // P) + t3v * (DV // P) + byte, vpacked.to(tl.uint8), mask=in_seq[:, None, None])
    grp = tl.arange(0, NG)[None, :]
    t2 = t[:, None]
    tl.store(vs_ptr + bh * m * NG + t2 * NG + grp, vscale.to(vs_ptr.dtype.element_ty), mask=in_seq[:, None])
    tl.store(vz_ptr + bh * m * NG + t2 * NG + grp, vlo.to(vz_ptr.dtype.element_ty), mask=in_seq[:, None])


def encode(keys: Tensor, values: Tensor, valid: Tensor, bits: int, group: int, vgroup: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`KIVI.encode`'s tensors for ``keys`` [B, H, m, D], ``values`` [B, H, m, Dv] and ``valid``
    [B, H, m] (False: excluded from the key ranges): ``(tokens, chunks)`` as `Encoded` holds them."""
    b, h, m, d = keys.shape
    dv = values.shape[-1]
    per = 8 // bits
    n_chunks = -(-m // group)
    keys, values = keys.contiguous(), values.contiguous()
    valid = valid.expand(b, h, m).contiguous().view(torch.uint8)
    dev, dtype = keys.device, keys.dtype
    kc = torch.empty(b, h, m, d // per, dtype=torch.uint8, device=dev)
    ks = torch.empty(b, h, n_chunks, d, dtype=dtype, device=dev)
    kz = torch.empty_like(ks)
    vc = torch.empty(b, h, m, dv // per, dtype=torch.uint8, device=dev)
    vs = torch.empty(b, h, m, dv // vgroup, dtype=values.dtype, device=dev)
    vz = torch.empty_like(vs)
    if m:
        levels = (1 << bits) - 1
        _encode_kernel[(b * h, n_chunks)](
            keys, values, valid, kc, ks, kz, vc, vs, vz, m, n_chunks, 1.0 / levels,
            D=d, DV=dv, GROUP=group, VGROUP=vgroup, BITS=bits, P=per, LEVELS=float(levels),
            num_warps=4, enable_fp_fusion=False)
    return {"k": kc, "v": vc, "v_scale": vs, "v_zero": vz}, {"k_scale": ks, "k_zero": kz}


@triton.jit
def _decode_kernel(kc_ptr, id_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, ko_ptr, vo_ptr, n,
                   kc_r, kc_t, id_r, id_t, ks_r, kz_r, vc_r, vc_t, vs_r, vs_t, vz_r, vz_t,
                   ko_r, ko_t, vo_r, vo_t,
                   D: tl.constexpr, DV: tl.constexpr, VGROUP: tl.constexpr, BITS: tl.constexpr,
                   P: tl.constexpr, BLOCK: tl.constexpr, KEYS: tl.constexpr, VALUES: tl.constexpr):
    """Strides ``*_r`` per (batch x head) row and ``*_t`` per entry; every tensor's last dim is
    contiguous, and a chunk-table row is ``D`` wide. Tiles are [entries, channels] in channel
    order, so the outputs are written in long contiguous runs: each code's byte is read once per
    channel it holds (from L1), and the scale rows are gathered through the chunk ids."""
    bh = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t[:, None] < n
    mask = (1 << BITS) - 1
    if KEYS:
        c = tl.arange(0, D)[None, :]
        raw = tl.load(kc_ptr + bh * kc_r + t[:, None] * kc_t + c // P, mask=ok, other=0).to(tl.int32)
        codes = ((raw >> ((c % P) * BITS)) & mask).to(tl.float32)
        cid = tl.load(id_ptr + bh * id_r + t * id_t, mask=t < n, other=0).to(tl.int64)
        row = cid[:, None] * D + c
        scale = tl.load(ks_ptr + bh * ks_r + row, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(kz_ptr + bh * kz_r + row, mask=ok, other=0.0).to(tl.float32)
        out = codes * scale + zero
        tl.store(ko_ptr + bh * ko_r + t[:, None] * ko_t + c, out.to(ko_ptr.dtype.element_ty), mask=ok)
    if VALUES:
        c = tl.arange(0, DV)[None, :]
        raw = tl.load(vc_ptr + bh * vc_r + t[:, None] * vc_t + c // P, mask=ok, other=0).to(tl.int32)
        codes = ((raw >> ((c % P) * BITS)) & mask).to(tl.float32)
        g = c // VGROUP
        scale = tl.load(vs_ptr + bh * vs_r + t[:, None] * vs_t + g, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(vz_ptr + bh * vz_r + t[:, None] * vz_t + g, mask=ok, other=0.0).to(tl.float32)
        out = codes * scale + zero
        tl.store(vo_ptr + bh * vo_r + t[:, None] * vo_t + c, out.to(vo_ptr.dtype.element_ty), mask=ok)


def _rows(t: Tensor) -> tuple[Tensor, int, int]:
    """``t`` [B, H, n, ...] as (tensor, stride per batch x head row, stride per entry): batch and
    head merged into one row index and the last dim contiguous, copying only when the layout
    does not allow it (views sliced along n, such as a static decoder's buffers, never need it)."""
    if t.dim() > 3 and t.stride(-1) != 1:
        t = t.contiguous()
    b, h = t.shape[:2]
    if h == 1:
        return t, t.stride(0), t.stride(2)
    if b > 1 and t.stride(0) != h * t.stride(1):
        t = t.contiguous()
    return t, t.stride(1), t.stride(2)


def decode(tokens: dict[str, Tensor], chunk_id: Tensor, chunks: dict[str, Tensor], bits: int, vgroup: int,
           dtype: torch.dtype, keys: bool = True, values: bool = True,
           out: tuple[Tensor | None, Tensor | None] = (None, None)) -> tuple[Tensor | None, Tensor | None]:
    """`KIVI.decode` from the body as stored (chunk ids and the chunk table, not each entry's
    gathered row): keys [B, H, n, D] and values [B, H, n, Dv] in ``dtype`` (None where not asked
    for). ``out``: tensors to write them into (e.g. the front of a body + tail concatenation)."""
    kc, vc = tokens["k"], tokens["v"]
    b, h, n = kc.shape[:3]
    per = 8 // bits
    d, dv = kc.shape[-1] * per, vc.shape[-1] * per
    want = [keys, values]
    shapes = [(b, h, n, d), (b, h, n, dv)]
    results = [o if o is not None or not w else torch.empty(s, dtype=dtype, device=kc.device)
               for o, w, s in zip(out, want, shapes)]
    if n == 0 or not (keys or values):
        return tuple(r if w else None for r, w in zip(results, want))
    kc, kc_r, kc_t = _rows(kc)
    vc, vc_r, vc_t = _rows(vc)
    cid, id_r, id_t = _rows(chunk_id)
    ks, ks_r, _ = _rows(chunks["k_scale"])
    kz, kz_r, _ = _rows(chunks["k_zero"])
    vs, vs_r, vs_t = _rows(tokens["v_scale"])
    vz, vz_r, vz_t = _rows(tokens["v_zero"])
    # An output the kernel cannot address directly (`_rows` gives a copy) is written back after.
    ko, ko_r, ko_t = _rows(results[0]) if keys else (kc, 0, 0)
    vo, vo_r, vo_t = _rows(results[1]) if values else (vc, 0, 0)
    block = 32
    _decode_kernel[(b * h, triton.cdiv(n, block))](
        kc, cid, ks, kz, vc, vs, vz, ko, vo, n,
        kc_r, kc_t, id_r, id_t, ks_r, kz_r, vc_r, vc_t, vs_r, vs_t, vz_r, vz_t, ko_r, ko_t, vo_r, vo_t,
        D=d, DV=dv, VGROUP=vgroup, BITS=bits, P=per, BLOCK=block, KEYS=keys, VALUES=values,
        num_warps=4, enable_fp_fusion=False)
    for r, written_to, w in zip(results, (ko, vo), want):
        if w and written_to is not r:
            r.copy_(written_to)
    return tuple(r if w else None for r, w in zip(results, want))
