"""LazyEviction's scan inside the Triton scoring kernel, on CUDA.

One block-wise prefill step of one 8B layer (bf16, GQA 32/8, d 128, 2048 queries over 4096
keys): the kernel's received attention, last-important position and longest interval against
the chunked torch scan in float32, with and without the flash call's LSE; and the same bits
whatever the tile sizes and whichever axis holds the queries.
"""

import pytest
import torch

from kvbudget.compress import scoring
from kvbudget.kernels.flash import flash_attention_with_lse
from kvbudget.kernels.attn_scores import attention_lazy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def step() -> dict:
    """A block-wise prefill step: 2048 queries (the block) over 4096 keys (2048 survivors of the
    earlier context, sorted, then the block itself, causal); bf16. The carried state: survivors
    were last important between their write and the block, with an interval; the block's
    entries are new."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, hq, h, m, n, d = 1, 32, 8, 2048, 4096, 128
    n_old = n - m
    first = 8 * n_old
    q = torch.randn(b, hq, m, d, device="cuda", generator=gen).bfloat16()
    k = torch.randn(b, h, n, d, device="cuda", generator=gen).bfloat16()
    v = torch.randn(b, h, n, d, device="cuda", generator=gen).bfloat16()
    old = torch.randperm(first, device="cuda", generator=gen)[:n_old].sort().values
    pos = torch.cat([old, torch.arange(first, first + m, device="cuda")]).to(torch.int32)
    pos = pos.expand(b, h, n).contiguous()
    since = torch.rand(b, h, n, device="cuda", generator=gen) * (first - pos)
    is_old = torch.arange(n, device="cuda") < n_old
    last = torch.where(is_old, (pos + since).floor(), pos.float())
    gap = torch.where(is_old, torch.randint(0, 2000, (b, h, n), device="cuda", generator=gen).float(), 0.0)
    x = {"q": q, "k": k, "v": v, "pos": pos, "qpos": torch.arange(first, first + m, device="cuda"),
         "last": last, "gap": gap, "scale": d**-0.5, "n_old": n_old}
    x["lse"] = flash_attention_with_lse(q, k, v, n_old, x["scale"])[1]
    return x


def scan(x: dict, path: str, q=None, k=None, lse=None):
    q = x["q"] if q is None else q
    k = x["k"] if k is None else k
    return scoring.attention_lazy(q, k, x["pos"], None, x["qpos"], x["scale"], x["last"], x["gap"], path=path, lse=lse)


@pytest.mark.parametrize("with_lse", [False, True], ids=["two-passes", "flash-lse-given"])
def test_triton_scan_equals_the_torch_scan(step, with_lse):
    """Against the chunked torch scan over the same bf16 inputs with float32 products (what the
    kernel computes: bf16 products, fp32 sums): received allclose, (last, gap) identical for at
    least 99% of the entries (importance is a threshold: rounding near it may flip one query's
    verdict)."""
    ref = scan(step, "chunked", step["q"].float(), step["k"].float())
    received, last, gap = scan(step, "triton", lse=step["lse"] if with_lse else None)
    top = float(ref[0].abs().max())
    same = float(((last == ref[1]) & (gap == ref[2])).float().mean())
    assert torch.allclose(received, ref[0], rtol=1e-2, atol=1e-4 * top), \
        f"received max |err| {float((received - ref[0]).abs().max()):.2e} of max {top:.3g}"
    assert same >= 0.99, f"(last, gap) identical for {same:.4%} of entries"


TILES = [{"block_m": 64, "block_n": 64, "query_axis": 0}, {"block_m": 32, "block_n": 64, "query_axis": 0},
         {"block_m": 32, "block_n": 128, "query_axis": 1, "num_stages": 3}, {"block_m": 16, "block_n": 128, "query_axis": 1}]


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t['block_m']}x{t['block_n']}-axis{t['query_axis']}")
def test_scan_bits_do_not_depend_on_the_tiles(step, tiles):
    """A query's verdict on a key does not depend on the tiles: (last, gap) are the same bits
    whatever the tile sizes and whichever axis holds the queries."""
    want = scan(step, "triton", lse=step["lse"])
    kpos = scoring.key_positions(step["pos"], None)
    got = attention_lazy(step["q"], step["k"], kpos, step["qpos"], step["scale"], step["last"], step["gap"],
                         lse=step["lse"], **tiles)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-6 * float(want[0].abs().max()))
