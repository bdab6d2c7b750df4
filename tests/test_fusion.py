"""Fused element-wise decode kernels (kvbudget.kernels.fused) and their installation on a model
(kvbudget.fusion): each kernel equals the transformers code it replaces, and a fused model gives
the eager model's logits and tokens.

CI has no GPU: the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py), forced onto CPU tensors with ``fusion.FORCE_KERNELS``. The interpreter's float32 ->
bfloat16 casts truncate where the GPU rounds, so exactness is checked in float32 and bfloat16 only
within a tolerance; tests/gpu/test_fused_cuda.py checks bfloat16 on the GPU.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] on Linux)")

import transformers.models.llama.modeling_llama as llama
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from kvbudget.runtime import fusion
from kvbudget.kernels import fused

from conftest import _tiny_llama, random_ids
from test_static import _decode, _same_cache


@pytest.fixture
def forced(monkeypatch):
    """Kernels on CPU tensors (interpreter); the global RoPE patch is undone after the test."""
    monkeypatch.setattr(fusion, "FORCE_KERNELS", True)
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", llama.apply_rotary_pos_emb)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_rms_norm_equals_llama(dtype, tol):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data.normal_()
    x = torch.randn(2, 5, 96, dtype=dtype) * 3
    out = fused.rms_norm(x, norm.weight, norm.variance_epsilon)
    ref = norm(x)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    # A float32 weight over bfloat16 activations promotes, as `weight * x.to(dtype)` does.
    mixed = fused.rms_norm(x.bfloat16(), norm.weight.float(), 1e-5)
    assert mixed.dtype == torch.float32


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 0.0), (torch.bfloat16, 2e-2)])
def test_rope_equals_transformers(dtype, tol):
    """q/k laid out as LlamaAttention makes them ([B, M, H, D] transposed), cos/sin from the
    model's rotary embedding."""
    torch.manual_seed(0)
    cfg = _tiny_llama().config
    b, m, hq, hk, d = 2, 3, 4, 2, 16
    q = torch.randn(b, m, hq, d, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, m, hk, d, dtype=dtype).transpose(1, 2)
    pos = torch.tensor([[5, 6, 7], [100, 101, 102]])
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    assert fused.rope_supported(q, k, cos, sin, 1)
    qo, ko = fused.apply_rope(q, k, cos, sin)
    qr, kr = llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(qo, qr, rtol=tol, atol=tol)
    torch.testing.assert_close(ko, kr, rtol=tol, atol=tol)
    # Shapes the kernel does not cover are refused, so the caller keeps transformers' function.
    assert not fused.rope_supported(q, k, cos, sin, 2)
    assert not fused.rope_supported(q, k.float() if dtype != torch.float32 else k.double(), cos, sin, 1)


def test_silu_mul_on_the_halves_of_one_projection():
    torch.manual_seed(0)
    both = torch.randn(3, 4, 2 * 40)
    gate, up = both[..., :40], both[..., 40:]
    torch.testing.assert_close(fused.silu_mul(gate, up), torch.nn.functional.silu(gate) * up, rtol=1e-6, atol=1e-6)


def test_static_append_equals_index_copy():
    torch.manual_seed(0)
    keys, values = torch.zeros(40, 16), torch.zeros(40, 8)
    starts = torch.tensor([0, 10, 20, 30])
    lens = torch.tensor([0, 3, 9, 5], dtype=torch.int32)
    k, v = torch.randn(4, 16), torch.randn(4, 8)
    ref_k, ref_v = keys.clone(), values.clone()
    slot = starts + lens.long()
    ref_k.index_copy_(0, slot, k)
    ref_v.index_copy_(0, slot, v)
    fused.static_append(k, v, keys, values, starts, lens)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    assert lens.tolist() == [1, 4, 10, 6]


