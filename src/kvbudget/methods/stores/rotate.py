"""Rotated quantization (the QuaRot / RotateKV idea): a fixed random Hadamard rotation spreads
the few outlier channels of the keys over all channels, so plain per-token low-bit groups work.

Keys are stored as ``quant(K R)`` with R orthogonal (Hadamard times random signs); R is rebuilt
from its seed, never stored. The papers rotate the queries the same way (``(Q R)(K R)^T = Q K^T``)
so a fused kernel never un-rotates; here decoding multiplies by ``R^T`` instead, which is the same
in exact arithmetic and keeps the model untouched. Values are quantized per token, as in KIVI.
"""

import torch
from torch import Tensor

from .quant import dequantize_groups, hadamard, quantize_groups, value_group
from ...kv.store import Encoded, Store, register_store


@register_store("rotate", rotate2={"bits": 2}, rotate4={"bits": 4})
class Rotate(Store):
    paper = "RotateKV / QuaRot (Ashkboos et al. 2024)"
    summary = "random Hadamard rotation of keys, then per-token 2/4-bit groups; exact before rounding"
    saves = "bits per entry (16 -> 2 or 4, + scales)"

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128, seed: int = 0) -> None:
        super().__init__(residual)
        if bits not in (2, 4, 8):
            raise ValueError(f"rotate supports 2, 4 or 8 bits, got {bits}")
        self.bits, self.group, self.seed = bits, group, seed
        self._rotations: dict[tuple, Tensor] = {}

    def rotation(self, d: int, device: torch.device) -> Tensor:
        key = (d, str(device))
        if key not in self._rotations:
            self._rotations[key] = hadamard(d, self.seed, device=device)
        return self._rotations[key]

    def encode(self, keys: Tensor, values: Tensor, valid: Tensor, queries: Tensor | None) -> Encoded:
        d = keys.shape[-1]
        rotated = keys.float() @ self.rotation(d, keys.device)
        k_codes, k_scale, k_zero = quantize_groups(rotated.to(keys.dtype), self.bits, value_group(d, self.group))
        v_codes, v_scale, v_zero = quantize_groups(values, self.bits, value_group(d, self.group))
        tokens = {"k": k_codes, "k_scale": k_scale, "k_zero": k_zero, "v": v_codes, "v_scale": v_scale, "v_zero": v_zero}
        return Encoded(tokens=tokens, chunks={})

    def decode(self, tokens: dict[str, Tensor], chunks: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        rotated = dequantize_groups(tokens["k"], tokens["k_scale"], tokens["k_zero"], self.bits, torch.float32)
        keys = (rotated @ self.rotation(rotated.shape[-1], rotated.device).T).to(dtype)
        values = dequantize_groups(tokens["v"], tokens["v_scale"], tokens["v_zero"], self.bits, dtype)
        return keys, values

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        groups = head_dim / value_group(head_dim, self.group)
        return 2 * head_dim * self.bits / 8 + 2 * 2 * groups * dtype.itemsize

    def describe(self) -> str:
        return f"rotate{self.bits}"
