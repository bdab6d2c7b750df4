"""The Triton KIVI codec (encode a block, decode a body) equals the torch path bit for bit on
CUDA: codes, scales, decoded keys and values, for bf16 / fp16 / fp32 and 2 / 4 / 8 bits, with
padding, a chunk with no valid token, an outlier channel, irregular chunk ids and a body held in
views of larger buffers (a static decoder's)."""

import pytest
import torch

from kvbudget.methods.stores.kivi import KIVI
from kvbudget.kv.body import Body

from .gpu_kit import env

pytestmark = pytest.mark.gpu


def run(mode: str, fn, *args):
    with env("KVBUDGET_KIVI_CODEC", mode):
        return fn(*args)


def room(t: torch.Tensor, cap: int) -> torch.Tensor:
    """``t`` [B, H, n, ...] as the first n rows of a zeroed buffer of ``cap`` rows."""
    buf = t.new_zeros(*t.shape[:2], cap, *t.shape[3:])
    buf[:, :, : t.shape[2]] = t
    return buf[:, :, : t.shape[2]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_codec_equals_torch_bit_for_bit(dtype, bits):
    gen = torch.Generator(device="cuda").manual_seed(0)
    store = KIVI(bits=bits)
    b, h, m, d = 2, 8, 1000, 128
    keys = torch.randn(b, h, m, d, device="cuda", generator=gen) * 2
    keys[..., 5] += 30  # an outlier channel
    keys, values = keys.to(dtype), torch.randn(b, h, m, d, device="cuda", generator=gen).to(dtype)
    valid = torch.rand(b, h, m, device="cuda", generator=gen) > 0.2
    valid[1, 3, 64:96] = False  # a chunk with no valid token
    ref = run("torch", store.encode, keys, values, valid, None)
    got = run("triton", store.encode, keys, values, valid, None)
    for k in ref.tokens:
        assert torch.equal(ref.tokens[k], got.tokens[k]), f"encoded '{k}' differs"
    for k in ref.chunks:
        assert torch.equal(ref.chunks[k], got.chunks[k]), f"chunk '{k}' differs"
    n_chunks = ref.chunks["k_scale"].shape[2]
    ids = torch.randint(0, n_chunks, (b, h, m), device="cuda", generator=gen).to(torch.int16)
    body = Body({k: room(t, m + 77) for k, t in ref.tokens.items()}, room(ids, m + 77),
                {k: room(c, n_chunks + 9) for k, c in ref.chunks.items()})
    rk, rv = run("torch", body.decode, store, dtype)
    gk, gv = run("triton", body.decode, store, dtype)
    gk2 = run("triton", body.decode_keys, store, dtype)
    assert torch.equal(rk, gk) and torch.equal(rv, gv), "decoded keys or values differ"
    assert torch.equal(rk, gk2), "decode_keys differs from decode's keys"
