"""KIVI (Liu et al. 2024): tuning-free asymmetric 2/4-bit quantization of the KV cache.

Keys are quantized per channel (each channel's min/max over a group of 32 tokens: key outliers
live in fixed channels), values per token (min/max over groups of 32 channels). Codes are packed
into bytes; scales and zero points are kept in the model's dtype and counted. The most recent
``residual`` tokens stay in full precision until a whole group of older tokens can be quantized.
"""

import os
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from ...kv.store import Encoded, Store, register_store
from .quant import dequantize, dequantize_groups, pack, quantize, quantize_groups, unpack, value_group

# Which encoder / decoder runs: "auto" the Triton codec (kernels/kivi_codec.py) for CUDA tensors
# and torch elsewhere, "triton" the codec everywhere (CPU through triton's interpreter: tests),
# "torch" never the codec. Read at every call.
def _codec_mode() -> str:
    mode = os.environ.get("KVBUDGET_KIVI_CODEC", "auto").strip().lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"KVBUDGET_KIVI_CODEC must be auto, triton or torch, got '{mode}'")
    return mode


@register_store("kivi", kivi2={"bits": 2}, kivi4={"bits": 4})
class KIVI(Store):
    paper = "KIVI (Liu et al. 2024)"
    summary = "keys per channel, values per token, asymmetric 2/4-bit in groups of 32, packed"
    saves = "bits per entry (16 -> 2 or 4, + scales)"
    # The body is plain KIVI: the fused decode kernel reads it as stored (a subclass that decodes
    # differently sets this False).
    fused_decode = True

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128) -> None:
        super().__init__(residual)
        if bits not in (2, 4, 8):
            raise ValueError(f"kivi supports 2, 4 or 8 bits, got {bits}")
        self.bits, self.group, self.chunk = bits, group, group

    def value_group(self, head_dim: int) -> int:
        """Channels per value group of a head of ``head_dim`` channels."""
        return value_group(head_dim, self.group)

    def codec(self, x: Tensor, head_dim: int, value_dim: int):
        """The Triton codec module when it encodes / decodes this layer's tensors, else None."""
        mode = _codec_mode()
        if mode == "torch" or (mode == "auto" and not x.is_cuda):
            return None
        try:
            from ...kernels import kivi_codec
        except (ImportError, RuntimeError, OSError, AttributeError):  # no usable triton
            return None
        if kivi_codec.supported(head_dim, value_dim, self.bits, self.group, value_group(value_dim, self.group)):
            return None
        return kivi_codec

    def encode(self, keys: Tensor, values: Tensor, valid: Tensor, queries: Tensor | None) -> Encoded:
        codec = self.codec(keys, keys.shape[-1], values.shape[-1])
        if codec is not None:
            vgroup = value_group(values.shape[-1], self.group)
            return Encoded(*codec.encode(keys, values, valid, self.bits, self.group, vgroup))
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

    def decode_body(self, body, dtype: torch.dtype, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        codec = self._body_codec(body)
        if codec is None:
            return super().decode_body(body, dtype, out)
        return codec(dtype, out=out or (None, None))

    def decode_body_keys(self, body, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        codec = self._body_codec(body)
        if codec is None:
            return super().decode_body_keys(body, dtype, out)
        return codec(dtype, values=False, out=(out, None))[0]

    def _body_codec(self, body):
        """The Triton decode of ``body`` (its arguments bound) when the codec covers it, else None."""
        per = 8 // self.bits
        head_dim, value_dim = body.tokens["k"].shape[-1] * per, body.tokens["v"].shape[-1] * per
        codec = self.codec(body.tokens["k"], head_dim, value_dim)
        if codec is None:
            return None
        return partial(codec.decode, body.tokens, body.chunk_id, body.chunks, self.bits, value_group(value_dim, self.group))

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        elem = dtype.itemsize
        codes = 2 * head_dim * self.bits / 8
        value_scales = 2 * elem * head_dim / value_group(head_dim, self.group)
        key_scales = self.chunk_bytes(head_dim, dtype) / self.group  # shared by a group of tokens
        return codes + value_scales + key_scales + 2  # + the entry's chunk id (int16)

    def chunk_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        return 2 * dtype.itemsize * head_dim  # a key scale and zero point per channel

    def describe(self) -> str:
        return f"kivi{self.bits}"
