"""KIVI (Liu et al. 2024): tuning-free asymmetric 2/4-bit quantization of the KV cache.

Keys are quantized per channel (each channel's min/max over a group of 32 tokens: key outliers
live in fixed channels), values per token (min/max over groups of 32 channels). Codes are packed
into bytes; scales and zero points are kept in the model's dtype and counted. The most recent
``residual`` tokens stay in full precision until a whole group of older tokens can be quantized.
"""

import torch
from torch import Tensor
from torch.nn import functional as F

from ..quant import (
    dequantize,
    dequantize_groups,
    pack,
    quantize,
    quantize_groups,
    unpack,
)
from ..store import Encoded, Store, register_store


def value_group(head_dim: int, group: int) -> int:
    """Channels per value group: ``group``, or the whole head when it does not divide it."""
    return group if head_dim % group == 0 else head_dim


@register_store("kivi", kivi2={"bits": 2}, kivi4={"bits": 4})
class KIVI(Store):
    paper = "KIVI (Liu et al. 2024)"
    summary = "keys per channel, values per token, asymmetric 2/4-bit in groups of 32, packed"
    saves = "bits per entry (16 -> 2 or 4, + scales)"

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128) -> None:
        super().__init__(residual)
        if bits not in (2, 4, 8):
            raise ValueError(f"kivi supports 2, 4 or 8 bits, got {bits}")
        self.bits, self.group, self.chunk = bits, group, group

    def encode(self, keys: Tensor, values: Tensor, valid: Tensor, queries: Tensor | None) -> Encoded:
        b, h, m, d = keys.shape
        pad = -m % self.group
        grouped = F.pad(keys, (0, 0, 0, pad)).view(b, h, -1, self.group, d)
        mask = F.pad(valid, (0, pad)).view(b, h, -1, self.group, 1)
        codes, scale, zero = quantize(grouped, self.bits, dim=3, valid=mask)
        key_codes = pack(codes.view(b, h, -1, d)[:, :, :m], self.bits)
        v_codes, v_scale, v_zero = quantize_groups(values, self.bits, value_group(d, self.group))
        return Encoded(
            tokens={"k": key_codes, "v": v_codes, "v_scale": v_scale, "v_zero": v_zero},
            chunks={"k_scale": scale[:, :, :, 0], "k_zero": zero[:, :, :, 0]},
        )

    def decode(self, tokens: dict[str, Tensor], chunks: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        values = dequantize_groups(tokens["v"], tokens["v_scale"], tokens["v_zero"], self.bits, dtype)
        return self.decode_keys(tokens, chunks, dtype), values

    def decode_keys(self, tokens: dict[str, Tensor], chunks: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        return dequantize(unpack(tokens["k"], self.bits), chunks["k_scale"], chunks["k_zero"], dtype)

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        elem = dtype.itemsize
        codes = 2 * head_dim * self.bits / 8
        value_scales = 2 * elem * head_dim / value_group(head_dim, self.group)
        key_scales = 2 * elem * head_dim / self.group  # one per channel, shared by a group of tokens
        return codes + value_scales + key_scales + 2  # + the entry's chunk id (int16)

    def describe(self) -> str:
        return f"kivi{self.bits}"
