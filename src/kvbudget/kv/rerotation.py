"""Key re-rotation (StreamingLLM's position handling): after an eviction, every kept key is
rotated from the position it was computed at to a contiguous one, so the next token's position
stays bounded by what the cache holds and a conversation under a budget can outlast the model's
positions.

RoPE rotates each pair of channels of a key by ``position * inv_freq``; rotating a stored key
by ``delta * inv_freq`` moves it to ``position + delta`` exactly (a pure rotation: the model's
``attention_scaling`` is already in the stored key). The frequencies are the model's own, read
from its rotary embedding module, per layer (Gemma 3: local and global layers differ). Only
the ``rotate_half`` form of RoPE is re-rotated (`ROTATE_HALF`: Llama, Qwen, Mistral, Gemma,
Phi-3...; a partial rotary dimension rotates the first ``2 * len(inv_freq)`` channels, as
those models do); any other family, and RoPE variants whose frequencies change with the
sequence length, are refused when the cache is made (`rotary_frequencies`).

Where the kept entries go (`contiguous_positions`): the next token's position becomes ``L``, the
most entries any head of any layer holds (positions are shared by every layer: the model
computes one position per token). Head h with ``n_h`` entries keeps their order with its
newest at ``L - 1``, next to the next query (what local attention leans on), and the
``L - n_h`` positions a shorter head (Ada-KV, a pyramid's smaller layers) leaves free go right
after its unbroken run from position 0 (attention sinks, which scorers such as StreamingLLM's
recognise by position; an untouched prefix stays where it is), or at its start if it has none.
Where every head holds ``L`` entries, that is 0..L-1. Queries kept for a scorer (a window of the
latest tokens) move with the newest entries, by ``L - seen``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import KVBudgetError, UnsupportedModelError
from .dense import DenseEntries
from .encoded import EncodedEntries
from .layer import BudgetedLayer
from .ragged import RaggedEntries, padded_to_ragged

# Model families whose attention applies RoPE as ``x * cos + rotate_half(x) * sin`` over the
# first ``2 * len(inv_freq)`` channels, with one frequency vector per layer type.
ROTATE_HALF = frozenset({
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3", "gemma3_text", "phi3", "phi", "starcoder2", "granite", "olmo", "olmo2", "smollm3", "stablelm",
    "gpt_neox",
})
# RoPE types whose frequencies change with the sequence length: a key computed at one length
# could not be moved with the frequencies of another.
LENGTH_DEPENDENT = ("dynamic", "longrope")


def rotary_frequencies(model, layers: list[BudgetedLayer]) -> list[Tensor]:
    """The model's RoPE ``inv_freq`` for each of the cache's ``layers`` (float32, on the model's
    device). Raises `UnsupportedModelError` naming the family when its keys cannot be re-rotated."""
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedModelError("key re-rotation reads the model's rotary embedding: build the cache from the model")
    config = model.config.get_text_config(decoder=True)
    family = getattr(config, "model_type", "") or type(config).__name__
    if family not in ROTATE_HALF:
        raise UnsupportedModelError(
            f"{family}: key re-rotation supports the rotate_half RoPE of {', '.join(sorted(ROTATE_HALF))}; "
            f"this model's positions are not known to be encoded that way (no RoPE, interleaved or multimodal RoPE)")
    rotary = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
    if len(rotary) != 1:
        raise UnsupportedModelError(f"{family}: key re-rotation needs one rotary embedding module, found {len(rotary)}")
    rotary = rotary[0]
    kinds = getattr(rotary, "rope_type", "default")
    out = []
    for layer in layers:
        kind = "full_attention" if layer.window is None else "sliding_attention"
        inv_freq = getattr(rotary, f"{kind}_inv_freq", None)
        if inv_freq is None:
            inv_freq = getattr(rotary, "inv_freq", None)
        rope_type = kinds.get(kind) if isinstance(kinds, dict) else kinds
        if inv_freq is None:
            raise UnsupportedModelError(f"{family}: no RoPE frequencies for its {kind} layers")
        if rope_type in LENGTH_DEPENDENT:
            raise UnsupportedModelError(f"{family}: key re-rotation cannot move keys of '{rope_type}' RoPE "
                                        "(its frequencies change with the sequence length)")
        out.append(inv_freq.detach().float().clone())
    return out


def rotate(keys: Tensor, delta: Tensor, inv_freq: Tensor) -> Tensor:
    """``keys`` ([..., n, d], RoPE applied at some positions) moved by ``delta`` ([..., n])
    positions: their first ``2 * len(inv_freq)`` channels rotated (rotate_half layout), the
    rest as they are."""
    r = 2 * inv_freq.numel()
    half = r // 2
    # Angles in float64: a delta of 10^5 times a frequency near 1 keeps its float32 rounding out.
    angle = delta.to(torch.float64)[..., None] * inv_freq.to(keys.device, torch.float64)
    cos, sin = angle.cos().float(), angle.sin().float()
    x = keys[..., :r].float()
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(keys.dtype)
    return rotated if r == keys.shape[-1] else torch.cat([rotated, keys[..., r:]], dim=-1)


def contiguous_positions(positions: Tensor, valid: Tensor | None, end: int) -> Tensor:
    """Where the entries of a padded view go (``positions`` [B, H, W], ``valid`` its held slots,
    None = all), the next token at ``end`` (module docstring): [B, H, W] (padding: anything)."""
    slot = torch.arange(positions.shape[-1], device=positions.device)
    held = torch.ones_like(positions, dtype=torch.bool) if valid is None else valid
    n = held.sum(-1, keepdim=True)
    prefix = ((positions == slot) & held).int().cumprod(-1).sum(-1, keepdim=True)  # unbroken run from 0
    return torch.where(slot < prefix, slot, end - n + slot).to(positions.dtype)


def rerotate_layer(layer: BudgetedLayer, inv_freq: Tensor, end: int, position_state: tuple[str, ...] = ()) -> None:
    """Move ``layer``'s entries to contiguous positions before ``end`` (`contiguous_positions`),
    its kept queries by ``end - layer.seen``, and its next position to ``end``; the per-entry
    state named in ``position_state`` (positions a scorer keeps) moves with the entries."""
    entries = layer.entries
    if isinstance(entries, EncodedEntries):
        raise KVBudgetError(f"key re-rotation needs full-precision keys; store '{layer.store.name}' encodes them")
    if isinstance(entries, DenseEntries):
        delta = contiguous_positions(entries.positions, None, end) - entries.positions
        layer.hold(DenseEntries(rotate(entries.keys, delta, inv_freq), entries.values, entries.positions + delta,
                                _moved_state(entries.state, delta, position_state)))
    elif isinstance(entries, RaggedEntries):
        view = entries.view()
        padded = contiguous_positions(view.positions, view.valid, end) - view.positions
        delta = padded_to_ragged(padded[0], entries.head_lens, entries.total_entries())
        layer.hold(RaggedEntries(rotate(entries.keys, delta, inv_freq), entries.values, entries.positions + delta,
                                 _moved_state(entries.state, delta, position_state), entries.head_lens, entries.sizes))
    observed = layer.observed
    shift = end - layer.seen
    if observed.queries is not None and shift:
        moved = observed.positions.new_full(observed.positions.shape, shift)
        observed.queries = rotate(observed.queries, moved, inv_freq)
        observed.positions = observed.positions + shift
        observed.drop_lse()
    layer.seen = end


def _moved_state(state: dict[str, Tensor], delta: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-entry ``state`` with the entries named ``names`` (positions a scorer keeps) moved by ``delta``."""
    return {k: s + delta.to(s.dtype) if k in names else s for k, s in state.items()}


def rerotate(cache, position_state: tuple[str, ...] = ()) -> None:
    """Move every layer of ``cache`` (a `BudgetedCache` made with ``cache.rotary`` set) to
    contiguous positions (`rerotate_layer`): the next token goes at the most entries any head
    holds, and ``cache.rolled`` counts the positions given back."""
    if cache.rotary is None:
        raise KVBudgetError("this cache has no RoPE frequencies to re-rotate with: make it with the re-rotating "
                            "policy's new_cache(model)")
    layers = [layer for layer in cache.layers if layer.is_initialized]
    if not layers:
        return
    seen = cache.layers[0].seen
    end = max(layer.max_entries for layer in layers)
    for layer, inv_freq in zip(cache.layers, cache.rotary):
        if layer.is_initialized:
            rerotate_layer(layer, inv_freq, end, position_state)
        else:
            layer.seen = end
    cache.rolled += seen - end
