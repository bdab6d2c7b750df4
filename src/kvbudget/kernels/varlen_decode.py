"""Triton decode attention over KV heads that hold different numbers of entries (split-K).

One new query token per sequence attends to the entries its KV head holds. Every (batch, KV head)
has its own length, so a padded tensor would waste reads on the padding; here each program walks
only the entries its head really holds.

Layouts
-------
* ragged (`varlen_decode_attention`): flat ``k [N, D]``, ``v [N, Dv]``; head ``i = b * Hkv + h``
  holds rows ``starts[i] .. starts[i] + lens[i] - 1``.
* dense static capacity (`decode_attention`): ``k [B, Hkv, cap, D]``; head (b, h) holds its first
  ``lens[b, h]`` rows (the ragged layout with ``starts = (b * Hkv + h) * cap``, read through the
  tensor's strides so a view of a larger buffer works without a copy).

Queries ``q [B, Hq, D]`` with grouped-query attention: query heads ``h*g .. h*g+g-1`` share KV
head ``h`` (``g = Hq / Hkv``, transformers' ``repeat_kv`` order).

What some models add to softmax attention (ragged layout): logit softcapping (Gemma 2:
``cap * tanh(s / cap)``), one sink logit per query head in the softmax's denominator (GPT-OSS),
and a sliding window by position (``kpos [N]`` per entry, ``qpos [B]`` per query: entries at
``pos <= qpos - window`` are masked).

Algorithm (flash-decoding)
--------------------------
Stage 1, grid ``(B * Hkv, splits)``: a program takes one KV head and one slice of its entries and
computes, for all ``g`` query heads of the group at once (so K/V are read once per group, the
``g`` rows padded to 16 for the tensor-core dot), an online softmax in float32. It writes the
normalised partial output and its log-sum-exp (base 2) to float32 scratch. Stage 2, grid
``(B * Hq,)``: merges the splits by their LSE. A slice with no entries writes LSE = -inf and a
zero partial, so a head of length 0 yields zeros, never NaN.

The number of splits is chosen on the host from a Python int (the longest length the caller
allows, e.g. the static capacity), never from ``lens``: no host sync and no data-dependent shape,
so the call can be captured in a CUDA graph. The last split of every head runs to the head's
end, so a too-small ``max_len`` costs speed, never correctness.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
# Rows of the query tile: the g query heads of one KV head, padded so tl.dot gets M >= 16.
MIN_ROWS = 16
MAX_SPLITS = 128


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM; CPU/interpreter: 132)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 132


def choose_splits(programs: int, max_len: int, block_n: int, sms: int) -> tuple[int, int]:
    """(splits, entries per split) so that ``programs * splits`` fills about two waves of ``sms``
    without creating splits that are certain to be empty. ``split_len`` is a multiple of block_n."""
    blocks = max(1, -(-max_len // block_n))
    want = max(1, -(-2 * sms // max(programs, 1)))
    splits = max(1, min(blocks, want, MAX_SPLITS))
    per = -(-blocks // splits)
    splits = -(-blocks // per)
    return splits, per * block_n


def pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs: exact products (the GPU default, tf32, would cost ~1e-3 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(device: torch.device) -> bool:
    """True off-GPU, i.e. under the Triton interpreter: its tl.dot multiplies bfloat16 operands as
    their raw uint16 bits (triton 3.6), so the operands, already rounded to the input dtype, go
    to the dot as float32 instead. The products are the same; only the GPU uses tensor cores."""
    return device.type != "cuda"


@triton.jit
def mm(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with a float32 result."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=DOT_PREC)
    return out


@triton.jit
def _varlen_stage_kernel(
    q_ptr, k_ptr, v_ptr, starts_ptr, lens_ptr, po_ptr, plse_ptr, kpos_ptr, qpos_ptr, sink_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    H_KV, GROUP, D, DV, split_len, split_offset, qk_scale, softcap, window,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    G_PAD: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H_KV
    h = pid_bh % H_KV
    length = tl.load(lens_ptr + pid_bh).to(tl.int32)
    if VARLEN:
        start = tl.load(starts_ptr + pid_bh).to(tl.int64)
        k_base = k_ptr + start * stride_kn
        v_base = v_ptr + start * stride_vn
    else:
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh

    lo = pid_s * split_len
    hi = tl.minimum(length, lo + split_len)
    # The last split runs to the end of the head: a max_len below the real length stays correct.
    hi = tl.where(pid_s == tl.num_programs(1) - 1, length, hi)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_g = offs_g < GROUP
    qhead = h * GROUP + offs_g
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + qhead[:, None].to(tl.int64) * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=mask_g[:, None] & (offs_d[None, :] < D), other=0.0)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    if HAS_SINKS:  # the sink: one more logit in the first split's softmax, with a zero value
        sink = tl.load(sink_ptr + qhead, mask=mask_g, other=0.0).to(tl.float32) * 1.4426950408889634
        first_split = mask_g & (pid_s == 0)
        m_i = tl.where(first_split, sink, m_i)
        l_i = tl.where(first_split, 1.0, l_i)
    if HAS_WINDOW:  # entries at positions <= oldest are outside the query's window
        oldest = tl.load(qpos_ptr + b).to(tl.int64) - window
    acc = tl.zeros([G_PAD, BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        rows = offs_n.to(tl.int64)
        k = tl.load(
            k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=mask_n[:, None] & (offs_d[None, :] < D), other=0.0,
        )
        qk = mm(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale  # [G_PAD, BLOCK_N], log2 units
        if HAS_SOFTCAP:  # cap * tanh(s / cap) on the natural-log logits s, tanh(x) = 2 sigmoid(2x) - 1
            x = qk * (0.6931471805599453 / softcap)
            qk = (softcap * 1.4426950408889634) * (2.0 * tl.sigmoid(2.0 * x) - 1.0)
        valid = mask_n
        if HAS_WINDOW:
            kpos = tl.load(kpos_ptr + start + rows, mask=mask_n, other=0).to(tl.int64)
            valid = valid & (kpos > oldest)
        qk = tl.where(valid[None, :], qk, float("-inf"))
        # A block may be wholly masked (a window): keep the exponents finite then.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=mask_n[:, None] & (offs_dv[None, :] < DV), other=0.0,
        )
        acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, DOT_PREC, UPCAST)
        m_i = m_new

    store_partial(po_ptr, plse_ptr, acc, m_i, l_i, b, qhead, mask_g, offs_dv, DV, split_offset + pid_s,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh)


@triton.jit
def store_partial(po_ptr, plse_ptr, acc, m_i, l_i, b, qhead, mask_g, offs_dv, DV, slot,
                   stride_ob, stride_oh, stride_os, stride_lb, stride_lh):
    """Write one split's normalised output and base-2 LSE; an empty split: zeros and -inf."""
    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    row = b.to(tl.int64) * stride_ob + qhead.to(tl.int64) * stride_oh + slot * stride_os
    tl.store(po_ptr + row[:, None] + offs_dv[None, :], out, mask=mask_g[:, None] & (offs_dv[None, :] < DV))
    lrow = b.to(tl.int64) * stride_lb + qhead.to(tl.int64) * stride_lh + slot
    tl.store(plse_ptr + lrow, lse, mask=mask_g)


