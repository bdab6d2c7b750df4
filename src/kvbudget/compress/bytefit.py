"""A byte budget fitted at compression time: with a store, as many entries as the cache's bytes
allow, never more.

`Policy.resolve` turns a ratio into entries per layer before any token is seen, with
`Policy.held_bytes`: an upper bound that must assume the worst chunk layout (KIVI keeps one
chunk's key scales per group of 32 tokens; survivors scattered by an eviction keep one chunk
alive each). A cache then holds far fewer bytes than asked. At each compression the cache's own
layout is known on the host, so the bound can be much tighter, and the budget is re-fitted to it
(`tokens`): the most entries per layer (on average) whose bytes, bounded layer by layer from the
layer's current body and tail (`LayerSizes.bound`), fit the budget's bytes.

Why a bound from the layout, not the exact bytes of the top-k from the scores: the number of
entries kept is a tensor shape, so an exact choice needs the scores read back on the host in the
middle of every compression, and the batched path (`compress.batched_store`) queues a whole
compression without one host read (the GPU keeps running the next block meanwhile). The layout
bound needs only what the host knows (tensor shapes) and is the same for both paths, so they
keep the same entries. It is tight where it matters: a layer's chunks after an eviction are at
most the chunks it holds now (its table is cut to its widest head at every rebuild) plus those
of the tail entries that move into the body, and at most one per body entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..kv.cache import BudgetedCache
from ..kv.encoded import EncodedEntries
from ..kv.entries import POSITION_DTYPE
from ..kv.layer import BudgetedLayer
from .policy import Policy


def applies(policy: Policy, cache: BudgetedCache) -> bool:
    """Whether the budget is bytes (ratio, bytes, fraction seen) and the layers' bytes can be
    bounded from their layout: an evicting policy with a store that encodes entry by entry, every
    layer held in the encoded layout."""
    store, budget = policy.store, policy.budget
    if store is None or budget is None or budget.tokens is not None or not policy.scorer.evicts:
        return False
    if store.demotes or store.cross_layer or store.queries or policy.head_adaptive:
        return False
    return all(layer.is_initialized and isinstance(layer.entries, EncodedEntries) and not layer.phantom
               for layer in cache.layers)


def target(policy: Policy, cache: BudgetedCache) -> float | None:
    """The budget's bytes at this compression: a byte budget's own, a fraction of the bytes of
    every token seen, or the ratio's (`BudgetedCache.target_bytes`, set where the ratio was
    resolved against its context; None: not known, the resolved tokens stand)."""
    budget = policy.budget
    if budget.nbytes is not None:
        return budget.nbytes
    if budget.seen is not None:
        return policy.target_bytes(cache, cache.get_seq_length())
    return cache.target_bytes


def tokens(policy: Policy, cache: BudgetedCache, resolved: int) -> int:
    """Tokens per layer (on average) for this compression: the most whose `LayerSizes.bound`
    over all layers fits the budget's bytes; ``resolved`` (what `Policy.resolve` gave: its own
    bound holds) where the budget is not bytes or no more fit. A byte budget's ``resolved`` is an
    average, not a bound: it may be cut here."""
    goal = target(policy, cache) if applies(policy, cache) else None
    if goal is None:
        return resolved
    n_layers, seen = len(cache.layers), cache.get_seq_length()
    sizes = [LayerSizes.of(policy, layer) for layer in cache.layers]

    def held(t: int) -> int:
        budgets = policy.layer_budgets(t, n_layers, cache.sensitivity)
        # The whole context fits the average budget: no layer evicts (`engine.compress`).
        return sum(size.bound(policy, b if layer.window is None else min(b, layer.window - 1), seen <= t)
                   for size, layer, b in zip(sizes, cache.layers, budgets))

    lo, hi = 0, max(seen, resolved)  # held bytes grow with t (checked below)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if held(mid) <= goal:
            lo = mid
        else:
            hi = mid - 1
    fitted = lo if lo >= 1 and held(lo) <= goal else None
    if policy.budget.nbytes is not None:
        return resolved if fitted is None else fitted
    return resolved if fitted is None else max(resolved, fitted)


@dataclass(frozen=True)
class LayerSizes:
    """What bounds a store layer's bytes after a compression, read once from its tensors' shapes
    (no device value): batch rows x heads, tail length, entries, chunk table width, bytes now."""

    rows: int  # batch x KV heads
    tail: int
    entries: int
    chunks: int  # the chunk table's width (its widest head's live chunks)
    nbytes: int
    full_entry: int  # a tail entry's key and value
    payload: float  # an encoded entry (codes, per-entry scales, chunk id)
    chunk_bytes: float
    chunk: int | None
    missing_state: int  # per-entry state the scorer adds that the layer does not hold yet
    window: int | None

    @classmethod
    def of(cls, policy: Policy, layer: BudgetedLayer) -> "LayerSizes":
        e: EncodedEntries = layer.entries
        store = e.store
        b, h, tail, d = e.keys.shape
        chunk_bytes = store.chunk_bytes(d, e.keys.dtype)
        return cls(
            rows=b * h, tail=tail, entries=layer.max_entries,
            chunks=next(iter(e.body.chunks.values())).shape[2] if e.body is not None and e.body.chunks else 0,
            nbytes=layer.nbytes(),
            full_entry=d * e.keys.element_size() + e.values.shape[-1] * e.values.element_size(),
            payload=store.entry_bytes(d, e.keys.dtype) - (chunk_bytes / store.chunk if store.chunk else 0),
            chunk_bytes=chunk_bytes, chunk=store.chunk,
            missing_state=len(set(policy.state_names) - set(e.state)), window=layer.window,
        )

    def bound(self, policy: Policy, k: int, whole: bool = False) -> int:
        """An upper bound on the bytes the layer holds once compressed to ``k`` entries per head
        (``whole``: kept whole, however many it holds), counted as `EncodedEntries.nbytes` counts
        them: the full-precision tail (the kept residual window), the body's encoded entries and
        chunk ids, the chunk table, and every entry's position and per-entry state. A layer kept
        whole is only flushed: its bytes now (with any per-entry state its scorer adds), less
        what encoding the whole chunks of its tail older than the residual window saves (a flush
        encodes at least those: `kv.cache.flush_layers`)."""
        residual = policy.residual(k) if self.window is None else min(policy.residual(k), self.window - 1)
        if whole or self.entries <= k:
            older = max(self.tail - residual, 0)
            flushed = older - older % self.chunk if self.chunk else older  # `EncodedEntries.whole_chunks`
            chunks = (flushed // self.chunk if self.chunk else int(flushed > 0)) if self.chunk_bytes else 0
            saved = flushed * (self.full_entry - self.payload) - chunks * self.chunk_bytes
            return self.nbytes + (4 * self.missing_state * self.entries - math.floor(max(saved, 0))) * self.rows
        n_tail = min(residual, self.tail, k)  # `EncodedEntries.tail_kept`: the residual window's entries
        n_body = k - n_tail
        per_entry = POSITION_DTYPE.itemsize + 4 * len(policy.state_names)  # positions, float32 state
        chunks = 0
        if self.chunk_bytes and n_body:
            moved = min(n_body, self.tail - n_tail)  # tail entries a rebuild encodes (`body._rebuild`)
            fresh = -(-moved // self.chunk) if self.chunk else int(moved > 0)
            chunks = min(n_body, self.chunks + fresh)
        total = n_tail * self.full_entry + n_body * self.payload + k * per_entry + chunks * self.chunk_bytes
        return math.ceil(total * self.rows)
