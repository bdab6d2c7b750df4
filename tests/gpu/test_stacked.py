"""Stacked compression (layers scored and selected together) keeps exactly what the per-layer
loop keeps, on CUDA too, where a sort or top-k over more rows may take another algorithm than
over one layer's: Ada-KV (ragged layers), PyramidKV (layers of different budgets), H2O, and store
layers (SnapKV + KIVI-4, H2O + KIVI-2: also the codes and bytes); all layers in one group and one
layer per group. A 4-layer bf16 model of the 8B attention shape, 6k tokens in blocks of 1024,
budget 1024."""

import pytest
import torch

import kvbudget as kb
from kvbudget.compress import batched, engine
from kvbudget.kv.encoded import EncodedEntries

from .gpu_kit import random_ids

pytestmark = pytest.mark.gpu


def prefill(model, name: str, mode: str):
    policy = kb.policy(name, budget=1024)
    engine.BATCHED = mode != "loop"  # both restored after the test (tests/conftest.py)
    if mode == "one layer per group":
        batched.GROUP_BYTES = batched.STORE_GROUP_BYTES = 1
    cache = policy.new_cache(model)
    kb.prefill(model, cache, policy, random_ids(6144, seed=0))
    return cache


@pytest.mark.parametrize("mode", ["stacked", "one layer per group"], ids=["stacked", "one-layer-per-group"])
@pytest.mark.parametrize("name", ["adakv", "pyramidkv", "h2o", "snapkv+kivi4", "h2o+kivi2"])
@torch.inference_mode()
def test_stacked_compression_keeps_what_the_loop_keeps(model_bf16, name, mode):
    loop = prefill(model_bf16, name, "loop")
    stacked = prefill(model_bf16, name, mode)
    for i, (a, b) in enumerate(zip(stacked.layers, loop.layers)):
        assert torch.equal(a.view().positions, b.view().positions), f"layer {i}: positions differ"
        assert torch.equal(a.view().keys, b.view().keys), f"layer {i}: keys differ"
        assert a.nbytes() == b.nbytes(), f"layer {i}: bytes differ"
        if isinstance(a.entries, EncodedEntries):
            for k in a.entries.body.tokens:
                assert torch.equal(a.entries.body.tokens[k], b.entries.body.tokens[k]), f"layer {i}: body '{k}' differs"
