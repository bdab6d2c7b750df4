"""The batched engine: the layers of one kind compressed together, stacked along the batch
dimension (`compress.stacking`), with the same scores and picks as the per-layer reference path
(`engine.compress_layer`) in a few large operations instead of ~24 kernel launches per layer
(on a GPU the per-layer loop is bound by the host launching them).

* dense layers (`_dense`): one scoring and one selection per group; layers of different budgets
  (PyramidKV), which then hold different numbers of entries, are padded to the longest when the
  scorer allows it (`Scorer.stackable_padded`);
* while the context fits its budget, a scorer with state (H2O, A2SF, LazyEviction) still scores
  every layer to update it (`_state_only`), stacked as well;
* Ada-KV's layers, dense or ragged (`_adaptive`): each group scored and chosen, then one host
  read for every layer's kept counts, then each layer's picks gathered from its own storage;
* store layers (`compress.batched_store`): bodies and tails stacked, one rebuild per group.

Merging policies (`compress.merger`) evict through the reference path.

`compress` returns False where a group cannot be stacked, and the reference path runs instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kv.cache import BudgetedCache, flush_layers
from ..kv.dense import DenseEntries
from ..kv.entries import gather_entries
from ..kv.layer import BudgetedLayer
from ..kv.ragged import RaggedEntries, padded_index, take_padded, true_indices
from . import batched_store
from .policy import Policy
from .select import choose, ranked, select
from .stacking import GROUP_BYTES, Stacked, alike, groups, row_values, stacked_observation

# The same for layers with a store, whose compression also stacks the decoded bodies and
# re-encodes: larger groups trade peak memory for time.
STORE_GROUP_BYTES = 128 * 2**20


def compress(cache: BudgetedCache, policy: Policy, layers: list[BudgetedLayer], budgets: list[int],
             fits: bool) -> bool:
    """Compress ``layers`` (of one window) together; False (nothing done) where they cannot be
    stacked. ``fits``: the whole context fits the average budget (nothing is evicted)."""
    if not (policy.scorer.stackable and len(layers) > 1):
        return False
    if fits:
        return _state_only(policy, layers, budgets)
    if policy.merger is not None:
        return False  # merging policies evict through the reference path (`engine.compress_layer`)
    if policy.store is not None:
        if not batched_store.stackable(policy, layers, budgets):
            return False
        batched_store.finish(cache, [(layers[g], batched_store.compress(policy, layers[g], budgets[0]))
                                     for g in groups(layers, STORE_GROUP_BYTES)])
        return True
    if policy.head_adaptive:
        return _adaptive(policy, layers, budgets)
    return _dense(policy, layers, budgets)


def _dense(policy: Policy, layers: list[BudgetedLayer], budgets: list[int]) -> bool:
    if not alike(layers):
        return False
    lengths = [layer.keys.shape[2] for layer in layers]
    if all(n <= k for n, k in zip(lengths, budgets)):
        return False  # nothing to evict: the loop only updates the scorer's state, if any
    if (len(set(budgets)) > 1 or len(set(lengths)) > 1) and not policy.scorer.stackable_padded:
        return False
    for g in groups(layers, GROUP_BYTES):
        _compress_dense(policy, layers[g], budgets[g])
    return True


def _compress_dense(policy: Policy, layers: list[BudgetedLayer], budgets: list[int]) -> None:
    """One scoring and selection for dense ``layers`` stacked along the batch dimension (padded
    to the longest when they hold different numbers of entries)."""
    b = layers[0].keys.shape[0]
    lengths = [layer.keys.shape[2] for layer in layers]
    obs = stacked_observation(layers, max(budgets), policy.seed, policy.scorer.reads_values)
    scores = policy.scorer.score(obs)
    if len(set(budgets)) == 1 and obs.valid is None:
        # One budget and one length: one top-k and one gather for every row.
        index, _ = select(scores, obs, policy.protected(budgets[0]))
        kept = [gather_entries(t, index) for t in (obs.keys, obs.values, obs.positions)]
        state = {k: gather_entries(v, index) for k, v in obs.state.items()}
        del obs
        for i, layer in enumerate(layers):
            rows = slice(i * b, (i + 1) * b)
            _hold(policy, layer, *(t[rows] for t in kept), {k: v[rows] for k, v in state.items()}, budgets[i])
        return
    # The protected window depends on the layer's budget: one length per batch row.
    windows = row_values([[policy.protected(k) for k in budgets]], b, scores.device)[0]
    scores = ranked(scores, obs, windows[:, None, None])
    state = obs.state
    # The stacked (padded) keys go now; each layer's kept entries come from its own tensors.
    del obs
    keep = [min(k, n) for k, n in zip(budgets, lengths)]
    # Each layer's own top-k over its own entries (the stacked scores without the padding):
    # exactly what the loop's `select` picks, ties included. The picks go into one buffer whose
    # unused slots hold an index past every entry, so one sort orders every layer's picks.
    picks = torch.full((*scores.shape[:2], max(keep)), scores.shape[-1], dtype=torch.long, device=scores.device)
    for i in range(len(layers)):
        rows = slice(i * b, (i + 1) * b)
        picks[rows, :, : keep[i]] = scores[rows, :, : lengths[i]].topk(keep[i], dim=-1).indices
    picks = picks.sort(dim=-1).values
    for i, layer in enumerate(layers):
        rows = slice(i * b, (i + 1) * b)
        idx = picks[rows, :, : keep[i]]
        kept = [gather_entries(t, idx) for t in (layer.keys, layer.values, layer.entries.positions)]
        _hold(policy, layer, *kept, {k: gather_entries(v[rows], idx) for k, v in state.items()}, budgets[i])


def _hold(policy: Policy, layer: BudgetedLayer, keys: Tensor, values: Tensor, positions: Tensor,
          state: dict[str, Tensor], budget: int) -> None:
    layer.hold(DenseEntries(keys, values, positions, state))
    layer.residual = policy.residual(budget)
    if policy.scorer.queries < 0:
        layer.clear_queries()


def _state_only(policy: Policy, layers: list[BudgetedLayer], budgets: list[int]) -> bool:
    """While the context fits its budget nothing is evicted, but a scorer with state still
    scores every layer to update it: stacked when the layers are alike (dense, unencoded, one
    length), then flushed together (`flush_layers`)."""
    if not policy.scorer.state_names:
        return False
    demotes = policy.store is not None and policy.store.demotes
    if policy.head_adaptive or demotes or not alike(layers) or len({layer.keys.shape[2] for layer in layers}) > 1:
        return False  # (unequal lengths would stack padded, and the state with them)
    b = layers[0].keys.shape[0]
    for g in groups(layers, GROUP_BYTES):
        obs = stacked_observation(layers[g], max(budgets[g]), policy.seed, policy.scorer.reads_values)
        policy.scorer.score(obs)  # only its state is kept: nothing is evicted
        for i, layer in enumerate(layers[g]):
            layer.set_state({k: v[i * b : (i + 1) * b] for k, v in obs.state.items()})
    for layer, budget in zip(layers, budgets):
        layer.residual = policy.residual(budget)
    flush_layers(layers)
    if policy.scorer.queries < 0:
        for layer in layers:
            layer.clear_queries()
    return True


# --- Ada-KV ---------------------------------------------------------------------------------------
@dataclass
class _Chosen:
    """One group of Ada-KV's batched compression between its choice and its keeping: what stays
    alive while the other groups are chosen."""

    layers: list[BudgetedLayer]
    chosen: Tensor  # [L, H, W] bool: the slots each layer keeps
    counts: Tensor  # [L, H]: kept per head
    rows: Tensor | None  # `Stacked.rows`; None: the layers are unpadded, a slot's index is its row
    positions: Tensor  # [L, H, W], stacked
    state: dict[str, Tensor]  # name -> [L, H, W], stacked, as the scorer left it


def _adaptive(policy: Policy, layers: list[BudgetedLayer], budgets: list[int], floor: float = 0.2) -> bool:
    """Ada-KV (`select.pick_across_heads`) for ``layers`` together: only when they are alike
    (dense or ragged, batch 1, the same heads, tokens seen, state and observed queries), share
    one budget and are all over it. In groups (in order of width: every head of a group is
    padded to the group's widest): each group's views stacked, scored and chosen; then one
    host read for every layer's kept counts; then each group's kept entries gathered from the
    layers' own storage. Between the two only each group's choice masks and small per-entry
    fields stay alive, not its stacked keys."""
    budget = budgets[0]
    if len(set(budgets)) > 1 or not alike(layers, ragged=True):
        return False
    if any(layer.total_entries() <= budget * layer.n_heads for layer in layers):
        return False  # the loop leaves such a layer as it is (or only updates the scorer's state)
    ragged = any(isinstance(layer.entries, RaggedEntries) for layer in layers)
    if (ragged or len({layer.max_entries for layer in layers}) > 1) and not policy.scorer.stackable_padded:
        return False
    layers = sorted(layers, key=lambda layer: layer.max_entries)
    sizes = [layer.entries.head_sizes() for layer in layers]
    # Entries per head on the device: one copy from the host for every group.
    lens = row_values([[n for s in sizes for n in s]], 1, layers[0].keys.device)[0].view(len(layers), -1)
    chosen = [_choose(policy, layers[g], sizes[g], lens[g], budget, floor) for g in groups(layers, GROUP_BYTES)]
    counts = torch.cat([c.counts for c in chosen])  # [L, H]: kept per head
    kept = [tuple(k) for k in counts.tolist()]  # the one host read
    kept_lens = counts.unbind()
    start = 0
    for c in chosen:
        end = start + len(c.layers)
        _keep_chosen(policy, c, kept_lens[start:end], kept[start:end], budget)
        start = end
    return True


def _choose(policy: Policy, layers: list[BudgetedLayer], sizes: list[tuple[int, ...]], lens: Tensor, budget: int,
            floor: float) -> _Chosen:
    """One group's scoring of its layers' views stacked along the batch (each head padded to the
    group's widest) and every layer's choice (`select.choose`), nothing read back. ``sizes``: the
    layers' entries per head on the host, ``lens`` the same on the device ([L, H])."""
    widths = [max(s) for s in sizes]
    entries = None
    if any(isinstance(layer.entries, RaggedEntries) for layer in layers) or len(set(widths)) > 1:
        entries = stacked_ragged(layers, sizes, lens.flatten(), max(widths), values=policy.scorer.reads_values)
    obs = stacked_observation(layers, budget, policy.seed, policy.scorer.reads_values, adaptive=True, entries=entries)
    picked = choose(ranked(policy.scorer.score(obs), obs, policy.protected(budget)), int(floor * budget), budget)
    return _Chosen(layers, picked, picked.sum(-1), None if entries is None else entries.rows, obs.positions, obs.state)


def _keep_chosen(policy: Policy, group: _Chosen, lens: tuple[Tensor, ...], kept: list[tuple[int, ...]],
                 budget: int) -> None:
    """Each layer of a chosen group keeps its picks (``lens`` [H] on the device, ``kept`` the same
    as ints, per layer): keys and values in one gather per field over the group's storages
    concatenated (a transient copy of one group's entries, unpadded), positions and the scorer's
    state from the stacked fields."""
    totals = [sum(k) for k in kept]
    slots = true_indices(group.chosen.flatten(), sum(totals))
    rows = slots if group.rows is None else group.rows.flatten().index_select(0, slots)

    def take(t: Tensor, index: Tensor) -> tuple[Tensor, ...]:
        return t.index_select(0, index).split(totals)

    keys = take(storages(group.layers, [layer.keys for layer in group.layers]), rows)
    values = take(storages(group.layers, [layer.values for layer in group.layers]), rows)
    positions = take(group.positions.flatten(), slots)
    state = {k: take(v.flatten(), slots) for k, v in group.state.items()}
    for i, layer in enumerate(group.layers):
        layer.residual = policy.residual(budget)
        layer.hold(RaggedEntries.held(keys[i], values[i], positions[i], {k: v[i] for k, v in state.items()}, lens[i],
                                      kept[i]))
        if policy.scorer.queries < 0:
            layer.clear_queries()


def storages(layers: list[BudgetedLayer], parts: list[Tensor]) -> Tensor:
    """One field of batch-1 layers' storages (``parts``, one per layer), ragged [N, ...] or dense
    [1, H, n, ...], as one tensor of rows, head after head, layer after layer (as the heads of one
    ragged layer): a copy unless there is one layer."""
    flat = [p if isinstance(layer.entries, RaggedEntries) else p[0].flatten(0, 1) for p, layer in zip(parts, layers)]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def stacked_ragged(layers: list[BudgetedLayer], sizes: list[tuple[int, ...]], lens: Tensor, width: int,
                   values: bool) -> Stacked:
    """Batch-1 layers, ragged or dense, stacked as their padded views would be, each head padded
    to ``width``: [L, H, width, ...]. One gather per field over the layers' storages
    concatenated, its index built from ``sizes`` (entries per head of each layer, on the host)
    and ``lens`` (the same on the device, [L*H], head after head): nothing is read back from the
    device. ``values``: whether to stack them (else None)."""
    h = len(sizes[0])
    # Heads lie one after the other in the concatenated storages, as in one ragged layer.
    rows, valid = padded_index(lens, width, sum(map(sum, sizes)))

    def stacked(parts: list[Tensor], fill: float = 0) -> Tensor:
        flat = storages(layers, parts)
        return take_padded(flat, rows, valid, fill).view(len(layers), h, width, *flat.shape[1:])

    return Stacked(
        keys=stacked([layer.keys for layer in layers]),
        values=stacked([layer.values for layer in layers]) if values else None,
        positions=stacked([layer.entries.positions for layer in layers], fill=-1),
        valid=valid.view(len(layers), h, width),
        state={k: stacked([layer.entries.state[k] for layer in layers]) for k in layers[0].entries.state},
        rows=rows,
    )