@triton.jit
def _combine_kernel(
    po_ptr, plse_ptr, out_ptr,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    stride_outb, stride_outh, stride_outd,
    H_Q, DV, S,
    BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // H_Q
    h = pid % H_Q
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_s = offs_s < S
    lse = tl.load(plse_ptr + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_s,
                  mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: weights 0, output 0
    w = tl.exp2(lse - m)
    denom = tl.sum(w, 0)
    base = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o = tl.load(po_ptr + base + offs_s[:, None] * stride_os + offs_dv[None, :],
                mask=mask_s[:, None] & (offs_dv[None, :] < DV), other=0.0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0.0, denom, 1.0)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_outb + h.to(tl.int64) * stride_outh + offs_dv * stride_outd
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)


def new_partials(q: Tensor, splits: int, dv: int) -> tuple[Tensor, Tensor]:
    """Float32 scratch for ``splits`` partial results per query head: out [B, Hq, S, Dv], LSE [B, Hq, S]."""
    b, hq, _ = q.shape
    return (
        torch.empty(b, hq, splits, dv, device=q.device, dtype=torch.float32),
        torch.empty(b, hq, splits, device=q.device, dtype=torch.float32),
    )


def launch_stage(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor | None, lens: Tensor, scale: float,
    part_o: Tensor, part_lse: Tensor, split_offset: int, splits: int, split_len: int,
    block_n: int, softcap: float | None = None, sinks: Tensor | None = None, window: int | None = None,
    kpos: Tensor | None = None, qpos: Tensor | None = None,
) -> None:
    """Stage 1 into slots ``split_offset .. split_offset + splits - 1`` of the partial buffers.

    ``k``/``v``: [B, Hkv, cap, D] (``starts`` None) or flat [N, D] (``starts`` [B*Hkv]).
    ``softcap``, ``sinks`` [Hq], ``window`` with ``kpos`` [N] and ``qpos`` [B]: see the module
    docstring (the window needs the flat layout)."""
    if window and (starts is None or kpos is None or qpos is None):
        raise ValueError("a sliding window needs the flat (starts) layout, kpos and qpos")
    b, hq, d = q.shape
    if starts is None:
        hkv, dv = k.shape[1], v.shape[-1]
        sk, sv = k.stride(), v.stride()
    else:
        hkv, dv = lens.numel() // b, v.shape[-1]
        sk = (0, 0, k.stride(0), k.stride(1))
        sv = (0, 0, v.stride(0), v.stride(1))
    group = hq // hkv
    grid = (b * hkv, splits)
    _varlen_stage_kernel[grid](
        q, k, v, starts if starts is not None else lens, lens, part_o, part_lse,
        kpos if window else lens, qpos if window else lens, sinks if sinks is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        *sk, *sv,
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        hkv, group, d, dv, split_len, split_offset, scale * LOG2E, float(softcap or 1.0), int(window or 0),
        BLOCK_N=block_n, BLOCK_D=max(16, pow2(d)), BLOCK_DV=max(16, pow2(dv)),
        G_PAD=max(MIN_ROWS, pow2(group)), VARLEN=starts is not None, DOT_PREC=dot_precision(q.dtype),
        UPCAST=upcast_dot(q.device), HAS_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        HAS_WINDOW=bool(window),
        # 8 warps: with 4, ptxas (sm_90, D 128, bf16) needs 255 registers and spills.
        num_warps=8, num_stages=3,
    )


def combine(part_o: Tensor, part_lse: Tensor, out: Tensor) -> Tensor:
    """Stage 2: merge the splits of every query head by their LSE into ``out`` [B, Hq, Dv]."""
    b, hq, s, dv = part_o.shape
    _combine_kernel[(b * hq,)](
        part_o, part_lse, out,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        hq, dv, s,
        BLOCK_S=max(2, pow2(s)), BLOCK_DV=max(16, pow2(dv)), num_warps=4,
    )
    return out


def _check(q: Tensor, hkv: int, d: int) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    if q.shape[1] % hkv:
        raise ValueError(f"{q.shape[1]} query heads do not divide over {hkv} KV heads")
    if q.shape[2] != d:
        raise ValueError(f"query head dim {q.shape[2]} != key head dim {d}")


def _block_n(d: int) -> int:
    return 64 if d <= 128 else 32


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, scale: float,
    max_len: int | None = None, num_splits: int | None = None, out: Tensor | None = None,
) -> Tensor:
    """Decode attention over a static-capacity buffer, reading only the held entries.

    q [B, Hq, D]; k [B, Hkv, cap, D], v [B, Hkv, cap, Dv] (any strides); lens [B, Hkv] (int32 or
    int64): head (b, h) holds rows ``0 .. lens[b, h] - 1``. ``max_len`` (default ``cap``) sizes the
    split-K grid; ``num_splits`` forces the split count. Returns [B, Hq, Dv] in q's dtype
    (written into ``out`` when given, e.g. a CUDA graph's static buffer). No host sync: safe inside CUDA-graph capture.
    """
    b, hkv, cap, d = k.shape
    _check(q, hkv, d)
    lens = lens.reshape(-1)
    return _split_k(q, k, v, None, lens, scale, cap if max_len is None else max_len, num_splits, out)


