"""Which transformers models kvbudget's cache can hold, and a clear error for the others.

The cache holds per-head keys and values of full and sliding-window attention layers called
through transformers' attention interface. Models that cache something else are refused when a
cache (so a `Session`) is created, naming the family and why, never in the middle of a prefill:

* encoder-decoder models (a cross-attention cache beside the decoder's);
* multi-head latent attention (DeepSeek-V2/V3, Kimi K2...: the cache holds a compressed latent);
* linear-attention and state-space layers, alone (Mamba, RWKV) or in hybrids (Jamba, Falcon-H1,
  Qwen3-Next, LFM2, Zamba, Bamba...): their recurrent state is not a list of entries to evict.
  Budgeting only the attention layers of such hybrids would leave most of their state outside
  the budget; they are refused rather than half-bounded.
"""

from __future__ import annotations

from ..errors import UnsupportedModelError

ATTENTION_LAYERS = ("full_attention", "sliding_attention")
# Config attributes that only recurrent (state-space / linear-attention) layers have.
_RECURRENT_MARKERS = ("mamba_d_ssm", "mamba_n_heads", "mamba_d_state", "ssm_state_size", "state_size",
                      "linear_num_value_heads", "conv_L_cache", "layers_block_type", "attn_layer_indices",
                      "full_attn_idxs", "linear_attn_config")


def unsupported_reason(config) -> str | None:
    """Why kvbudget's cache cannot hold a model with this config, or None when it can."""
    family = getattr(config, "model_type", "") or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{family} is an encoder-decoder model: kvbudget budgets the cache of decoder-only causal LMs"
    text = config.get_text_config(decoder=True)
    if getattr(text, "kv_lora_rank", None):
        return (f"{family} uses multi-head latent attention: its cache holds a compressed latent per "
                "token, not per-head keys and values that kvbudget can score and evict")
    types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in types if t not in ATTENTION_LAYERS})
    marker = next((m for m in _RECURRENT_MARKERS if getattr(text, m, None) is not None), None)
    if other or marker:
        what = f"'{other[0]}' layers" if other else "state-space (recurrent) layers"
        return (f"{family} has {what}: their recurrent state is not a list of KV entries, so a "
                "budget could not bound it (kvbudget holds full and sliding-window attention layers)")
    if getattr(text, "num_attention_heads", None) is None or getattr(text, "num_hidden_layers", None) is None:
        return f"{family} has no attention layers kvbudget recognises"
    return None


def check_supported(config) -> None:
    """Raise `UnsupportedModelError` naming the family and why, when its cache cannot be budgeted."""
    reason = unsupported_reason(config)
    if reason is not None:
        raise UnsupportedModelError(reason)
