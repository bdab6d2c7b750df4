"""The compression engine: ``compress(cache, policy)`` cuts every layer of a cache back to its
budget, as ``keep(select(score(observe(layer))))``.

For each layer (`compress_layer`, the reference path, read top to bottom):

1. observe: an `Observation` of the layer's entries (padded view), the queries it kept for the
   scorer, its positions and state;
2. score: the policy's scorer gives every entry a score (higher = keep);
3. select: the protected window and padding rules, then each head's top-k (`select.select`),
   one top-k over all heads of the layer (Ada-KV, `select.pick_across_heads`) or, with a
   demoting store, which entries move to low precision (`select.demotion_index`);
   with a merger (`compress.merger`), the evicted entries are then folded into kept ones;
4. keep: the layer keeps them in its own layout (`BudgetedLayer.keep`), which frees the rest.

Layers of one kind are compressed together where they allow it (`compress.batched`): the same
scores and picks, in a few large operations instead of a few dozen per layer, which on a GPU
the host cannot launch as fast as the GPU runs them. The tests hold the two paths equal.

Around the layers: a budget that is a fraction of the tokens seen (``0.25seen``) is resolved
again against the cache's length; nothing is evicted while the whole context fits the average
budget (contexts under the budget stay whole, as PyramidKV); with a store, a budget of bytes (a
ratio, bytes, a fraction seen) is fitted to the layers' own chunk layout at each compression
(`compress.bytefit`); a sliding-window layer first drops the
entries no later token can see (`BudgetedLayer.trim_window`), whatever the policy, and keeps
at most ``window - 1`` entries per head; a store's tail entries older than its residual window
are encoded (`kv.cache.flush_layers`); inside a `BudgetedCache.scratch` block the cache is
snapshotted first, so that the block can be rolled back; with a re-rotating policy, the kept
keys then move to contiguous positions (`kv.rerotation`).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from ..kv.cache import BudgetedCache, flush_layers
from ..kv.entries import LayerView
from ..kv.layer import BudgetedLayer
from ..kv.ragged import RaggedEntries, padded_to_ragged
from ..kv.rerotation import rerotate
from . import batched, bytefit
from .observation import Observation
from .policy import Policy
from .select import demotion_index, pick_across_heads, select

# Layers compressed together where they allow it; False: the per-layer reference path for
# every layer (the tests compare the two).
BATCHED = True


def compress(cache: BudgetedCache, policy: Policy) -> None:
    """Cut every layer of ``cache`` back to ``policy``'s budget (no-op for layers under it)."""
    layers = cache.layers
    windowed = [layer for layer in layers if layer.window is not None and layer.max_entries >= layer.window]
    if not policy.evicts and policy.store is None and not windowed:
        return  # nothing to do, and no reason for `before_compress` to snapshot the cache
    cache.settle()
    # Without eviction a store's body only grows at its end (flush by append), so a snapshot
    # need not hold it (MiniCache's cross-layer merge rewrites it: not that case).
    appends = not policy.evicts and not windowed and policy.store is not None and not policy.store.cross_layer
    cache.before_compress(appends_only=appends)
    budgets: list[int | None] = [None] * len(layers)
    if policy.evicts:
        if policy.budget.seen is not None:  # a fraction of every token seen: it grows with them
            cache.tokens = policy.resolve(cache, context_tokens=cache.get_seq_length())
        elif cache.tokens is None:
            cache.tokens = policy.resolve(cache)
        budgets = _layer_budgets(policy, cache, cache.tokens)
    else:
        _set_residuals(policy, layers, budgets)
    for layer in windowed:
        layer.trim_window()
    if not policy.evicts:
        if policy.store is not None and not policy.store.flush_cache(cache):
            flush_layers(layers)
        return
    # A byte budget with a store: as many entries as the layers' own layout lets fit.
    tokens = bytefit.tokens(policy, cache, cache.tokens)
    if tokens != cache.tokens:
        budgets = _layer_budgets(policy, cache, tokens)
    fits = cache.get_seq_length() <= tokens
    # Layers of one window (full attention, or one sliding window) are compressed together.
    for window in dict.fromkeys(layer.window for layer in layers):
        index = [i for i, layer in enumerate(layers) if layer.window == window]
        group, group_budgets = [layers[i] for i in index], [budgets[i] for i in index]
        if BATCHED and batched.compress(cache, policy, group, group_budgets, fits):
            continue
        for i, layer, budget in zip(index, group, group_budgets):
            compress_layer(policy, layer, i, len(layers), budget, fits)
    if policy.rerotate and not fits:
        rerotate(cache, policy.scorer.position_state)


def _layer_budgets(policy: Policy, cache: BudgetedCache, tokens: int) -> list[int]:
    """Entries per head of each layer for ``tokens`` per layer (a sliding-window layer at most
    its window), each layer's store residual set to match."""
    budgets = policy.layer_budgets(tokens, len(cache.layers), cache.sensitivity)
    budgets = [b if layer.window is None else min(b, layer.window - 1) for b, layer in zip(budgets, cache.layers)]
    _set_residuals(policy, cache.layers, budgets)
    return budgets


