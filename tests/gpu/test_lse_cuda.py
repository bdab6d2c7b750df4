"""The attention call's log-sum-exp, reused by the scoring, on CUDA.

The flash op the hook runs equals the torch reference `attention_with_lse` and the path without
LSE (bf16, GQA 32/8, d 128); scores from its LSE equal the kernel's own two passes; H2O
block-wise prefill and decode-time compression receive it and keep nearly the same entries as
without it.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvbudget as kb
from kvbudget.compress import scoring
from kvbudget.kv.plan import AttentionPlan
from kvbudget.kernels.flash import attention_with_lse, flash_attention_with_lse

from .gpu_kit import answer, lse_env, overlap, random_ids

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n_old,m", [(2048, 2048), (2048, 1), (0, 1024)], ids=["block", "decode-step", "first-block"])
def test_flash_attention_with_lse_equals_reference(n_old, m):
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=4, is_causal=True)
    scale = 128 ** -0.5
    q = torch.randn(1, 32, m, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8, n_old + m, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 8, n_old + m, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = flash_attention_with_lse(q, k, v, n_old, scale)
    ref_out, ref_lse = attention_with_lse(q, k, v, n_old, scale)
    mask = AttentionPlan(keys=k, head_lens=None, n_old=n_old, layer=None).mask(m, 32)
    old_out = sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0].transpose(1, 2)
    assert out.shape == ref_out.shape == old_out.shape and lse.shape == ref_lse.shape == (1, 32, m)
    assert lse.dtype == torch.float32
    top = float(ref_out.float().abs().max())
    assert float((out.float() - ref_out.float()).abs().max()) / top < 1e-2, "output vs the torch reference"
    assert float((out.float() - old_out.float()).abs().max()) / top < 1e-2, "output vs sdpa with the plan's mask"
    assert float((lse - ref_lse).abs().max()) < 5e-3, "log-sum-exp vs the torch reference"


@pytest.mark.parametrize("name,rows", [("h2o", 2048), ("snapkv", 32)])
def test_scores_from_the_kept_lse_equal_the_two_pass_kernel(model_bf16, name, rows):
    """After a block over a compressed cache, each layer's kept LSE (from the flash op) gives the
    same attention sums as the Triton kernel's own first pass over the same queries and keys:
    H2O's (every query of the block) and SnapKV's (its window of 32, kept across the compression
    before the block, whose LSE the block's rows replace)."""
    policy = kb.policy(name, budget=1024)
    cache = policy.new_cache(model_bf16)
    with lse_env("auto"):
        kb.prefill(model_bf16, cache, policy, random_ids(4096), 2048, compress_last=False)
    worst = 0.0
    for layer in cache.layers:
        assert layer.observed.lse is not None and layer.observed.lse.shape[2] == layer.observed.queries.shape[2] == rows
        view = layer.view()
        args = (layer.observed.queries, view.keys, view.positions, None, layer.observed.positions, layer.observed.scaling)
        one = scoring.attention_reduce(*args, path="triton", lse=layer.observed.lse)
        two = scoring.attention_reduce(*args, path="triton")
        worst = max(worst, float((one - two).abs().max() / two.abs().max()))
    assert worst < 2e-2, f"max rel err {worst:.1e}"


def test_h2o_prefill_receives_the_lse_and_keeps_nearly_the_same(model_bf16):
    """H2O block-wise prefill (8k tokens, blocks of 2048, budget 1024) with the LSE (auto) and
    without (off): every Triton reduction receives it with auto and none with off; the kept
    positions overlap. Layer 0's keys do not depend on attention, so there only the LSE's
    rounding can change a pick; deeper layers also see the two attention kernels' bf16 rounding
    (flash vs sdpa with a mask), which moves near-tied picks."""
    ids = random_ids(8192)
    caches, flags = {}, {}
    for mode in ("auto", "off"):
        policy = kb.policy("h2o", budget=1024)
        cache = policy.new_cache(model_bf16)
        with lse_env(mode) as seen:
            kb.prefill(model_bf16, cache, policy, ids, 2048)
        caches[mode], flags[mode] = cache, seen
    share = overlap(caches["auto"], caches["off"])
    assert flags["auto"] and all(flags["auto"]) and not any(flags["off"]), "the LSE did not reach every reduction"
    assert share[0] >= 0.95 and sum(share) / len(share) >= 0.8, f"kept overlap per layer {share}"


def test_decode_time_compression_receives_the_decode_steps_lse(model_bf16):
    """Eager decode steps (one query through the flash op) keep their LSE, and decode-time
    compression receives it."""
    policy = kb.policy("h2o", budget=512, decode_interval=16)
    cache = policy.new_cache(model_bf16)
    with lse_env("auto") as seen, torch.inference_mode():
        logits, _ = kb.prefill(model_bf16, cache, policy, random_ids(3000), 512)
        n_prefill = len(seen)
        answer(model_bf16, cache, policy, logits, 48, "eager")
    decode_flags = seen[n_prefill:]
    assert decode_flags and all(decode_flags), f"{sum(decode_flags)}/{len(decode_flags)} reductions got the LSE"
