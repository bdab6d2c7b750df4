"""A prefill block over a ragged layer (per-head lengths: Ada-KV) through varlen flash attention,
on CUDA: equal to the masked SDPA path over padded keys, and an Ada-KV prefill keeps the same
entries in layer 0 with it as without it."""

import pytest
import torch
from ragged_layout import padded_segments

import kvbudget as kb
from kvbudget.kv.plan import AttentionPlan
from kvbudget.kernels.flash import ragged_flash

from .gpu_kit import env, lse_env, overlap, random_ids

pytestmark = pytest.mark.gpu


@torch.inference_mode()
def test_varlen_flash_equals_masked_sdpa():
    """bf16, GQA 32/8, d 128, 2048 queries, per-head old lengths 1200-2800."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, g, d, m = 8, 4, 128, 2048
    old = torch.randint(1200, 2800, (h,), device="cuda", generator=gen)
    lens = tuple(int(n) + m for n in old.tolist())
    flat_k = torch.randn(sum(lens), d, device="cuda", generator=gen).bfloat16()
    flat_v = torch.randn(sum(lens), d, device="cuda", generator=gen).bfloat16()
    query = torch.randn(1, h * g, m, d, device="cuda", generator=gen).bfloat16()
    pad_k, pad_v = padded_segments(flat_k, flat_v, old.tolist(), m)
    scale = d**-0.5
    mask = AttentionPlan(keys=pad_k, head_lens=old, n_old=int(old.max()), layer=None).mask(m, h * g)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, pad_k.repeat_interleave(g, 1), pad_v.repeat_interleave(g, 1), attn_mask=mask, scale=scale)
    got = ragged_flash(query, flat_k, flat_v, lens, scale).float()
    err = float((got - want.transpose(1, 2).float()).abs().max())
    assert err < 2e-2, f"max |err| {err:.1e}"


@torch.inference_mode()
def test_adakv_prefill_layer0_keeps_the_same_entries(model_bf16):
    """Scoring forced to one path (chunked) for both runs, so that only the attention path
    differs (``KVBUDGET_ATTENTION_LSE=off`` takes the masked path). Layer 0's queries and keys
    do not depend on any attention output: its picks must be the same. Deeper layers see the two
    paths' bf16 roundings through their inputs, and on random weights (flat attention) Ada-KV's
    choice across heads moves near-tied picks: not asserted."""
    caches = []
    for mode in ("auto", "off"):
        with lse_env(mode), env("KVBUDGET_SCORING", "chunked"):
            policy = kb.policy("adakv", budget=1024)
            cache = policy.new_cache(model_bf16)
            kb.prefill(model_bf16, cache, policy, random_ids(6144, seed=0))
            caches.append(cache)
    share = overlap(*caches)
    assert share[0] == 1.0, f"kept overlap per layer {share}"
