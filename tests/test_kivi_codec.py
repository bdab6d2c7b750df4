"""KIVI's Triton encoder / decoder (kvbudget.kernels.kivi_codec) against the torch path.

The kernels run under triton's interpreter on CPU (conftest.py sets TRITON_INTERPRET=1), forced
with ``KVBUDGET_KIVI_CODEC=triton``. They compute what torch computes, operation for operation,
so float32 and float16 must match bit for bit. The interpreter's float32 -> bfloat16 casts
truncate where the GPU rounds to nearest, so in bfloat16 the codes (computed in float32) must
match and the stored scales and decoded values be within one bfloat16 step;
tests/gpu/test_codec_cuda.py checks bfloat16 bit for bit on the GPU."""

import pytest
import torch

import kvbudget as kb
from kvbudget.methods.stores.kivi import KIVI
from kvbudget.kv.body import Body
from kvbudget.runtime.answer import greedy_decode

from conftest import random_ids

pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] on Linux)")


def _with(monkeypatch, mode: str, fn, *args):
    monkeypatch.setenv("KVBUDGET_KIVI_CODEC", mode)
    return fn(*args)


def _same(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype, what
    if dtype == torch.bfloat16 and got.is_floating_point():
        # One bfloat16 step (truncation instead of rounding in the interpreter).
        step = ref.float().abs().clamp_min(1e-30) * 2**-7
        assert ((got.float() - ref.float()).abs() <= step).all(), what
    else:
        assert torch.equal(got, ref), f"{what}: {(got != ref).sum().item()} of {got.numel()} differ"


def _inputs(b, h, m, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, m, d, generator=gen) * 2
    keys[..., 1] += 25  # an outlier channel, as real keys have
    values = torch.randn(b, h, m, d, generator=gen)
    valid = torch.rand(b, h, m, generator=gen) > 0.25
    if m > 32:
        valid[0, 0, :32] = False  # a chunk with no valid token: the harmless range
    return keys.to(dtype), values.to(dtype), valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 2, 70, 64), (2, 3, 33, 128), (1, 1, 5, 16)])
def test_encode_equals_torch(monkeypatch, dtype, bits, shape):
    store = KIVI(bits=bits)
    keys, values, valid = _inputs(*shape, dtype)
    ref = _with(monkeypatch, "torch", store.encode, keys, values, valid, None)
    got = _with(monkeypatch, "triton", store.encode, keys, values, valid, None)
    assert set(got.tokens) == set(ref.tokens) and set(got.chunks) == set(ref.chunks)
    for name in ref.tokens:
        _same(got.tokens[name], ref.tokens[name], dtype, name)
    for name in ref.chunks:
        _same(got.chunks[name], ref.chunks[name], dtype, name)


def test_encode_reads_strided_inputs(monkeypatch):
    """A slice of a longer tail (what a flush encodes) and a transposed layout."""
    store = KIVI(bits=4)
    keys, values, valid = _inputs(2, 2, 100, 64, torch.float32)
    k, v, ok = keys[:, :, 10:74], values.transpose(0, 1).contiguous().transpose(0, 1)[:, :, 10:74], valid[:, :, 10:74]
    ref = _with(monkeypatch, "torch", store.encode, k, v, ok, None)
    got = _with(monkeypatch, "triton", store.encode, k, v, ok, None)
    for name in ref.tokens:
        assert torch.equal(got.tokens[name], ref.tokens[name]), name
    for name in ref.chunks:
        assert torch.equal(got.chunks[name], ref.chunks[name]), name


