"""Stores: how a layer's older entries are held once they leave the full-precision tail.

A layer with a store keeps its entries in two parts, in this order (`EncodedEntries`):

* the **body**: older entries, encoded by the store (packed low-bit codes, pruned channels...)
  and decoded on the fly for each attention call and each scoring pass (`kv.body`);
* the **tail**: the most recent entries in full precision, where new tokens are appended.

Encoded data comes in two kinds, both counted byte for byte: per-token payload (codes, per-token
scales) and per-*chunk* metadata shared by the tokens encoded together (KIVI's per-channel key
scales over a group of 32 tokens, ThinK's kept channel indices). A store class says how to
encode and decode (one file per method in `methods/stores`); the bookkeeping is in `kv.body`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

STORES: dict[str, type[Store]] = {}
# Named settings of one store class: "kivi2" -> {"bits": 2}.
STORE_VARIANTS: dict[str, dict] = {}


def register_store(name: str, **variants: dict):
    """Class decorator: make a store available by name (``snapkv+kivi4``), plus named variants."""

    def deco(cls: type[Store]) -> type[Store]:
        cls.name = name
        STORES[name] = cls
        for variant, settings in variants.items():
            STORES[variant] = cls
            STORE_VARIANTS[variant] = settings
        return cls

    return deco


@dataclass
class Encoded:
    """A batch of encoded entries: per-token tensors [B, H, m, ...] and per-chunk [B, H, c, ...]."""

    tokens: dict[str, Tensor]
    chunks: dict[str, Tensor]


class Store:
    """How body entries are encoded. Subclasses set the class fields and override encode/decode."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    saves: ClassVar[str] = ""
    # Tokens sharing one chunk of metadata (consecutive per head); None: one chunk per encode call.
    chunk: ClassVar[int | None] = None
    # MiKV: entries the scorer would evict are encoded (kept at low precision) instead of dropped.
    demotes: ClassVar[bool] = False
    # Observed queries the store needs (ThinK scores channels with the window queries).
    queries: ClassVar[int] = 0
    # The scorer used when the store is named on its own ("kivi4" keeps every token, quantized).
    default_scorer: ClassVar[str] = "full"
    # Encodes across layers, so every layer must keep the same tokens (no eviction scorer).
    cross_layer: ClassVar[bool] = False

    def __init__(self, residual: int = 128) -> None:
        if residual < 0:
            raise ValueError(f"residual must be >= 0, got {residual}")
        self.residual = residual

    def encode(self, keys: Tensor, values: Tensor, valid: Tensor, queries: Tensor | None) -> Encoded:
        """Encode ``keys``/``values`` [B, H, m, d] (``valid`` [B, H, m]: False on padding)."""
        raise NotImplementedError

    def decode(self, tokens: dict[str, Tensor], chunks: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, n, d] from per-token data and the chunk data of each token."""
        raise NotImplementedError

    def decode_keys(self, tokens: dict[str, Tensor], chunks: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
        """Only the keys of `decode` (what a scorer that does not read values needs)."""
        return self.decode(tokens, chunks, dtype)[0]

    def decode_body(self, body, dtype: torch.dtype, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`decode` of a whole body (``out``: tensors to write the keys and values into). A store
        with a fused decoder reads the chunk table through the chunk ids itself."""
        return written(self.decode(body.tokens, body.per_token(), dtype), out)

    def decode_body_keys(self, body, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """Only the keys of `decode_body`."""
        keys = self.decode_keys(body.tokens, body.per_token(), dtype)
        return keys if out is None else out.copy_(keys)

    def flush_cache(self, cache) -> bool:
        """Encode across layers (MiniCache); True when done here instead of layer by layer."""
        return False

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        """Bytes one encoded entry of one head costs on average (for byte budgets)."""
        raise NotImplementedError

    def chunk_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        """Bytes of one chunk's metadata for one head (0: none); `entry_bytes` spreads them over a
        whole chunk, an eviction that leaves chunks part-used pays them in full."""
        return 0.0

    def describe(self) -> str:
        return self.name


def written(decoded: tuple[Tensor, Tensor], out: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Decoded keys and values, copied into ``out`` when given (the `decode(..., out=)` contract
    of bodies: the caller's buffers receive them)."""
    if out is None:
        return decoded
    out[0].copy_(decoded[0])
    out[1].copy_(decoded[1])
    return out
