"""EpiCache's sensitivity-aware layer budgets (specs/epicache.md §5).

Block-wise prefill changes the keys of some layers more than others. Profiling runs a sample
twice — full causal attention, and attention restricted as block-wise prefill sees it (``sinks``
first tokens + the current block + half of the previous block) — and compares the key caches
layer by layer: sensitivity ``s_l = 1 - cos(K_full, K_block)`` (mean over heads and tokens).
Budgets: ``M_l = L * M * s_l^alpha / sum_k s_k^alpha`` (alpha = 0: uniform), on top of a floor of
the protected window per layer (every layer keeps its recent window; a deviation from the bare
formula so that no layer is starved to zero).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .errors import KVBudgetError
from .fileio import atomic_write_text


def block_mask(n: int, block: int, sinks: int, overlap: float = 0.5, device=None) -> Tensor:
    """[1, 1, n, n] bool: causal, and token i sees the sinks, its own block and the last
    ``overlap`` of the previous block."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    start = (i // block) * block - int(overlap * block)
    return ((j <= i) & ((j < sinks) | (j >= start)))[None, None]


@torch.inference_mode()
def profile(model, input_ids: Tensor, block: int = 128, sinks: int = 8, overlap: float = 0.5) -> dict:
    """Per-layer sensitivity of the full-attention layers of ``model`` on ``input_ids`` [1, n]."""
    from transformers import DynamicCache

    ids = input_ids.to(model.device)
    keys = []
    for mask in (None, block_mask(ids.shape[1], block, sinks, overlap, ids.device)):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
        keys.append([layer.keys.float() for layer in cache.layers])
    text = model.config.get_text_config(decoder=True)
    types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    sims = [
        float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
        for t, a, b in zip(types, *keys)
        if t == "full_attention"
    ]
    return {"sensitivity": [max(1.0 - s, 1e-6) for s in sims], "similarity": sims,
            "block": block, "sinks": sinks, "overlap": overlap, "tokens": ids.shape[1]}


def budgets(budget: int, scores: list[float], alpha: float, floor: int) -> list[int]:
    """Layer budgets summing to at most ``budget * L``: ``floor`` each, the rest split by s^alpha."""
    n = len(scores)
    floor = min(floor, budget)
    weights = torch.tensor(scores, dtype=torch.float64) ** alpha
    weights = weights / weights.sum()
    free = (budget - floor) * n
    return [floor + int(free * float(w)) for w in weights]


def profile_path(name: str) -> Path:
    """Where the shipped profile of a model named ``name`` lives."""
    return Path(str(resources.files("kvbudget") / "profiles" / f"{name}.json"))


def load_scores(model, path: str | Path | None = None) -> list[float]:
    """Sensitivity scores for ``model``: from ``path``, or the profile shipped for its name."""
    name = getattr(model, "kvbudget_name", None)
    path = Path(path) if path else (profile_path(name) if name else None)
    if path is None or not path.exists():
        raise KVBudgetError(
            f"no sensitivity profile for model '{name or model.config.name_or_path}': "
            "run `kvbudget profile --model M --out scores.json` and pass profile='scores.json'"
        )
    data = json.loads(path.read_text())
    n = sum(1 for t in (getattr(model.config.get_text_config(decoder=True), "layer_types", None) or
                        ["full_attention"] * model.config.get_text_config(decoder=True).num_hidden_layers)
            if t == "full_attention")
    if len(data["sensitivity"]) != n:
        raise KVBudgetError(f"profile {path} has {len(data['sensitivity'])} layers, the model has {n} budgeted layers")
    return list(data["sensitivity"])


def save_profile(data: dict, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))
