"""On CUDA, the full cache through block-wise prefill and a plain decode loop gives the model's
own greedy `generate` (float32 and 4 layers of the 8B shape: in bf16 the rounding of block-wise
and one-shot prefill differ)."""

import pytest
import torch

import kvbudget as kb

from .gpu_kit import random_ids

pytestmark = pytest.mark.gpu


@torch.inference_mode()
def test_full_cache_equals_generate(model_f32):
    ids = random_ids(300, seed=0)
    policy = kb.policy("full")
    cache = policy.new_cache(model_f32)
    logits, _ = kb.prefill(model_f32, cache, policy, ids, block_size=128)
    ours = []
    for _ in range(16):
        tok = logits.argmax(-1, keepdim=True)
        ours.append(int(tok))
        logits = model_f32(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
    ref = model_f32.generate(ids, max_new_tokens=16, do_sample=False)[0, 300:].tolist()
    assert ours == ref
