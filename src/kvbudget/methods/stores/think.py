"""ThinK (Xu et al. 2024): query-driven pruning of key channels.

Per KV head, each key channel c is scored by ||Q_w[:, c]|| * ||K[:, c]|| (window queries of the
head's query group, the keys being stored) and the lowest ``ratio`` of channels is dropped. Only
the kept channels and their indices are stored; decoding scatters them back into zeros, so a
query's dot product uses exactly the kept channels. The most recent ``residual`` keys stay whole.
Composes with any token scorer (``snapkv+think``); values are kept as they are.
"""

import torch
from torch import Tensor

from ...kv.store import Encoded, Store, register_store


@register_store("think")
class ThinK(Store):
    paper = "ThinK (Xu et al. 2024)"
    summary = "drops the least important key channels per head (||Q_c||*||K_c||), stores kept indices"
    saves = "key channels (ratio 0.5 -> 25% of K+V bytes)"
    queries = 32

    def __init__(self, ratio: float = 0.5, residual: int = 32) -> None:
        super().__init__(residual)
        if not 0 <= ratio < 1:
            raise ValueError(f"think ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def encode(self, keys: Tensor, values: Tensor, valid: Tensor, queries: Tensor | None) -> Encoded:
        b, h, m, d = keys.shape
        keep = d - int(self.ratio * d)
        key_norm = keys.float().masked_fill(~valid[..., None], 0.0).norm(dim=2)  # [B, H, d]
        score = key_norm
        if queries is not None:
            q = queries.float().view(b, h, -1, queries.shape[2], d)
            score = key_norm * q.pow(2).sum(dim=(2, 3)).sqrt()
        channels = score.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, H, keep]
        kept = keys.gather(-1, channels[:, :, None, :].expand(b, h, m, keep))
        return Encoded(tokens={"k": kept, "v": values}, chunks={"channels": channels[:, :, None, :].to(torch.int16)})

    def decode(self, tokens: dict[str, Tensor], chunks: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        kept = tokens["k"]
        channels = chunks["channels"].long()
        d = tokens["v"].shape[-1]  # heads have equal key and value dims in the supported models
        keys = kept.new_zeros(*kept.shape[:-1], d).scatter_(-1, channels, kept)
        return keys.to(dtype), tokens["v"]

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        keep = head_dim - int(self.ratio * head_dim)
        return (keep + head_dim) * dtype.itemsize + 2

    def chunk_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        return 2 * (head_dim - int(self.ratio * head_dim))  # the kept channels' indices (int16), per encode
