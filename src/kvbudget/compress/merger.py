"""`Merger`: what happens to the entries a selection evicts, when they are not simply dropped.

A merging policy (``snapkv+merge``, ``knorm+cam``) folds each evicted entry into entries that
stay, then keeps the selection as usual: the evicted entries still leave the cache, so the bytes
held are the budget's (plus a merger's per-entry state, counted like a scorer's). A method file
(`methods/mergers/*.py`) subclasses `Merger`, overrides `merge` and registers itself with
`register_merger`; the engine calls it between selection and keeping (`engine.compress_layer`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .observation import Observation


class Merger:
    """Folds evicted entries into kept ones. Subclasses override `merge` only."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # Observed queries `merge` needs (the latest k; 0 none), recorded whatever the scorer needs.
    queries: ClassVar[int] = 0
    # Names of per-entry float state the merger keeps between compressions (counted in bytes).
    state_names: ClassVar[tuple[str, ...]] = ()

    def merge(self, obs: Observation, kept: Tensor, evicted: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, H, n, d] of the observed entries after the ``evicted`` ones
        ([B, H, n] bool) are folded into the ``kept`` ones ([B, H, n] bool): only the kept
        entries' rows matter (the others leave next). Never writes into ``obs.keys`` /
        ``obs.values`` (a dense layer's own storage); may update ``obs.state``."""
        raise NotImplementedError


MERGERS: dict[str, type[Merger]] = {}


def register_merger(name: str):
    """Class decorator: make a merger available as a policy part (``snapkv+merge``)."""

    def deco(cls: type[Merger]) -> type[Merger]:
        cls.name = name
        MERGERS[name] = cls
        return cls

    return deco


def evicted_rows(evicted: Tensor) -> tuple[Tensor, Tensor]:
    """The evicted entries of each head, first to last, padded to the most any head evicts:
    indices [B, H, E] into the entries and which of them are real ([B, H, E] bool). E is read
    back from the device once (a compression evicts about one block, so E is small)."""
    counts = evicted.sum(-1)
    width = int(counts.max()) if evicted.numel() else 0
    # A stable sort of "not evicted" puts each head's evicted entries first, in their order.
    index = (~evicted).to(torch.uint8).argsort(dim=-1, stable=True)[..., :width]
    return index, torch.arange(width, device=evicted.device) < counts[..., None]


def gather_rows(t: Tensor, index: Tensor) -> Tensor:
    """``t`` [B, H, n, d] at ``index`` [B, H, E, ...] along the entries: [B, H, E, ..., d]."""
    b, h = index.shape[:2]
    flat = index.reshape(b, h, -1)
    out = t.gather(2, flat[..., None].expand(*flat.shape, t.shape[-1]))
    return out.view(*index.shape, t.shape[-1])


def scatter_rows(t: Tensor, index: Tensor, add: Tensor) -> Tensor:
    """``t`` [B, H, n, d] (float) plus ``add`` [B, H, E, ..., d] summed into the rows ``index``
    [B, H, E, ...]: out of place (``t`` may be a layer's own storage)."""
    b, h, d = *index.shape[:2], t.shape[-1]
    flat = index.reshape(b, h, -1)
    return t.scatter_add(2, flat[..., None].expand(*flat.shape, d), add.reshape(b, h, -1, d))
