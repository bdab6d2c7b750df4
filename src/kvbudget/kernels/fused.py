"""Triton kernels for the element-wise work of a decode step: RMSNorm, RoPE, SiLU*mul, and the
append of the new token to the static buffers.

Why: with the whole step in one CUDA graph (`kvbudget.static`), an 8B model's decode step on an
H100 still spent 2.15 of 8.6 ms in ~1170 tiny element-wise kernels (docs/benchmarks.md, "GPU
performance"): transformers' RMSNorm is 8 kernels (cast, pow, mean, add, rsqrt, mul, cast, mul),
RoPE 10 (mul, neg, cat, mul, add for q and for k), the MLP's activation 2, the cache append 4.
At batch 1 each one moves a few KiB, so each costs its ~2 us launch floor. One kernel each here.

Each kernel rounds where transformers' eager code rounds (a product of two bf16 tensors is one
bf16 rounding of the exact float32 product), so outputs equal the eager ones bit for bit except
for RMSNorm's mean, whose float32 summation order differs. That needs ``enable_fp_fusion=False``
at launch: by default the compiler contracts RoPE's ``mul, round, add`` into one ``fma.rn.bf16``,
which skips a rounding eager makes (measured on the H100: outputs 1 ulp off in places). `kvbudget.fusion` installs them on a
model; `kernels.reference` has nothing to add: the references are transformers' own functions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .varlen_decode import pow2


# --- RMSNorm ----------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_cols, eps, s_x, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    # transformers: (x * rsqrt(var + eps)).to(input dtype), then weight * that (in their common dtype).
    y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` over the last dim, as Llama's
    RMSNorm; the result has the dtype ``weight * x`` would have."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = pow2(n)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, n, eps, rows.stride(0), out.stride(0), BLOCK=block,
                                       num_warps=8 if block >= 4096 else 4, enable_fp_fusion=False)
    return out.view(x.shape)


# --- RoPE -------------------------------------------------------------------------------------
@triton.jit
def _rotate_heads(x_ptr, o_ptr, s_xh, s_oh, c1, c2, s1, s2,
                  H: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """All heads of one (batch, token) row: out = x*cos + rotate_half(x)*sin, rounded as eager."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    ok = (heads[:, None] < H) & (dims[None, :] < HALF)
    first = heads[:, None] * s_xh + dims[None, :]
    x1 = tl.load(x_ptr + first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + first + HALF, mask=ok, other=0.0).to(tl.float32)
    dt = o_ptr.dtype.element_ty
    # Each product and the sum are rounded to the model dtype, as the eager mul/mul/add are.
    o1 = ((x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)).to(dt)
    o2 = ((x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)).to(dt)
    out = heads[:, None] * s_oh + dims[None, :]
    tl.store(o_ptr + out, o1, mask=ok)
    tl.store(o_ptr + out + HALF, o2, mask=ok)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, M,
                 sq_b, sq_h, sq_m, sk_b, sk_h, sk_m, sqo_b, sqo_h, sqo_m, sko_b, sko_h, sko_m,
                 sc_b, sc_m, ss_b, ss_m,
                 HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // M).to(tl.int64)
    m = (pid % M).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    ok = dims < HALF
    c = cos_ptr + b * sc_b + m * sc_m + dims
    s = sin_ptr + b * ss_b + m * ss_m + dims
    c1 = tl.load(c, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(c + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(s, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(s + HALF, mask=ok, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * sq_b + m * sq_m, qo_ptr + b * sqo_b + m * sqo_m, sq_h, sqo_h, c1, c2, s1, s2,
                  HQ, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + b * sk_b + m * sk_m, ko_ptr + b * sko_b + m * sko_m, sk_h, sko_h, c1, c2, s1, s2,
                  HK, HALF, BLOCK_HK, BLOCK_HALF)


def rope_supported(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, unsqueeze_dim: int) -> bool:
    """Whether `apply_rope` covers these inputs (else the caller uses transformers' function):
    q/k ``[B, H, M, D]`` with unit stride on D, cos/sin ``[B or 1, M, D]`` broadcast over heads,
    one dtype everywhere (mixed dtypes would promote, which the kernel does not do)."""
    return (
        unsqueeze_dim == 1 and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and sin.shape == cos.shape
        and q.dtype == k.dtype == cos.dtype == sin.dtype and q.shape[-1] % 2 == 0
        and q.shape[-1] == k.shape[-1] == cos.shape[-1] and q.shape[0] == k.shape[0]
        and q.shape[2] == k.shape[2] == cos.shape[1] and cos.shape[0] in (1, q.shape[0])
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    )


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (``q * cos + rotate_half(q) * sin``
    and the same for k) in one kernel; check `rope_supported` first."""
    b, hq, m, d = q.shape
    hk = k.shape[1]
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if qo.stride(-1) != 1 or ko.stride(-1) != 1:
        qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    bc = 0 if cos.shape[0] == 1 else cos.stride(0)
    bs = 0 if sin.shape[0] == 1 else sin.stride(0)
    _rope_kernel[(b * m,)](
        q, k, cos, sin, qo, ko, m,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        bc, cos.stride(1), bs, sin.stride(1),
        HQ=hq, HK=hk, HALF=d // 2, BLOCK_HQ=pow2(hq), BLOCK_HK=pow2(hk), BLOCK_HALF=pow2(d // 2),
        num_warps=4, enable_fp_fusion=False,
    )
    return qo, ko


# --- SiLU(gate) * up --------------------------------------------------------------------------
@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n_cols, s_g, s_u, s_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(g_ptr + row * s_g + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * s_u + cols, mask=ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)  # eager silu rounds before the mul
    tl.store(out_ptr + row * s_o + cols, (act * u).to(dt), mask=ok)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` for ``[..., I]`` tensors of one dtype whose rows may be strided views
    (the two halves of one fused gate/up projection)."""
    n = gate.shape[-1]
    g, u = gate.reshape(-1, n), up.reshape(-1, n)
    if g.stride(-1) != 1:
        g = g.contiguous()
    if u.stride(-1) != 1:
        u = u.contiguous()
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    block = min(2048, pow2(n))
    _silu_mul_kernel[(g.shape[0], triton.cdiv(n, block))](g, u, out, n, g.stride(0), u.stride(0), out.stride(0),
                                                           BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out.view(*gate.shape[:-1], n)


# --- append one token to the static buffers ---------------------------------------------------
@triton.jit
def _append_kernel(k_ptr, v_ptr, keys_ptr, values_ptr, starts_ptr, lens_ptr, D, DV, s_k, s_v,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    i = tl.program_id(0)
    length = tl.load(lens_ptr + i)
    slot = tl.load(starts_ptr + i).to(tl.int64) + length
    d = tl.arange(0, BLOCK_D)
    tl.store(keys_ptr + slot * D + d, tl.load(k_ptr + i.to(tl.int64) * s_k + d, mask=d < D), mask=d < D)
    dv = tl.arange(0, BLOCK_DV)
    tl.store(values_ptr + slot * DV + dv, tl.load(v_ptr + i.to(tl.int64) * s_v + dv, mask=dv < DV), mask=dv < DV)
    tl.store(lens_ptr + i, length + 1)  # each program owns its head: no race


def static_append(key: Tensor, value: Tensor, keys: Tensor, values: Tensor, starts: Tensor, lens: Tensor) -> None:
    """Write row i of ``key [S, D]`` / ``value [S, Dv]`` at ``starts[i] + lens[i]`` of the flat
    buffers ``keys [N, D]`` / ``values [N, Dv]`` (contiguous, same dtype), then ``lens += 1``:
    `kvbudget.static.StaticLayer.update` in one kernel, with no host sync."""
    d, dv = keys.shape[1], values.shape[1]
    _append_kernel[(lens.numel(),)](key, value, keys, values, starts, lens, d, dv, key.stride(0), value.stride(0),
                                    BLOCK_D=pow2(d), BLOCK_DV=pow2(dv), num_warps=1)
