"""Layer sensitivity profiles: what EpiCache's allocator (`compress.allocation.sensitivity_budgets`)
splits the budget by.

Block-wise prefill changes the keys of some layers more than others. Profiling runs a sample
twice — full causal attention, and attention restricted as block-wise prefill sees it (``sinks``
first tokens + the current block + half of the previous block) — and compares the key caches
layer by layer: sensitivity ``s_l = 1 - cos(K_full, K_block)`` (mean over heads and tokens).

Profiles: the default models' ship in the package; any other model is profiled once, on the
package's text sample (`profiles/sample.txt`, a seeded multi-session conversation), the first
time a session needs it (`ensure_profile`), and the result is kept under
``$KVBUDGET_CACHE/profiles``, keyed by the model's name and a hash of its config.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from ..errors import KVBudgetError
from ..fileio import atomic_write_text
from .modelcall import run
from .models import cache_dir

SAMPLE_TOKENS = 2048


def block_mask(n: int, block: int, sinks: int, overlap: float = 0.5, device=None) -> Tensor:
    """[1, 1, n, n] bool: causal, and token i sees the sinks, its own block and the last
    ``overlap`` of the previous block."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    start = (i // block) * block - int(overlap * block)
    return ((j <= i) & ((j < sinks) | (j >= start)))[None, None]


@torch.inference_mode()
def profile(model, input_ids: Tensor, block: int = 128, sinks: int = 8, overlap: float = 0.5) -> dict:
    """Per-layer sensitivity of the attention layers of ``model`` on ``input_ids`` [1, n]: the
    keys each layer's cache holds after a full causal pass and after a block-restricted one (a
    sliding-window layer holds its last ``window - 1`` tokens in both)."""
    ids = input_ids.to(model.device)
    keys = []
    for mask in (None, block_mask(ids.shape[1], block, sinks, overlap, ids.device)):
        keys.append(_layer_keys(model, ids, mask))
    sims = [float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()) for a, b in zip(*keys)]
    return {"sensitivity": [max(1.0 - s, 1e-6) for s in sims], "similarity": sims,
            "block": block, "sinks": sinks, "overlap": overlap, "tokens": ids.shape[1]}


def _layer_keys(model, ids: Tensor, mask: Tensor | None) -> list[Tensor]:
    """Each attention layer's keys (as returned by a cache's update: after RoPE) for one pass."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    run(model, cache, ids, attention_mask=mask, logits_to_keep=1)
    return [layer.keys.float() for layer in cache.layers]


def profile_path(name: str) -> Path:
    """Where the shipped profile of a model named ``name`` lives."""
    return Path(str(resources.files("kvbudget") / "profiles" / f"{name}.json"))


def model_name(model) -> str:
    """The model's name in messages: kvbudget's name for it, else its path or type."""
    return (getattr(model, "kvbudget_name", None) or getattr(model.config, "name_or_path", None)
            or model.config.model_type)


def model_key(model) -> str:
    """A file name for ``model``'s cached profile: its name and a hash of its config."""
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha256(config.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', model_name(model))[-64:]}-{digest}"


def find_profile(model, path: str | Path | None = None) -> Path | None:
    """``path`` if given, else the profile shipped for the model's name, else the one profiled
    and cached for it; None when there is none yet."""
    if path:
        return Path(path)
    name = getattr(model, "kvbudget_name", None)
    for candidate in ((profile_path(name) if name else None), cache_dir() / "profiles" / f"{model_key(model)}.json"):
        if candidate is not None and candidate.exists():
            return candidate
    return None


def ensure_profile(model, tok, path: str | Path | None = None) -> Path:
    """The model's profile (`find_profile`), made on the package's text sample and cached when
    there is none yet (two passes over `SAMPLE_TOKENS` tokens, announced on stderr)."""
    found = find_profile(model, path)
    if found is not None:
        return found
    target = cache_dir() / "profiles" / f"{model_key(model)}.json"
    print(f"kvbudget: profiling the layer sensitivity of {model_name(model)} for EpiCache's layer budgets "
          f"(once; kept in {target})", file=sys.stderr)
    text = (resources.files("kvbudget") / "profiles" / "sample.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :SAMPLE_TOKENS]
    data = profile(model, ids)
    data["model"] = model_name(model)
    save_profile(data, target)
    return target


def load_scores(model, path: str | Path | None = None) -> list[float]:
    """Sensitivity scores for ``model``: from ``path``, the shipped profile, or the cached one."""
    found = find_profile(model, path)
    if found is None or not found.exists():
        raise KVBudgetError(
            f"no sensitivity profile for model '{model_name(model)}': a Session profiles it on first use; "
            "or run `kvbudget profile --model M --out scores.json` and pass profile='scores.json'"
        )
    data = json.loads(found.read_text())
    n = _attention_layers(model.config.get_text_config(decoder=True))
    if len(data["sensitivity"]) != n:
        raise KVBudgetError(f"profile {found} has {len(data['sensitivity'])} layers, the model has {n} attention layers")
    return list(data["sensitivity"])


def _attention_layers(config) -> int:
    """Attention layers holding their own cache (layers sharing another's KV do not)."""
    return config.num_hidden_layers - (getattr(config, "num_kv_shared_layers", None) or 0)


def save_profile(data: dict, path: str | Path) -> None:
    """Write a profile atomically (its directory created)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))
