"""Selection: which entries a layer keeps, from a scorer's scores.

The shared rules live here, once: the most recent tokens of the protected window are always
kept, padding and entries outside a sliding window never are, every head keeps its own top
``budget`` in their original order (`select`), or the heads of a layer share its budget (Ada-KV:
`pick_across_heads`), or, with a demoting store, entries outside the budget move to low
precision instead of leaving (`demotion_index`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .observation import Observation


def ranked(scores: Tensor, obs: Observation, window: int | Tensor) -> Tensor:
    """Scores with the protected window at +inf and padding at -inf. ``window``: one length, or
    one per batch row ([B, 1, 1], stacked layers of different budgets)."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    scores = scores.masked_fill(obs.positions >= obs.seen - window, float("inf"))
    if obs.window is not None:
        scores = scores.masked_fill(obs.positions <= obs.seen - obs.window, float("-inf"))
    if obs.valid is not None:
        scores = torch.where(obs.valid, scores, float("-inf"))
    return scores


def select(scores: Tensor, obs: Observation, window: int) -> tuple[Tensor, Tensor | None]:
    """Every head keeps its own top ``budget``: indices [B, H, k] ascending (+ per-head lengths
    when some heads hold fewer entries than k)."""
    scores = ranked(scores, obs, window)
    k = min(obs.budget, scores.shape[-1])
    # Padding scores -inf, so it sorts last among a short head's picks and stays beyond its length.
    index = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    lens = None if obs.valid is None else obs.valid[0].sum(-1).clamp(max=k)
    return index, lens


def select_across_heads(scores: Tensor, obs: Observation, window: int, floor: float = 0.2) -> tuple[Tensor, Tensor]:
    """Ada-KV (Feng et al. 2024): the best ``budget * heads`` entries over all heads of the layer,
    each head first guaranteed its best ``floor * budget``: heads keep different numbers of
    entries and the cache stores exactly those (ragged, batch 1). Ties go to the lower index
    (`choose`). Returns indices [1, H, max kept] (ascending; a head's first ``lens[h]`` are its
    picks) and ``lens`` [H]; the policy itself keeps `pick_across_heads`'s mask, without this
    padded index."""
    chosen, lens, kept = pick_across_heads(scores, obs, window, floor)
    h, n = chosen.shape
    order = torch.arange(n, device=chosen.device).expand(h, n)
    # Chosen entries first, in their original order; the rest pushed behind them.
    index = torch.where(chosen, order, order + n).argsort(dim=-1)[:, : max(kept)]
    return index[None], lens


def pick_across_heads(scores: Tensor, obs: Observation, window: int,
                      floor: float = 0.2) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """`select_across_heads`'s choice as a mask: chosen [H, n] bool, kept per head [H] (on the
    device) and the same as Python ints, read back in the one host<->device sync (the cache
    needs them on the host). The per-layer loop's choice; the stacked path (`batched`)
    makes the same one for many layers at once."""
    chosen = choose(ranked(scores, obs, window), int(floor * obs.budget), obs.budget)[0]  # [H, n]
    lens = chosen.sum(-1)
    return chosen, lens, tuple(lens.tolist())


def choose(scores: Tensor, guaranteed: int, budget: int) -> Tensor:
    """Ada-KV's choice for each of L layers of ranked scores ([L, H, W], padding at the end of
    each head at -inf): chosen [L, H, W] bool. Each head first keeps its best ``guaranteed``
    entries, then the layer its best entries among the rest over all heads (flattened head
    after head), up to ``budget * H`` in all; an entry at -inf (padding, a NaN score) is never
    kept, so a layer with fewer others keeps fewer.

    "Best" is by score, ties to the lower index: a stable descending sort, not `torch.topk`
    (which of tied entries a top-k returns depends on the whole row, so on its padding). With
    this rule and padding last, a layer's picks are the same whatever width it is padded to,
    so layers of any widths are chosen together: one sort per step for all of them, and each
    layer's count to add applied on the device (nothing read back here). Ties go differently
    than with the top-k used before."""
    n_layers, h, w = scores.shape
    g = min(guaranteed, w)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if g:
        best, order = scores.sort(dim=-1, descending=True, stable=True)
        chosen.scatter_(-1, order[..., :g], best[..., :g] > float("-inf"))
    # The rest ranked over all heads; a layer adds its first budget * H - (guaranteed kept) of
    # them that score above -inf (chosen entries are put at -inf: never picked twice).
    rest, order = scores.masked_fill(chosen, float("-inf")).flatten(1).sort(dim=-1, descending=True, stable=True)
    room = budget * h - chosen.flatten(1).sum(-1, keepdim=True)  # [L, 1]
    picked = (torch.arange(h * w, device=scores.device) < room) & (rest > float("-inf"))
    return chosen | torch.empty_like(picked).scatter_(-1, order, picked).view(n_layers, h, w)


def demotion_index(scores: Tensor, obs: Observation, n_body: int, window: int) -> Tensor:
    """MiKV: instead of evicting, full-precision entries outside each head's top ``budget`` move
    to the low-precision body. ``scores`` cover the full-precision tail only (encoded entries
    never return). Returns the rebuild index over all entries: [body | demoted | kept]."""
    scores = ranked(scores, obs, window)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    kept = order[..., : obs.budget].sort(dim=-1).values + n_body
    demoted = order[..., obs.budget :].sort(dim=-1).values + n_body
    body = torch.arange(n_body, device=scores.device).expand(*scores.shape[:2], n_body)
    return torch.cat([body, demoted, kept], dim=-1)
