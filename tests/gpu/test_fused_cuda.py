"""The fused kernels on CUDA against what they replace.

The element-wise kernels (RMSNorm, RoPE, SiLU*mul, the static append) on bf16 tensors of the 8B
shape: RoPE and SiLU*mul bit for bit, RMSNorm within one bf16 ulp (its mean sums in another
order), the append exactly; a fused model's logits close to the plain model's. The fused KIVI
dequantise-and-attend kernel: the same greedy tokens as decoding the body first.
"""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as llama

from kvbudget.kv import layer as klayer
from kvbudget.runtime import fusion
from kvbudget.kernels import fused

from .gpu_kit import compare_caches, decode, random_ids

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


@pytest.mark.parametrize("rows", [1, 2048])
@torch.no_grad()
def test_rms_norm_within_one_ulp(rows):
    torch.manual_seed(0)
    norm = llama.LlamaRMSNorm(4096, eps=1e-5).to("cuda", BF16)
    norm.weight.data.normal_()
    x = torch.randn(rows, 4096, device="cuda", dtype=BF16) * 4
    out, ref = fused.rms_norm(x, norm.weight, 1e-5), norm(x)
    ulp = float(((out.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)).max() * 2**8)
    assert ulp <= 2.01, f"max diff {ulp:.2f} x 2^-8 relative (one bf16 ulp is 1-2)"


@pytest.mark.parametrize("b,m", [(1, 1), (8, 1), (1, 2048)])
@torch.no_grad()
def test_rope_bit_equal_to_transformers(b, m):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      rope_theta=500000.0, max_position_embeddings=131072)
    rotary = llama.LlamaRotaryEmbedding(cfg).to("cuda")
    q = torch.randn(b, m, 32, 128, device="cuda", dtype=BF16).transpose(1, 2)
    k = torch.randn(b, m, 8, 128, device="cuda", dtype=BF16).transpose(1, 2)
    pos = torch.randint(0, 100000, (b, 1), device="cuda") + torch.arange(m, device="cuda")
    cos, sin = rotary(q, pos)
    qo, ko = fused.apply_rope(q, k, cos, sin)
    original = getattr(llama.apply_rotary_pos_emb, "kvbudget_original", llama.apply_rotary_pos_emb)
    qr, kr = original(q, k, cos, sin)
    differ = int((qo != qr).sum() + (ko != kr).sum())
    assert differ == 0, f"{differ} elements differ from transformers"


@torch.no_grad()
def test_silu_mul_bit_equal():
    gu = torch.randn(3, 2 * 14336, device="cuda", dtype=BF16)
    g, u = gu[:, :14336], gu[:, 14336:]
    assert torch.equal(fused.silu_mul(g, u), torch.nn.functional.silu(g) * u)


@torch.no_grad()
def test_static_append_equals_index_copy():
    keys, values = torch.zeros(4000, 128, device="cuda", dtype=BF16), torch.zeros(4000, 128, device="cuda", dtype=BF16)
    starts = torch.arange(32, device="cuda") * 125
    lens = torch.randint(0, 124, (32,), device="cuda", dtype=torch.int32)
    kn, vn = torch.randn(32, 128, device="cuda", dtype=BF16), torch.randn(32, 128, device="cuda", dtype=BF16)
    rk, rv = keys.clone(), values.clone()
    rk.index_copy_(0, starts + lens.long(), kn)
    rv.index_copy_(0, starts + lens.long(), vn)
    before = lens.clone()
    fused.static_append(kn, vn, keys, values, starts, lens)
    assert torch.equal(keys, rk) and torch.equal(values, rv)
    assert torch.equal(lens, before + 1), "lengths not advanced"


@pytest.mark.parametrize("kinds", [("rms_norm",), ("mlp",), ("rope",), fusion.KINDS], ids="+".join)
def test_fused_model_logits_close_to_plain(model_bf16, kinds):
    """A 300-token forward of the bf16 4-layer model through the fused modules (each kind alone,
    then all) stays within 1e-2 (relative) of the plain model's logits."""
    ids = random_ids(300, seed=0)
    with torch.inference_mode():
        ref = model_bf16(ids).logits.float()
        counts = fusion.fuse(model_bf16, kinds)
        out = model_bf16(ids).logits.float()
    fusion.unfuse(model_bf16)
    assert all(counts.get(k, 0) > 0 for k in kinds), f"nothing fused for some of {kinds}: {counts}"
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-2, f"fused {counts}: logits rel diff {rel:.2e}"


@pytest.mark.parametrize("bits", [4, 2])
def test_fused_kivi_decode_gives_the_tokens_of_decoding_the_body(model_f32, monkeypatch, bits):
    """float32: in bf16 the random-weight model's near-flat logits make token equality
    meaningless; benchmarks/kernel_bench.py checks the kernel's bf16 / fp16 outputs against
    float64 instead."""
    monkeypatch.setattr(klayer, "FUSED_KIVI", "0")
    plain, cp = decode(model_f32, f"kivi{bits}", "eager")
    monkeypatch.setattr(klayer, "FUSED_KIVI", "auto")  # the default: the kernel on CUDA
    fusedk, cf = decode(model_f32, f"kivi{bits}", "eager")
    assert plain == fusedk, f"kivi-{bits}: fused kernel tokens differ (max |cache diff| {compare_caches(cp, cf):.2e})"