def _body(store, dtype, b=2, h=3, m=70, d=64, cap=None, seed=1):
    """An encoded body with irregular chunk ids (eviction leaves gaps, repeats, any order), laid
    out in buffers of ``cap`` entries when given (a static decoder's room, views sliced along n)."""
    keys, values, valid = _inputs(b, h, m, d, dtype, seed)
    enc = store.encode(keys, values, valid, None)
    n_chunks = enc.chunks["k_scale"].shape[2]
    gen = torch.Generator().manual_seed(seed)
    chunk_id = torch.randint(0, n_chunks, (b, h, m), generator=gen).to(torch.int16)
    if cap is None:
        return Body(enc.tokens, chunk_id, enc.chunks)

    def room(t, n):
        buf = t.new_zeros(*t.shape[:2], n, *t.shape[3:])
        buf[:, :, : t.shape[2]] = t
        return buf[:, :, : t.shape[2]]

    return Body({k: room(t, cap) for k, t in enc.tokens.items()}, room(chunk_id, cap),
                {k: room(c, n_chunks + 5) for k, c in enc.chunks.items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("cap", [None, 100])
def test_decode_equals_torch(monkeypatch, dtype, bits, cap):
    store = KIVI(bits=bits)
    body = _with(monkeypatch, "torch", _body, store, dtype, 2, 3, 70, 64, cap)
    ref_k, ref_v = _with(monkeypatch, "torch", body.decode, store, dtype)
    got_k, got_v = _with(monkeypatch, "triton", body.decode, store, dtype)
    _same(got_k, ref_k, dtype, "keys")
    _same(got_v, ref_v, dtype, "values")
    _same(_with(monkeypatch, "triton", body.decode_keys, store, dtype), ref_k, dtype, "keys only")


def test_decode_writes_into_a_concatenation(monkeypatch):
    """``out`` views (the front of body + tail buffers) receive the decoded body; an output the
    kernel cannot address (last dim strided) is written through a copy."""
    store = KIVI(bits=2)
    body = _with(monkeypatch, "torch", _body, store, torch.float32)
    ref_k, ref_v = _with(monkeypatch, "torch", body.decode, store, torch.float32)
    all_k, all_v = torch.full((2, 3, 90, 64), 7.0), torch.full((2, 3, 90, 64), 7.0)
    _with(monkeypatch, "triton", body.decode, store, torch.float32, (all_k[:, :, :70], all_v[:, :, :70]))
    assert torch.equal(all_k[:, :, :70], ref_k) and torch.equal(all_v[:, :, :70], ref_v)
    assert (all_k[:, :, 70:] == 7).all() and (all_v[:, :, 70:] == 7).all()
    odd = torch.zeros(2, 3, 64, 70).transpose(2, 3)
    _with(monkeypatch, "triton", body.decode, store, torch.float32, (odd, torch.empty_like(ref_v)))
    assert torch.equal(odd, ref_k)


@pytest.mark.parametrize("name,kw", [("kivi2", {}), ("snapkv+kivi4", {"budget": 64}), ("mikv", {"budget": 64})])
def test_policies_through_the_codec_equal_torch(tiny_llama, monkeypatch, name, kw):
    """Prefill in blocks (flushes, body decoded for each block's attention, eviction's re-encode)
    and decoding with compressions: the same tokens, bodies and bytes with either codec."""
    runs = []
    for mode in ("torch", "triton"):
        monkeypatch.setenv("KVBUDGET_KIVI_CODEC", mode)
        policy = kb.policy(name, decode_interval=8, **kw)
        cache = policy.new_cache(tiny_llama)
        logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(160), block_size=64)
        with torch.inference_mode():
            runs.append((logits, greedy_decode(tiny_llama, cache, policy, logits, 16, eos=set(), mode="eager"), cache))
    (la, ida, ca), (lb, idb, cb) = runs
    assert torch.equal(la, lb) and ida == idb and len(ida) == 16
    for a, b in zip(ca.layers, cb.layers):
        assert a.nbytes() == b.nbytes() and torch.equal(a.view().positions, b.view().positions)
        body_a, body_b = a.entries.body, b.entries.body
        for k in body_a.tokens:
            assert torch.equal(body_a.tokens[k], body_b.tokens[k]), k
        for k in body_a.chunks:
            assert torch.equal(body_a.chunks[k], body_b.chunks[k]), k
        assert torch.equal(body_a.chunk_id, body_b.chunk_id)


def test_codec_mode_is_checked(monkeypatch):
    monkeypatch.setenv("KVBUDGET_KIVI_CODEC", "fast")
    keys, values, valid = _inputs(1, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="KVBUDGET_KIVI_CODEC must be auto, triton or torch, got 'fast'"):
        KIVI(bits=4).encode(keys, values, valid, None)


def test_layouts_the_codec_does_not_cover_take_the_torch_path(monkeypatch):
    from kvbudget.kernels import kivi_codec

    assert kivi_codec.supported(128, 128, 4, 32, 32) is None
    assert "power of two" in kivi_codec.supported(96, 96, 4, 32, 32)
    assert "3-bit" in kivi_codec.supported(128, 128, 3, 32, 32)
    monkeypatch.setenv("KVBUDGET_KIVI_CODEC", "triton")
    assert KIVI(bits=4).codec(torch.zeros(1), 96, 96) is None  # 96 channels: torch encodes
    monkeypatch.setenv("KVBUDGET_KIVI_CODEC", "auto")
    assert KIVI(bits=4).codec(torch.zeros(1), 128, 128) is None  # CPU tensors: torch
