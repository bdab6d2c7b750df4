"""Fidelity of a compressed cache against the full cache, measured inside the model.

`attention_error`: for every budgeted layer, the attention output of the same queries (the last
``probe`` context tokens, taken from the full-cache run) over the full cache and over the
policy's cache (dequantized, pruned, evicted), as a relative L2 error. This isolates what a
store or an eviction does to one attention call, without errors compounding through layers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compress import Observation, Policy
from ..kv.layer import BudgetedLayer
from ..methods import make_policy
from ..runtime.prefill import BLOCK_SIZE, prefill


def _attend(layer: BudgetedLayer, queries: Tensor, query_positions: Tensor, scaling: float) -> Tensor:
    """Attention output [B, Hq, m, dv] of ``queries`` over the entries ``layer`` holds."""
    view = layer.view()
    obs = Observation(
        0, 1, view.keys, view.values, view.positions, view.valid, queries, query_positions, scaling, 0, layer.seen, 0
    )
    weights = obs.group_attention()  # [B, H, g, m, n]
    out = torch.einsum("bhgmn,bhnd->bhgmd", weights, view.values.float())
    return out.flatten(1, 2)


@torch.inference_mode()
def attention_error(model, input_ids: Tensor, policy: Policy, block_size: int = BLOCK_SIZE,
                    probe: int = 32) -> list[float]:
    """Relative L2 error of each layer's attention output, ``policy`` vs the full cache."""
    reference = make_policy("full")
    full = reference.new_cache(model)
    for layer in full.layers:
        layer.observed.keep = probe
    prefill(model, full, reference, input_ids, block_size, compress_last=False)
    cache = policy.new_cache(model)
    cache.tokens = policy.resolve(cache, context_tokens=input_ids.shape[1])
    cache.target_bytes = policy.target_bytes(cache, input_ids.shape[1])
    prefill(model, cache, policy, input_ids, block_size)
    errors = []
    for ref_layer, layer in zip(full.layers, cache.layers):
        observed = ref_layer.observed
        q, qpos, scaling = observed.queries, observed.positions, observed.scaling
        expected = _attend(ref_layer, q, qpos, scaling)
        got = _attend(layer, q, qpos, scaling)
        errors.append(float((got - expected).norm() / expected.norm()))
    return errors


def next_token_fidelity(reference: Tensor, other: Tensor) -> tuple[float, float]:
    """Top-1 agreement and mean KL(reference || other) of next-token distributions.

    Both are log-softmax rows [T, vocab] at the same positions: the full cache's answer span
    (``reference``, from its greedy decoding) and another cache teacher-forced on that answer.
    Agreement is the share of positions whose argmax tokens match; KL is in nats, averaged over
    positions (0 and 1 for identical distributions).
    """
    if reference.shape != other.shape or reference.dim() != 2 or reference.shape[0] == 0:
        raise ValueError(f"need two non-empty [T, vocab] log-prob tensors of one shape, got "
                         f"{tuple(reference.shape)} and {tuple(other.shape)}")
    reference, other = reference.float(), other.float()
    agreement = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    p = reference.exp()
    # Where the reference gives a token no mass, it adds nothing (avoids 0 * inf = nan).
    kl = torch.where(p > 0, p * (reference - other), 0.0).sum(-1).clamp_min(0).mean()
    return float(agreement), float(kl)
