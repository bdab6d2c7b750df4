"""Decode-attention kernels: Triton on CUDA, a pure-torch reference path everywhere else.

* `decode_attention` / `varlen_decode_attention`: one query token per sequence over KV heads that
  each hold a different number of entries (static-capacity buffer or flat ragged storage), read
  without padding waste (`varlen_decode`).
* `kivi_decode_attention`: the same over a KIVI layer, dequantising the packed body in registers
  and merging it with the full-precision tail (`kivi_decode`).

Each function takes CUDA or CPU tensors: on CUDA tensors with Triton importable the Triton kernel
runs; otherwise (CPU, no Triton, or a layout the fused kernel does not cover) the `reference_*`
version with the same signature and outputs. See docs/kernels.md.
"""

from __future__ import annotations

from torch import Tensor

from .reference import reference_decode_attention, reference_kivi_decode_attention, reference_varlen_decode_attention

try:  # Triton is optional: CPU-only installs and non-Linux platforms run the torch path.
    from . import kivi_decode as _kivi
    from . import varlen_decode as _varlen

    HAVE_TRITON = True
except (ImportError, RuntimeError, OSError, AttributeError):  # absent, or fails to initialise
    _kivi = _varlen = None
    HAVE_TRITON = False


def _on_triton(q: Tensor) -> bool:
    return HAVE_TRITON and q.is_cuda


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, scale: float,
    max_len: int | None = None, num_splits: int | None = None, out: Tensor | None = None,
) -> Tensor:
    """q [B, Hq, D] over k/v [B, Hkv, cap, D|Dv] where head (b, h) holds its first lens[b, h]
    entries -> [B, Hq, Dv] in q's dtype. CUDA-graph safe on the Triton path."""
    if _on_triton(q):
        return _varlen.decode_attention(q, k, v, lens, scale, max_len, num_splits, out)
    return reference_decode_attention(q, k, v, lens, scale, max_len, num_splits, out)


def varlen_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, lens: Tensor, scale: float,
    max_len: int | None = None, num_splits: int | None = None, out: Tensor | None = None,
    softcap: float | None = None, sinks: Tensor | None = None, window: int | None = None,
    kpos: Tensor | None = None, qpos: Tensor | None = None,
) -> Tensor:
    """q [B, Hq, D] over flat k [N, D] / v [N, Dv]; head i = b*Hkv + h holds rows
    starts[i] .. starts[i] + lens[i] - 1 -> [B, Hq, Dv] in q's dtype. ``softcap`` (Gemma 2),
    ``sinks`` [Hq] (GPT-OSS), a sliding ``window`` over the entries' positions ``kpos`` [N]
    for queries at ``qpos`` [B]: each off by default."""
    extras = {"softcap": softcap, "sinks": sinks, "window": window, "kpos": kpos, "qpos": qpos}
    if _on_triton(q):
        return _varlen.varlen_decode_attention(q, k, v, starts, lens, scale, max_len, num_splits, out, **extras)
    return reference_varlen_decode_attention(q, k, v, starts, lens, scale, max_len, num_splits, out, **extras)


def kivi_decode_attention(
    q: Tensor, body, store, tail_k: Tensor, tail_v: Tensor, scale: float,
    tail_lens: Tensor | None = None, body_lens: Tensor | None = None,
    num_splits: int | None = None, out: Tensor | None = None,
    softcap: float | None = None, sinks: Tensor | None = None, window: int | None = None,
    body_pos: Tensor | None = None, tail_pos: Tensor | None = None, qpos: Tensor | None = None,
) -> Tensor:
    """q [B, Hq, D] over a KIVI layer: encoded ``body`` (`kvbudget.store.Body`) then the
    full-precision tail [B, Hkv, t, D] -> [B, Hq, Dv]. Fused Triton kernel on CUDA when the layout
    allows it (`kivi_decode.kivi_supported`) and nothing is added to softmax attention, else
    decode-then-attend in torch (which applies ``softcap``, ``sinks`` and a sliding ``window``
    over the entries' positions ``body_pos`` / ``tail_pos`` for queries at ``qpos``)."""
    plain = not softcap and sinks is None and not window
    if plain and _on_triton(q) and _kivi.kivi_supported(q, body, store, tail_k) is None:
        return _kivi.kivi_decode_attention(q, body, store, tail_k, tail_v, scale, tail_lens, body_lens, num_splits, out)
    return reference_kivi_decode_attention(q, body, store, tail_k, tail_v, scale, tail_lens, body_lens, num_splits, out,
                                           softcap, sinks, window, body_pos, tail_pos, qpos)


__all__ = [
    "HAVE_TRITON",
    "decode_attention",
    "kivi_decode_attention",
    "reference_decode_attention",
    "reference_kivi_decode_attention",
    "reference_varlen_decode_attention",
    "varlen_decode_attention",
]
