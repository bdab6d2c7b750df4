"""Allocators: how a budget is split over layers and heads. They compose with any scorer.

An allocator maps (budget per layer on average, number of budgeted layers, protected window) to
one integer budget per layer whose sum never exceeds ``budget * n_layers``. ``head-adaptive``
keeps uniform layer budgets and lets the heads of a layer share theirs (one top-k over all
heads, `compress.select.select_across_heads`). ``sensitivity`` (EpiCache) splits it by each
layer's measured sensitivity to block-wise prefill. ``per-layer:S1/S2/...`` gives each layer a
share of the total that the user chooses (the peer library's per-layer compression ratios).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import BudgetError, KVBudgetError

Allocator = Callable[[int, int, int], list[int]]


def uniform(budget: int, n_layers: int, window: int) -> list[int]:
    """The same budget in every layer."""
    return [budget] * n_layers


def pyramid(budget: int, n_layers: int, window: int, beta: float = 20.0) -> list[int]:
    """PyramidKV (Cai et al. 2024): budgets fall linearly from the bottom layer to the top one.

    Following the paper's allocation, the part above the window runs from ``2*B - B/beta`` at
    layer 0 down to ``B/beta`` at the top (B = budget - window), so the mean is the uniform
    budget; flooring keeps the total at or under ``budget * n_layers``.
    """
    if n_layers == 1:
        return [budget]
    free = max(budget - window, 0)
    top = free / beta
    bottom = 2 * free - top
    step = (bottom - top) / (n_layers - 1)
    return [max(1, int(bottom - i * step) + min(window, budget)) for i in range(n_layers)]


def sensitivity_budgets(budget: int, scores: list[float], alpha: float, floor: int) -> list[int]:
    """EpiCache's layer budgets (`runtime.profile` measures the sensitivities ``scores``):
    ``M_l = L * M * s_l^alpha / sum_k s_k^alpha`` on top of a floor of ``floor`` entries per
    layer (the protected window, so that no layer is starved to zero: a deviation from the bare
    formula); they sum to at most ``budget * L``."""
    n = len(scores)
    floor = min(floor, budget)
    weights = torch.tensor(scores, dtype=torch.float64) ** alpha
    weights = weights / weights.sum()
    free = (budget - floor) * n
    return [floor + int(free * float(w)) for w in weights]


def per_layer(shares: list[float]) -> Allocator:
    """One budget share per layer, in layer order: layer l keeps ``budget * share_l / mean(shares)``
    entries (floored, so the total stays at or under ``budget * n_layers``). Shares are relative:
    ``[2, 1, 1]`` gives the first layer twice the others' budget."""
    if not shares or any(not 0 < s < math.inf for s in shares):
        raise BudgetError(f"per-layer shares must be positive numbers, got {shares}")

    def allocate(budget: int, n_layers: int, window: int) -> list[int]:
        if len(shares) != n_layers:
            raise BudgetError(f"per-layer allocator: {len(shares)} shares given for {n_layers} budgeted layers")
        mean = sum(shares) / n_layers
        budgets = [int(budget * s / mean) for s in shares]
        if min(budgets) < 1:
            raise BudgetError(f"per-layer allocator: a share of {min(shares)} leaves a layer no entry at budget {budget}")
        return budgets

    return allocate


PER_LAYER = "per-layer:"

ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "pyramid": pyramid, "head-adaptive": uniform,
                                    # EpiCache's: needs the model's profile, applied by the Policy.
                                    "sensitivity": uniform}
# Allocators whose heads share the layer budget (variable per-head lengths).
HEAD_ADAPTIVE = {"head-adaptive"}


def get_allocator(name: str) -> Allocator:
    """The allocator called ``name`` (``per-layer:2/1/1`` builds one from its shares), or a clear
    error listing the known ones."""
    if name.startswith(PER_LAYER):
        try:
            shares = [float(s) for s in name[len(PER_LAYER) :].split("/")]
        except ValueError:
            raise KVBudgetError(f"allocator '{name}': shares must be numbers separated by '/', e.g. per-layer:2/1/1") from None
        return per_layer(shares)
    try:
        return ALLOCATORS[name]
    except KeyError:
        raise KVBudgetError(f"unknown allocator '{name}' (known: {', '.join(ALLOCATORS)}, {PER_LAYER}S1/S2/...)") from None
