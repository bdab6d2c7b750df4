"""Eviction over store layers (KIVI, rotated KIVI) for all layers at once, stacked along the batch.

A layer with a store holds an encoded body and a full-precision tail. Compressing it layer by
layer (`engine.compress_layer`) decodes the body for the scorer, scores, selects, then rebuilds
the body (`body.rebuild_body`: gathers, encodes the tail entries that move in, compacts the
chunk table), about 155 kernel launches per layer, which on a GPU the host cannot launch as
fast as the GPU runs them. Here the layers' bodies and
tails are concatenated along the batch (layer i is rows ``i*B .. (i+1)*B``, as in the dense
stacked path), so each of those steps runs once for all of them.

The result equals the loop's bit for bit: the same kept entries (scores and picks are the dense
stacked path's), codes, scales, chunk ids and chunk tables. Chunk tables are padded to the
widest layer's before stacking; `_drop_unused` packs every head's live chunks to the front of
its table, so each layer's table is then cut back to its own widest head (`finish`).

Nothing is read back on the host while the groups of a compression are queued: the tail length
comes from the host (`BudgetedLayer.tail_kept`), the new entries are encoded in as many slots as
can move into the body, and the tables' widths and the checks of every group are read in one
sync at the end (`finish`). So the host queues the whole compression while the GPU still runs
the block before it.

Used when every layer is over one shared budget, holds a body of the same length (or none) and a
tail of the same length, and the store encodes entry by entry (not MiKV's demotion, not ThinK's
query-dependent channels, not MiniCache's cross-layer merge).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..kv.body import Body, HostValues, Rebuilt, prepend_body, rebuild_stacked
from ..kv.encoded import EncodedEntries
from ..kv.layer import BudgetedLayer
from .policy import Policy
from .select import select
from .stacking import Stacked, shape, stacked_observation


def stackable(policy: Policy, layers: list[BudgetedLayer], budgets: list[int]) -> bool:
    """Whether `compress` can run for ``layers`` (see the module docstring)."""
    store = policy.store
    if store is None or store.demotes or store.queries or store.cross_layer or policy.head_adaptive:
        return False
    if len(set(budgets)) > 1 or not all(layer.is_initialized and isinstance(layer.entries, EncodedEntries)
                                        for layer in layers):
        return False
    first = layers[0].entries
    q_shape = None if layers[0].observed.queries is None else layers[0].observed.queries.shape
    for layer in layers:
        e = layer.entries
        if (shape(layer) != shape(layers[0]) or e.keys.shape[2] != first.keys.shape[2]
                or (e.n_body if e.body is not None else None) != (first.n_body if first.body is not None else None)
                or (e.body is not None and (e.body.chunk_id is None) != (first.body.chunk_id is None))
                or layer.seen != layers[0].seen or set(e.state) != set(first.state)
                or (None if layer.observed.queries is None else layer.observed.queries.shape) != q_shape
                or layer.observed.scaling != layers[0].observed.scaling or layer.max_entries <= budgets[0]
                or layer.phantom):
            return False
    return True


def stack_bodies(bodies: list[Body]) -> Body:
    """Bodies of one length stacked along the batch; chunk tables padded to the widest."""
    tokens = {k: torch.cat([b.tokens[k] for b in bodies]) for k in bodies[0].tokens}
    if bodies[0].chunk_id is None:  # a store without per-chunk data (rotated KIVI)
        return Body(tokens, None, {})
    width = max(next(iter(b.chunks.values())).shape[2] for b in bodies)

    def padded(name: str) -> Tensor:
        # One buffer, each layer's table copied into its rows: a kernel per layer, not three.
        first = bodies[0].chunks[name]
        rows = first.shape[0]
        out = first.new_zeros(len(bodies) * rows, first.shape[1], width, *first.shape[3:])
        for i, body in enumerate(bodies):
            c = body.chunks[name]
            out[i * rows : (i + 1) * rows, :, : c.shape[2]] = c
        return out

    return Body(tokens, torch.cat([b.chunk_id for b in bodies]).long(), {k: padded(k) for k in bodies[0].chunks})


def compress(policy: Policy, layers: list[BudgetedLayer], budget: int) -> Rebuilt:
    """Score, select and rebuild ``layers`` together (`stackable` must hold). The layers' chunk
    tables are cut to size by `finish`, with every group's values read in one host sync."""
    store, first = policy.store, layers[0]
    b, n_layers = first.keys.shape[0], len(layers)
    tail_keys = torch.cat([layer.keys for layer in layers])
    tail_values = torch.cat([layer.values for layer in layers])
    body = stack_bodies([layer.entries.body for layer in layers]) if first.entries.body is not None else None
    # The values are decoded only for a scorer that reads them.
    keys, values = prepend_body(body, store, tail_keys, tail_values if policy.scorer.reads_values else None)
    positions = torch.cat([layer.entries.positions for layer in layers])
    entries = Stacked(keys=keys, values=values, positions=positions, valid=None,
                      state={k: torch.cat([layer.entries.state[k] for layer in layers]) for k in first.entries.state})
    obs = stacked_observation(layers, budget, policy.seed, policy.scorer.reads_values, entries=entries)
    scores = policy.scorer.score(obs)
    index, _ = select(scores, obs, policy.protected(budget))
    state = obs.state
    del obs, entries, keys, values, scores
    residual = policy.residual(budget)
    for layer in layers:
        layer.residual = residual
    kept_positions = positions.gather(2, index)
    # Each layer's tail: its kept entries inside the residual window (the loop's `keep`). The
    # layers are alike (`stackable`), so the first one's rule holds for all, checked on all rows.
    n_tail, check = first.entries.tail_kept(kept_positions, first.seen, first.residual, first.phantom, n_layers)
    kept_state = {k: s.gather(2, index) for k, s in state.items()}
    bodies, new_keys, new_values, rebuilt = rebuild_stacked(store, body, tail_keys, tail_values, index, n_tail,
                                                            n_layers, check)
    for i, (layer, new) in enumerate(zip(layers, bodies)):
        rows = slice(i * b, (i + 1) * b)
        layer.hold(EncodedEntries(layer.store, new, new_keys[rows], new_values[rows], kept_positions[rows],
                                  {name: s[rows] for name, s in kept_state.items()}))
        if policy.scorer.queries < 0:
            layer.clear_queries()
    return rebuilt


def finish(cache, groups: list[tuple[list[BudgetedLayer], Rebuilt]]) -> None:
    """Cut the chunk tables of every group's layers to size (`body.HostValues`), with one host
    read for the whole compression, after the host has queued all of it; deferred to
    `BudgetedCache.settle` while the cache defers (block-wise prefill: the next block's forward
    is queued first, so the GPU never waits for the host between them)."""
    layers = [layer for group, _ in groups for layer in group]
    values = HostValues([rebuilt for _, rebuilt in groups])

    def apply() -> None:
        for layer, body in zip(layers, values.cut([layer.entries.body for layer in layers])):
            layer.entries = replace(layer.entries, body=body)

    cache.defer(apply)