def test_fused_model_equals_the_model(forced):
    """fuse() on a fresh tiny Llama: same logits through the kernels, parameters untouched, and
    calling it again changes nothing."""
    model = _tiny_llama()
    ids = random_ids(12)
    with torch.no_grad():
        ref = model(ids).logits
    params = {name: p.data_ptr() for name, p in model.named_parameters()}
    counts = fusion.fuse(model)
    assert counts == {"rms_norm": 2 * 3 + 1, "mlp": 3, "rope": 1}
    assert fusion.fuse(model) == counts
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == params
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    fusion.FORCE_KERNELS = False  # CPU without forcing: the modules' own forwards, bit for bit
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    fusion.FORCE_KERNELS = True
    fusion.unfuse(model)  # the modules' own forwards even where the kernels would run
    assert not hasattr(llama.apply_rotary_pos_emb, "kvbudget_original")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert fusion.fuse(model) == counts  # and it can be fused again


def test_static_decode_with_fused_kernels_equals_eager(forced, tiny_llama):
    """Static decoding of a fused model (append kernel included) against eager decoding of the
    unfused one: same tokens, same cache, with decode-time compression."""
    eager_ids, eager_cache, _ = _decode(tiny_llama, "h2o", "eager", n_new=12, budget=40)
    model = _tiny_llama()  # same seed, same weights as tiny_llama
    fusion.fuse(model)
    static_ids, static_cache, _ = _decode(model, "h2o", "static", n_new=12, budget=40)
    assert static_ids == eager_ids
    _same_cache(eager_cache, static_cache)


def test_off_leaves_the_model_alone(monkeypatch):
    model = _tiny_llama()
    monkeypatch.setenv("KVBUDGET_FUSED_OPS", "off")
    assert fusion.maybe_fuse(model, torch.device("cuda")) is None
    assert fusion.maybe_fuse(model, torch.device("cpu")) is None
    assert "forward" not in vars(model.model.layers[0].mlp)
    monkeypatch.setenv("KVBUDGET_FUSED_OPS", "always")
    with pytest.raises(ValueError, match="KVBUDGET_FUSED_OPS"):
        fusion.mode()


def test_other_architectures_are_left_alone(tiny_gemma, monkeypatch):
    """Gemma's norm is ``x * (1 + weight)`` and its MLP is GELU: nothing matches, nothing changes."""
    import transformers.models.gemma3.modeling_gemma3 as gemma3

    monkeypatch.setattr(gemma3, "apply_rotary_pos_emb", gemma3.apply_rotary_pos_emb)
    counts = fusion.fuse(tiny_gemma)
    del tiny_gemma.kvbudget_fused_ops  # a shared fixture: leave no mark
    assert counts["rms_norm"] == 0 and counts["mlp"] == 0


COMPILE = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbudget.kernels import fused as F

fn = F._rope_kernel
consts = dict(HQ=32, HK=8, HALF=64, BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64)
names = [a for a in fn.arg_names if a not in consts]
sig = {a: ("*bf16" if a.endswith("_ptr") else "i32") for a in names} | {k: "constexpr" for k in consts}
where = {(fn.arg_names.index(k),): v for k, v in consts.items()}
for fusion in (True, False):
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=where), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4, "enable_fp_fusion": fusion})
    print(fusion, sorted(set(re.findall(r"\b(fma\.rn\.bf16|mul\.rn\.bf16|add\.rn\.bf16)", c.asm["ptx"]))))
"""


def test_rope_kernel_keeps_eager_rounding_when_compiled_for_hopper():
    """Compiled for sm_90 with the launch option the wrapper passes, RoPE multiplies and adds in
    separately rounded bf16 steps as eager does; with the compiler's default (FP fusion) the
    multiply and add would contract into one fma that rounds once, which the H100 showed as
    1-ulp differences."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert "fma.rn.bf16" in lines["True"]  # what the default would do
    assert "fma.rn.bf16" not in lines["False"] and "mul.rn.bf16" in lines["False"]
