"""The architecture matrix on CUDA: every family's tiny model (tests/families.py, built with plain
transformers), moved to the GPU, decodes under the `full` policy with static buffers and one CUDA
graph per token (the fused element-wise ops where the family has them) and gives plain
transformers' greedy tokens (`model.generate` on an untouched copy, its own cache and attention).

bfloat16 (every family): token for token up to the first step where the reference's two best
logits lie within bf16 rounding of each other (two correct implementations may order a near tie
either way); from there on the two continuations are different texts and are not compared.
float32 (the dense families): token for token. Mixture-of-experts layers are left out in float32:
transformers runs their experts through `torch.nn.functional.grouped_mm`, whose float32 CUDA path
copies from the host, which a CUDA graph cannot capture (in bf16 it captures).
"""

from __future__ import annotations

import copy

import pytest
import torch

import kvbudget as kb
from families import FAMILIES
from kvbudget.runtime.answer import greedy_decode

pytestmark = pytest.mark.gpu

CONTEXT = 200  # crosses every family's sliding window (16-96 tokens)
NEW = 16
TIE = 0.05  # bf16: a margin between the reference's two best logits this small is a near tie


def _models(family: str, dtype: torch.dtype):
    spec = FAMILIES[family]
    reason = spec.available()
    if reason is not None:
        pytest.skip(reason)
    reference = spec.build().to("cuda", dtype)
    return reference, copy.deepcopy(reference)


MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"}
CASES = [(f, torch.bfloat16) for f in FAMILIES] + [(f, torch.float32) for f in FAMILIES if f not in MOE]


@pytest.mark.parametrize("family,dtype", CASES, ids=[f"{f}-{str(d)[6:]}" for f, d in CASES])
def test_full_graph_decode_equals_generate(family, dtype):
    reference, model = _models(family, dtype)
    ids = torch.randint(3, 49152, (1, CONTEXT), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        expected = out.sequences[0, CONTEXT:].tolist()
        policy = kb.policy("full")
        cache = policy.new_cache(model)
        logits, _ = kb.prefill(model, cache, policy, ids, block_size=64)
        got = greedy_decode(model, cache, policy, logits, NEW, eos=set(), mode="graph")
    assert expected, "the reference answered nothing"
    for step, (want, have) in enumerate(zip(expected, got)):
        if want == have:
            continue
        scores = out.scores[step][0].float()
        margin = float(scores[want] - scores[have])
        assert dtype == torch.bfloat16 and margin <= TIE * float(scores.abs().max()), (
            f"{family} {dtype}: token {step} is {have}, plain transformers gives {want} (logit margin {margin:.4f}); "
            f"graph {got}, reference {expected}")
        break