def _split_k(q: Tensor, k: Tensor, v: Tensor, starts: Tensor | None, lens: Tensor, scale: float,
             max_len: int, num_splits: int | None, out: Tensor | None, **extras) -> Tensor:
    """Choose the splits, run the stage kernel into partials, combine them into ``out``."""
    b, hkv = q.shape[0], lens.numel() // q.shape[0]
    block_n = _block_n(k.shape[-1])
    if num_splits is None:
        splits, split_len = choose_splits(b * hkv, max_len, block_n, num_sms(q.device))
    else:
        splits, split_len = num_splits, max(block_n, -(-max_len // num_splits // block_n) * block_n)
    part_o, part_lse = new_partials(q, splits, v.shape[-1])
    launch_stage(q, k, v, starts, lens, scale, part_o, part_lse, 0, splits, split_len, block_n, **extras)
    out = q.new_empty(b, q.shape[1], v.shape[-1]) if out is None else out
    return combine(part_o, part_lse, out)


def varlen_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, lens: Tensor, scale: float,
    max_len: int | None = None, num_splits: int | None = None, out: Tensor | None = None,
    softcap: float | None = None, sinks: Tensor | None = None, window: int | None = None,
    kpos: Tensor | None = None, qpos: Tensor | None = None,
) -> Tensor:
    """Decode attention over ragged KV: q [B, Hq, D]; k [N, D], v [N, Dv]; starts [B*Hkv] (int64
    row of each head's first entry), lens [B*Hkv] (entries per head; b-major: i = b*Hkv + h).

    ``max_len`` (the longest head, or an upper bound) sizes the split-K grid; when None it is read
    from ``lens`` (one host sync: pass it inside a CUDA graph). Returns [B, Hq, Dv] in q's dtype
    (written into ``out`` when given). ``softcap``, ``sinks``, ``window`` / ``kpos`` / ``qpos``:
    see the module docstring.
    """
    b = q.shape[0]
    starts, lens = starts.reshape(-1), lens.reshape(-1)
    if lens.numel() % b:
        raise ValueError(f"{lens.numel()} head lengths do not divide over batch {b}")
    hkv, d = lens.numel() // b, k.shape[-1]
    _check(q, hkv, d)
    if max_len is None:
        max_len = int(lens.max()) if lens.numel() else 0
    return _split_k(q, k, v, starts, lens, scale, max_len, num_splits, out,
                    softcap=softcap, sinks=sinks, window=window, kpos=kpos, qpos=qpos)


__all__ = ["choose_splits", "decode_attention", "num_sms", "varlen_decode_attention"]