def _set_residuals(policy: Policy, layers: list[BudgetedLayer], budgets: list[int | None]) -> None:
    for layer, budget in zip(layers, budgets):
        # A sliding-window layer's tail is at most its window: it never holds more.
        residual = policy.residual(budget)
        layer.residual = residual if layer.window is None else min(residual, layer.window - 1)


def compress_layer(policy: Policy, layer: BudgetedLayer, i: int, n_layers: int, budget: int, fits: bool) -> None:
    """The reference path for one layer (layer ``i`` of ``n_layers``, ``budget`` entries per head;
    ``fits``: the whole context fits the average budget, so nothing is evicted)."""
    demotes = policy.store is not None and policy.store.demotes
    if demotes:
        over = layer.keys.shape[2] > budget  # entries still at full precision
    elif policy.head_adaptive:  # the heads share the layer's budget
        over = layer.total_entries() > budget * layer.n_heads
    else:
        over = layer.max_entries > budget
    over = over and not fits
    if over or policy.scorer.state_names:
        _score_and_keep(policy, layer, i, n_layers, budget, evict=over)
    if not over and not demotes:
        flush_layers([layer])
    if policy.scorer.queries < 0:
        layer.clear_queries()


def observation(policy: Policy, layer: BudgetedLayer, i: int, n_layers: int, budget: int,
                tail_only: bool = False) -> tuple[Observation, LayerView]:
    """What the scorer sees of layer ``i`` (``tail_only``: a store's full-precision tail alone),
    and the view of the entries it was built from."""
    view = layer.view(tail_only=tail_only)
    obs = layer.observed
    return Observation(
        layer_idx=i,
        n_layers=n_layers,
        keys=view.keys,
        values=view.values,
        positions=view.positions,
        valid=view.valid,
        queries=obs.queries,
        query_positions=obs.positions,
        scaling=obs.scaling or view.keys.shape[-1] ** -0.5,
        budget=budget,
        seen=layer.seen,
        seed=zlib.crc32(f"{policy.seed}:{i}:{layer.seen}".encode()),
        state=view.state,
        # Scored over the tail only, the softmax spans fewer keys than the queries attended to.
        lse=None if tail_only else obs.lse,
        window=layer.window,
    ), view


def _score_and_keep(policy: Policy, layer: BudgetedLayer, i: int, n_layers: int, budget: int, evict: bool) -> None:
    # A demoting store (MiKV) only chooses among full-precision entries (encoded ones never
    # come back), so only the tail is scored: no decoding, no attention over the whole body.
    demotes = policy.store is not None and policy.store.demotes
    obs, view = observation(policy, layer, i, n_layers, budget, tail_only=demotes)
    scores = policy.scorer.score(obs)
    start = layer.max_entries - view.keys.shape[2]  # entries before the scored ones (a body)
    state = _with_earlier_state(obs.state, layer, start) if start else obs.state
    if not evict:  # only the scorer's state changed
        layer.set_state(_unpadded(state, layer))
        return
    protected = policy.protected(budget)
    if demotes:
        layer.rebuild(demotion_index(scores, obs, start, protected), budget, state)
        return
    view.state = state
    if policy.head_adaptive:
        chosen, lens, kept = pick_across_heads(scores, obs, protected)
        if policy.merger is not None:
            _merge(policy, obs, view, chosen[None])
        layer.hold(RaggedEntries.chosen(view, chosen, lens, kept))
        return
    index, lens = select(scores, obs, protected)
    if policy.merger is not None:
        kept = torch.zeros_like(obs.positions, dtype=torch.bool).scatter_(2, index, True)
        _merge(policy, obs, view, kept if obs.valid is None else kept & obs.valid)
    layer.keep(index, lens, view=view)


def _merge(policy: Policy, obs: Observation, view: LayerView, kept: Tensor) -> None:
    """Fold the entries leaving (``kept`` [B, H, n] False, real, inside a sliding window: an
    entry no later query sees carries nothing to merge) into the kept ones of ``view``."""
    evicted = ~kept if obs.valid is None else obs.valid & ~kept
    if obs.window is not None:
        evicted &= obs.positions > obs.seen - obs.window
    view.keys, view.values = policy.merger.merge(obs, kept, evicted)
    view.state.update({k: obs.state[k] for k in policy.merger.state_names})


def _with_earlier_state(scored: dict[str, Tensor], layer: BudgetedLayer, start: int) -> dict[str, Tensor]:
    """Per-entry state over all entries: the first ``start``'s as they were, the rest as scored."""
    out = {}
    for name, s in scored.items():
        before = layer.entries.state[name][..., :start] if name in layer.entries.state else s.new_zeros(*s.shape[:2], start)
        out[name] = torch.cat([before, s], dim=-1)
    return out


def _unpadded(state: dict[str, Tensor], layer: BudgetedLayer) -> dict[str, Tensor]:
    """State scored over a padded view, back in the layer's own layout."""
    entries = layer.entries
    if not isinstance(entries, RaggedEntries):
        return state
    return {k: padded_to_ragged(s[0], entries.head_lens, entries.total_entries()) for k, s in state.items()}
