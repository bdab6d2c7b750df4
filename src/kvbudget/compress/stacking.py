"""Layers stacked along the batch dimension, for the batched engine (`compress.batched`).

Layer i of a group is batch rows ``i*B .. (i+1)*B``; layers holding different numbers of entries
are padded at the end of each row (positions -1, ``valid`` False there). Groups are consecutive
layers whose stacked keys and values fit a byte limit: the stacked copies are transient memory
on top of the cache, and peak prefill memory must stay near weights + budget + block.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kv.encoded import EncodedEntries
from ..kv.layer import BudgetedLayer
from ..kv.ragged import RaggedEntries
from ..transfer import to_device
from .observation import Observation

# Stacked K/V of one group at most (all 32 layers of an 8B model at once added 1.3 GB to a 32k
# prefill's peak on an H100).
GROUP_BYTES = 128 * 2**20


@dataclass
class Stacked:
    """Layers' entries stacked along the batch, padded: [L*B, H, n, ...] (`Observation`'s fields)."""

    keys: Tensor
    values: Tensor | None
    positions: Tensor
    valid: Tensor | None
    state: dict[str, Tensor]
    # Ragged layers stacked (`batched.stacked_ragged`): each slot's row in the layers' storages
    # concatenated, [L*H, n].
    rows: Tensor | None = None


def shape(layer: BudgetedLayer) -> tuple[int, int, int, int]:
    """A layer's (batch, KV heads, key dim, value dim), in any layout (ragged: batch 1)."""
    keys, values = layer.keys, layer.values
    if isinstance(layer.entries, RaggedEntries):
        return 1, layer.n_heads, keys.shape[-1], values.shape[-1]
    b, h, _, d = keys.shape
    return b, h, d, values.shape[-1]


def alike(layers: list[BudgetedLayer], ragged: bool = False) -> bool:
    """Whether ``layers`` can be stacked along the batch dimension: dense with nothing encoded, with the
    same batch, heads and head dims, tokens seen, state names, observed queries and scaling
    (they may hold different numbers of entries). ``ragged``: ragged layers too, and then batch 1
    (Ada-KV's layers, each head holding its own number of entries)."""
    first = layers[0]
    if not first.is_initialized:
        return False
    dims = shape(first)
    q_shape = None if first.observed.queries is None else first.observed.queries.shape
    for layer in layers:
        entries = layer.entries
        if (not layer.is_initialized or (isinstance(entries, RaggedEntries) and not ragged)
                or (isinstance(entries, EncodedEntries) and entries.body is not None) or shape(layer) != dims
                or layer.seen != first.seen or set(entries.state) != set(first.entries.state)
                or (None if layer.observed.queries is None else layer.observed.queries.shape) != q_shape
                or layer.observed.scaling != first.observed.scaling):
            return False
    return not ragged or dims[0] == 1


def groups(layers: list[BudgetedLayer], limit: int = GROUP_BYTES) -> Iterator[slice]:
    """Consecutive layers whose stacked K/V, padded to the group's longest, fit in ``limit``
    bytes (at least one layer per group). Consecutive: PyramidKV's budgets fall with depth, so
    neighbours hold similar numbers of entries and little padding is stacked."""
    b, h, d, dv = shape(layers[0])
    entry = b * h * (d * layers[0].keys.element_size() + dv * layers[0].values.element_size())  # bytes
    # Entries of the fullest head: what a ragged layer's padded view holds per head.
    widths = [layer.max_entries for layer in layers]
    start = 0
    while start < len(layers):
        end, longest = start + 1, widths[start]
        while end < len(layers):
            longer = max(longest, widths[end])
            if (end + 1 - start) * longer * entry > limit:
                break
            end, longest = end + 1, longer
        yield slice(start, end)
        start = end


def stack_entries(parts: list[Tensor], n: int, fill: float = 0) -> Tensor:
    """[B, H, n_i, ...] tensors stacked along the batch, each padded with ``fill`` after its
    entries up to ``n``: [len(parts) * B, H, n, ...] (one concatenation when none needs it)."""
    if all(p.shape[2] == n for p in parts):
        return torch.cat(parts)
    b = parts[0].shape[0]
    out = parts[0].new_full((len(parts) * b, parts[0].shape[1], n, *parts[0].shape[3:]), fill)
    for i, p in enumerate(parts):
        out[i * b : (i + 1) * b, :, : p.shape[2]] = p
    return out


def row_values(values: list[list[int]], repeat: int, device: torch.device) -> Tensor:
    """Per-layer integers from the host as an int64 [len(values), layers * repeat] tensor on
    ``device``, each repeated for its layer's ``repeat`` batch rows (`transfer.to_device`: the
    host does not wait for the GPU)."""
    return to_device(torch.tensor(values, dtype=torch.long).repeat_interleave(repeat, dim=1), device)


def stacked_observation(layers: list[BudgetedLayer], budget: int, seed: int, reads_values: bool,
                        adaptive: bool = False, entries: Stacked | None = None) -> Observation:
    """The Observation of ``layers`` stacked along the batch dimension; ``budget``: the largest of
    the layers' budgets. Padded layers of different budgets, and Ada-KV's layers (``adaptive``),
    keep entries from their own tensors, so their values are stacked only for a scorer that
    ``reads_values``. ``entries``: the stacked fields when the caller built them (ragged layers)."""
    first = layers[0]
    if entries is None:
        n = max(layer.keys.shape[2] for layer in layers)
        positions = stack_entries([layer.entries.positions for layer in layers], n, fill=-1)
        padded = any(layer.keys.shape[2] != n for layer in layers)
        own = (padded or adaptive) and not reads_values
        entries = Stacked(
            keys=stack_entries([layer.keys for layer in layers], n),
            values=None if own else stack_entries([layer.values for layer in layers], n),
            positions=positions,
            valid=positions >= 0 if padded else None,
            state={k: stack_entries([layer.entries.state[k] for layer in layers], n) for k in first.entries.state},
        )
    observed = [layer.observed for layer in layers]
    # The LSE goes along only if every layer has it (a stacked row without one is unknown).
    lse = None
    if observed[0].queries is not None and all(o.lse is not None for o in observed):
        lse = torch.cat([o.lse for o in observed])
    return Observation(
        layer_idx=0,
        n_layers=len(layers),
        keys=entries.keys,
        values=entries.values,
        positions=entries.positions,
        valid=entries.valid,
        queries=None,
        query_parts=None if observed[0].queries is None else [o.queries for o in observed],
        query_positions=observed[0].positions,
        scaling=observed[0].scaling or first.keys.shape[-1] ** -0.5,
        budget=budget,
        seen=first.seen,
        seed=zlib.crc32(f"{seed}:stacked:{first.seen}".encode()),
        state=entries.state,
        lse=lse,
        window=first.window,
    )
