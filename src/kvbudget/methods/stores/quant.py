"""Low-bit KV storage primitives: asymmetric min-max group quantization, bit packing, rotation.

Everything here is plain vectorised torch on any device; the stores in `methods/stores/` (KIVI, MiKV,
rotated KIVI) combine these pieces, and `store.py` keeps the encoded entries in the cache.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def quantize(x: Tensor, bits: int, dim: int | tuple[int, ...], valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max quantization of ``x`` with one (scale, zero) per slice reduced over ``dim``.

    Returns ``codes`` (uint8, same shape as ``x``, values in ``[0, 2**bits)``) and ``scale``,
    ``zero`` (``x.dtype``, ``keepdim`` shape) such that ``x ~= codes * scale + zero``.
    ``valid`` (broadcastable to ``x``, bool) excludes padding from the min/max statistics.
    """
    levels = (1 << bits) - 1
    xf = x.float()
    if valid is None:
        lo, hi = xf.amin(dim=dim, keepdim=True), xf.amax(dim=dim, keepdim=True)
    else:
        valid = valid.expand_as(xf)
        lo = xf.masked_fill(~valid, float("inf")).amin(dim=dim, keepdim=True)
        hi = xf.masked_fill(~valid, float("-inf")).amax(dim=dim, keepdim=True)
        # A slice with no valid entry (all padding) gets a harmless range.
        empty = torch.isinf(lo)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    # Times the float32 reciprocal, not a division: what torch does on CUDA for a division by a
    # Python scalar, written out so that CPU and the Triton codec (kernels/kivi_codec.py) agree.
    scale = ((hi - lo) * (1.0 / levels)).clamp(min=1e-8)
    codes = ((xf - lo) / scale).round_().clamp_(0, levels).to(torch.uint8)
    return codes, scale.to(x.dtype), lo.to(x.dtype)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """``codes * scale + zero`` in ``dtype`` (computed in float32)."""
    return (codes.float() * scale.float() + zero.float()).to(dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack ``bits``-bit codes along the last dim into uint8: [..., d] -> [..., d * bits / 8]."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    if 8 % bits or codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes of {bits} bits into whole bytes")
    grouped = codes.to(torch.uint8).view(*codes.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack`: [..., d * bits / 8] uint8 -> [..., d] uint8 codes."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & mask).flatten(-2)


def quantize_groups(x: Tensor, bits: int, group: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token quantization in groups of ``group`` channels (KIVI's values): ``x`` [..., d] ->
    packed codes [..., d * bits / 8] and scale, zero [..., d / group]."""
    d = x.shape[-1]
    if d % group:
        raise ValueError(f"head dim {d} is not a multiple of the group size {group}")
    codes, scale, zero = quantize(x.view(*x.shape[:-1], d // group, group), bits, dim=-1)
    return pack(codes.flatten(-2), bits), scale[..., 0], zero[..., 0]


def dequantize_groups(packed: Tensor, scale: Tensor, zero: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize_groups`."""
    codes = unpack(packed, bits)
    groups = scale.shape[-1]
    codes = codes.view(*codes.shape[:-1], groups, -1)
    return dequantize(codes, scale[..., None], zero[..., None], dtype).flatten(-2)


def hadamard(d: int, seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A random orthogonal Hadamard matrix ``H diag(s) / sqrt(d)`` (Sylvester construction, random
    signs ``s`` from ``seed``): x @ R spreads channel outliers over all channels, x @ R @ R.T = x."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"rotation needs a power-of-two head dim, got {d}")
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=gen).float() * 2 - 1
    return (h * signs[None, :] / math.sqrt(d)).to(device=device, dtype=dtype)


def value_group(head_dim: int, group: int) -> int:
    """Channels per value group: ``group``, or the whole head when it does not divide it."""
    return group if head_dim % group == 0 else head_dim
