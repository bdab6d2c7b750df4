"""MiniCache (Liu et al. 2024): merge the KV of adjacent layers in the upper half of the model.

From the middle layer up, the KV states of two adjacent layers point in similar directions. For
each pair (l, l+1) and each token, every key (and value) vector is split into magnitude and
direction; the two directions are merged by spherical interpolation at t = 1/2 (SLERP) and stored
once, with each layer's own per-token norm, so layer l's vector is restored as ``norm_l * dir``.
Tokens whose two directions are far apart (the largest angles: a ``retain`` share per head) are
kept unmerged, exactly, in both layers. The most recent ``residual`` tokens stay unmerged.

Merging needs both layers of a pair to hold the same tokens, so MiniCache runs on the full cache
(no eviction) here, as in the paper's main results; it is a store of its own, not combined with a
scorer or a quantizer in this version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...kv.encoded import EncodedEntries
from ...kv.store import Store, register_store, written


@dataclass
class MergedPair:
    """What two layers share: merged unit directions and which tokens were kept unmerged."""

    directions: tuple[Tensor, Tensor]  # keys, values: [B, H, n, d] unit vectors
    retained: Tensor  # [B, H, r] entry indices kept unmerged (int16/int32)


@dataclass
class PairSide:
    """One layer's view of a merged pair: its norms and its exact vectors of retained tokens.
    The shared directions are counted in the lower layer's bytes only."""

    pair: MergedPair
    norms: tuple[Tensor, Tensor]  # keys, values: [B, H, n, 1]
    exact: tuple[Tensor, Tensor]  # keys, values of retained tokens: [B, H, r, d]
    owns_directions: bool

    def __len__(self) -> int:
        return self.norms[0].shape[2]

    def nbytes(self) -> int:
        total = sum(t.nbytes for t in (*self.norms, *self.exact))
        if self.owns_directions:
            total += sum(t.nbytes for t in self.pair.directions) + self.pair.retained.nbytes
        return total

    def decode(self, store: Store, dtype: torch.dtype, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        parts = []
        index = self.pair.retained.long()
        for direction, norm, exact in zip(self.pair.directions, self.norms, self.exact):
            x = (norm.float() * direction.float()).to(dtype)
            idx = index[..., None].expand(*index.shape, x.shape[-1])
            parts.append(x.scatter(2, idx, exact.to(dtype)))
        return written((parts[0], parts[1]), out)


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    norm = x.float().norm(dim=-1, keepdim=True)
    return norm, x.float() / norm.clamp(min=1e-8)


def _slerp_half(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """SLERP of unit vectors at t = 1/2, and the angle between them."""
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    # sin(θ/2)/sin(θ) (a + b) = (a + b) / (2 cos(θ/2)); antipodal pairs fall back to a.
    half = torch.cos(angle / 2)
    merged = torch.where(half > 1e-4, (a + b) / (2 * half).clamp(min=1e-4), a)
    return merged, angle[..., 0]


@register_store("minicache")
class MiniCache(Store):
    paper = "MiniCache (Liu et al. 2024)"
    summary = "upper-half layer pairs share one SLERP-merged direction per token + their own norms"
    saves = "about half the KV of the upper half of the layers"
    cross_layer = True

    def __init__(self, retain: float = 0.05, residual: int = 32) -> None:
        super().__init__(residual)
        if not 0 <= retain <= 1:
            raise ValueError(f"minicache retain must be in [0, 1], got {retain}")
        self.retain = retain

    def pairs(self, n_layers: int) -> list[tuple[int, int]]:
        """Budgeted-layer index pairs merged: (m, m+1), (m+2, m+3)... from the middle m up."""
        start = n_layers // 2
        return [(i, i + 1) for i in range(start, n_layers - 1, 2)]

    def flush_cache(self, cache) -> bool:
        layers = cache.layers
        for lo, hi in self.pairs(len(layers)):
            self._merge(layers[lo], layers[hi])
        return True

    def _merge(self, lower_layer, upper_layer) -> None:
        if not lower_layer.is_initialized or not upper_layer.is_initialized:
            return
        lower, upper = lower_layer.entries, upper_layer.entries  # `EncodedEntries`
        tail = lower.keys.shape[-2]
        m = int((lower.positions[..., -tail:] < lower_layer.seen - self.residual).sum(-1).min()) if tail else 0
        if m <= 0:
            return
        if not torch.equal(lower.positions, upper.positions):
            raise RuntimeError("minicache needs both layers of a pair to hold the same tokens")
        old = len(lower.body) if lower.body is not None else 0
        directions, norms, angles = [], ([], []), 0
        for a, b in ((lower.keys, upper.keys), (lower.values, upper.values)):
            norm_a, dir_a = _split(a[..., :m, :])
            norm_b, dir_b = _split(b[..., :m, :])
            merged, angle = _slerp_half(dir_a, dir_b)
            directions.append(merged.to(a.dtype))
            norms[0].append(norm_a.to(a.dtype))
            norms[1].append(norm_b.to(a.dtype))
            angles = angles + angle
        r = min(m, math.ceil(self.retain * m))
        retained = angles.topk(r, dim=-1).indices.sort(dim=-1).values  # [B, H, r] largest angles

        def exact(x: Tensor) -> Tensor:
            return x[..., :m, :].gather(2, retained[..., None].expand(*retained.shape, x.shape[-1]))

        new_exact = [(exact(lower.keys), exact(lower.values)), (exact(upper.keys), exact(upper.values))]
        if lower.body is not None:  # append to what the pair already merged
            prev = lower.body.pair
            directions = [torch.cat([p, d], dim=2) for p, d in zip(prev.directions, directions)]
            retained = torch.cat([prev.retained.long(), retained + old], dim=2)
            for side, layer in enumerate((lower, upper)):
                norms[side][:] = [torch.cat([p, n], dim=2) for p, n in zip(layer.body.norms, norms[side])]
                new_exact[side] = tuple(torch.cat([p, e], dim=2) for p, e in zip(layer.body.exact, new_exact[side]))
        index_dtype = torch.int16 if old + m < 2**15 else torch.int32
        pair = MergedPair(directions=tuple(directions), retained=retained.to(index_dtype))
        for side, (layer, entries) in enumerate(((lower_layer, lower), (upper_layer, upper))):
            side_body = PairSide(pair, tuple(norms[side]), new_exact[side], owns_directions=side == 0)
            layer.hold(EncodedEntries(self, side_body, entries.keys[..., m:, :], entries.values[..., m:, :],
                                      entries.positions, entries.state))

    def entry_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        # Per layer on average over a merged pair: half the shared directions + own norms.
        return (head_dim + 2 + 2 * self.retain * head_dim) * dtype.itemsize
