"""Attention reductions without the full matrix (`kvbudget.scoring`, the Triton kernels under
the interpreter on CPU) equal a float64 materialised reference: padding, causal positions,
queries that see nothing, g = 1 and 4; the ported scorers equal their materialised forms.

On a machine with CUDA the Triton tests run the compiled kernels on the GPU instead."""

import copy
import os

import torch

# Before anything imports triton (conftest.py does the same, as it imports transformers first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from torch import Tensor

from kvbudget.compress import scoring
from kvbudget.compress import SCORERS
from kvbudget.compress import Observation

triton = pytest.importorskip("triton")
from triton import language as tl

from kvbudget.kernels import attn_scores  # noqa: F401 - the kernels import
from kvbudget.kernels.attn_scores import TILES, _high_bit, _lazy_bits, _lazy_step, _longest_run

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def _fix_interpreter() -> None:
    """Two gaps of triton 3.6's interpreter, patched here only (the compiled GPU path has
    neither): with numpy >= 2.4 a runtime int used as a loop bound is a 1-element array that
    int() refuses, and tl.dot multiplies bf16 operands as their raw uint16 bits."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if getattr(interp, "_kvbudget_patched", False):
        return
    patch_tensor = interp._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    dot = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        def f32(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = interp._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interp.TensorHandle(data, tl.float32)

        return dot(self, f32(a), f32(b), d, *args)

    interp._patch_lang_tensor = patched_tensor
    interp.InterpreterBuilder.create_dot = create_dot
    interp._kvbudget_patched = True


if INTERPRET:
    _fix_interpreter()


def group_probs64(q, k, pos, valid, qpos, scaling):
    """`Observation.group_attention` in float64: [B, H, g, m, n]."""
    b, hq, m, d = q.shape
    h = k.shape[1]
    logits = torch.einsum("bhgmd,bhnd->bhgmn", q.double().view(b, h, hq // h, m, d), k.double()) * scaling
    future = pos[:, :, None, None, :] > qpos.to(pos)[None, None, None, :, None]
    if valid is not None:
        future = future | ~valid[:, :, None, None, :]
    return logits.masked_fill(future, float("-inf")).softmax(-1).nan_to_num(0.0)


def reference(q, k, pos, valid, qpos, scaling, mode, weights=None):
    """The materialised formula in float64 (what `Observation.group_attention` computes)."""
    p = group_probs64(q, k, pos, valid, qpos, scaling)
    if mode == "max":
        return p.amax(dim=(2, 3))
    p = p.mean(2)
    return (p if weights is None else p * weights.double()[:, None]).sum(2)


def case(g: int, d: int = 32, m: int = 37, n: int = 70, b: int = 1, h: int = 2, padded: bool = True, seed: int = 0):
    """Random queries/keys; key positions with gaps (evicted tokens); ragged padding (-1); the
    queries: positions inside the key range (causal masking matters), the first ones placed
    before every valid key (they see nothing)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h * g, m, d, generator=gen) * 1.5
    k = torch.randn(b, h, n, d, generator=gen) * 1.5
    base = torch.sort(torch.randperm(3 * n, generator=gen)[:n]).values + 10
    pos = base.expand(b, h, n).clone().to(torch.int32)
    valid = None
    if padded:
        lens = torch.randint(n // 2, n + 1, (b, h), generator=gen)
        lens[0, 0] = n
        valid = torch.arange(n)[None, None] < lens[..., None]
        pos = pos.masked_fill(~valid, -1)
    qpos = torch.cat([torch.tensor([0, 3]), torch.sort(torch.randint(10, int(base[-1]) + 5, (m - 2,), generator=gen)).values])
    return q, k, pos, valid, qpos


def triton_reduce(q, k, pos, valid, qpos, scaling, mode, weights=None):
    """The Triton path on DEVICE (the GPU when there is one), result back on the CPU."""
    on = (lambda t: None if t is None else t.to(DEVICE))
    out = scoring.attention_reduce(on(q), on(k), on(pos), on(valid), on(qpos), scaling, mode, on(weights), path="triton")
    return out.cpu()


def rel_err(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("mode", ["sum", "max", "weighted"])
@pytest.mark.parametrize("path", ["materialise", "chunked"])
def test_torch_paths_equal_reference(g, mode, path):
    q, k, pos, valid, qpos = case(g)
    w = torch.rand(q.shape[2]) if mode == "weighted" else None
    mode_ = "max" if mode == "max" else "sum"
    ref = reference(q, k, pos, valid, qpos, 0.125, mode_, w)
    # chunk=5: several chunks, the last one short.
    out = scoring.attention_reduce(q, k, pos, valid, qpos, 0.125, mode_, w, path=path, chunk=5)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4


def test_chunk_size_follows_the_memory_cap():
    assert scoring.chunk_size(1, 32, 4096, 256 * 2**20) == 512  # 32 heads x 4096 x 4 B = 512 KiB per query
    assert scoring.chunk_size(1, 32, 10**9, 1) == 1


@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "max", "weighted"])
def test_triton_equals_reference(g, dtype, mode):
    q, k, pos, valid, qpos = case(g)
    q, k = q.to(dtype), k.to(dtype)
    w = torch.rand(q.shape[2]) if mode == "weighted" else None
    mode_ = "max" if mode == "max" else "sum"
    ref = reference(q, k, pos, valid, qpos, 0.125, mode_, w)  # from the rounded inputs
    out = triton_reduce(q, k, pos, valid, qpos, 0.125, mode_, w)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_triton_odd_head_dim_no_padding_batch_and_strided_keys():
    """head_dim 24 (padded to a 32 block), no validity mask, batch 2, keys a strided view."""
    q, _, pos, _, qpos = case(2, d=24, m=20, n=45, b=2, padded=False, seed=1)
    big = torch.randn(2, 2, 60, 24)
    k = big[:, :, 5:50]  # non-contiguous along the entries
    for mode in ("sum", "max"):
        ref = reference(q, k, pos, None, qpos, 0.2, mode)
        out = triton_reduce(q, k, pos, None, qpos, 0.2, mode)
        assert rel_err(out, ref) < 1e-4


def row_lse(q, k, pos, valid, qpos, scaling):
    """Each query row's log-sum-exp (natural log) over its visible keys, [B, Hq, m] float32:
    what the model's attention call hands to the scoring. -inf for a row that sees nothing."""
    hq, h = q.shape[1], k.shape[1]
    kk = k.double().repeat_interleave(hq // h, dim=1)
    logits = torch.einsum("bhmd,bhnd->bhmn", q.double(), kk) * scaling
    visible = pos[:, :, None, :] <= qpos.to(pos)[None, None, :, None]
    if valid is not None:
        visible = visible & valid[:, :, None, :]
    visible = visible.repeat_interleave(hq // h, dim=1)
    return logits.masked_fill(~visible, float("-inf")).logsumexp(-1).float()


@pytest.mark.parametrize(("g", "axis"), [(1, 0), (4, 0), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["sum", "max", "weighted"])
def test_triton_with_given_lse_equals_two_passes(g, dtype, mode, axis):
    """Pass 1 skipped: the reduction from a supplied LSE equals the two-pass kernel and the
    reference, with GQA, ragged padding, causal positions and rows that see nothing (-inf);
    pass 2's tiles hold the queries along either axis (axis 1 with GQA only: CI time)."""
    from kvbudget.kernels.attn_scores import attention_reduce as kernel_reduce

    q, k, pos, valid, qpos = case(g)
    q, k = q.to(dtype), k.to(dtype)
    lse = row_lse(q, k, pos, valid, qpos, 0.125)
    assert bool(torch.isinf(lse[:, :, 0]).all())  # case(): the first query sees no key
    w = torch.rand(q.shape[2]) if mode == "weighted" else None
    mode_ = "max" if mode == "max" else "sum"
    kpos = scoring.key_positions(pos, valid)
    on = (lambda t: None if t is None else t.to(DEVICE))
    one = kernel_reduce(on(q), on(k), on(kpos), on(qpos), 0.125, mode_, on(w), lse=on(lse), query_axis=axis).cpu()
    two = kernel_reduce(on(q), on(k), on(kpos), on(qpos), 0.125, mode_, on(w), query_axis=axis).cpu()
    ref = reference(q, k, pos, valid, qpos, 0.125, mode_, w)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(one).all()
    assert rel_err(one, two.double()) < tol and rel_err(one, ref) < tol
    # Through kvbudget.scoring (what Observation uses, the default tiles): the same.
    via = scoring.attention_reduce(on(q), on(k), on(pos), on(valid), on(qpos), 0.125, mode_, on(w),
                                   path="triton", lse=on(lse)).cpu()
    assert torch.equal(via, one) if axis == TILES["weighted" if w is not None else mode_].query_axis else rel_err(via, one) < tol


def test_given_lse_of_minus_inf_contributes_nothing():
    """A row handed lse = -inf adds nothing even where it sees keys (never inf or NaN)."""
    from kvbudget.kernels.attn_scores import attention_reduce as kernel_reduce

    q, k, pos, valid, qpos = case(2, m=12)
    lse = row_lse(q, k, pos, valid, qpos, 0.125)
    lse[:, :, 5] = float("-inf")  # row 5 sees keys, but is declared empty
    kpos = scoring.key_positions(pos, valid)
    on = (lambda t: t.to(DEVICE))
    got = kernel_reduce(on(q), on(k), on(kpos), on(qpos), 0.125, "sum", lse=on(lse)).cpu()
    w = torch.ones(12)
    w[5] = 0
    want = reference(q, k, pos, valid, qpos, 0.125, "sum", w)
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-4
    with pytest.raises(ValueError):
        kernel_reduce(on(q), on(k), on(kpos), on(qpos), 0.125, "sum", lse=on(lse[:, :, :3]))


def test_query_that_sees_nothing_contributes_zero():
    q, k, pos, valid, qpos = case(4, m=4)
    qpos = torch.tensor([0, 1, 2, 3])  # before every key (positions start at 10)
    for path in ("materialise", "chunked", "triton"):
        for mode in ("sum", "max"):
            if path == "triton":
                out = triton_reduce(q, k, pos, valid, qpos, 0.125, mode)
            else:
                out = scoring.attention_reduce(q, k, pos, valid, qpos, 0.125, mode, path=path)
            assert torch.isfinite(out).all() and (out == 0).all()


def test_backend_choice(monkeypatch):
    k = torch.zeros(1, 1, 4, 8)
    monkeypatch.delenv("KVBUDGET_SCORING", raising=False)
    assert scoring.backend(k) == "chunked"  # CPU
    monkeypatch.setenv("KVBUDGET_SCORING", "materialise")
    assert scoring.backend(k) == "materialise"
    monkeypatch.setenv("KVBUDGET_SCORING", "bogus")
    with pytest.raises(ValueError):
        scoring.backend(k)


def test_backend_on_cuda_by_query_rows(monkeypatch):
    """On CUDA (keys faked here): few query rows (one layer's SnapKV window) take the chunked
    path unless their LSE is known; a group of stacked layers' windows takes the kernels."""
    from types import SimpleNamespace

    monkeypatch.delenv("KVBUDGET_SCORING", raising=False)
    monkeypatch.setattr(scoring, "triton_available", lambda: True)
    k = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    window = 32 * 32  # query heads x window, one layer
    assert scoring.backend(k, window) == "chunked"
    assert scoring.backend(k, window, lse=True) == "triton"
    assert scoring.backend(k, 8 * window) == "triton"  # 8 stacked layers
    assert scoring.backend(k) == "triton"
    assert scoring.query_rows([torch.zeros(2, 4, 3, 8)] * 3) == 72 == scoring.query_rows(torch.zeros(6, 4, 3, 8))


def _observation(g: int = 4, seed: int = 0, state=None, device: str = "cpu") -> Observation:
    q, k, pos, valid, qpos = (None if t is None else t.to(device) for t in case(g, seed=seed))
    state = {name: s.to(device) for name, s in (state or {}).items()}
    return Observation(
        layer_idx=0, n_layers=1, keys=k, values=k.clone(), positions=pos, valid=valid, queries=q,
        query_positions=qpos, scaling=0.125, budget=16, seen=int(qpos[-1]) + 1, seed=0, state=state,
    )


@pytest.mark.parametrize("path", ["chunked", "triton"])
def test_observation_reductions_equal_materialised(monkeypatch, path):
    monkeypatch.setenv("KVBUDGET_SCORING", path)
    device = DEVICE if path == "triton" else "cpu"
    obs = _observation(device=device)
    full = obs.group_attention()
    assert torch.allclose(obs.attention_max(), full.amax(dim=(2, 3)), atol=1e-5)
    w = torch.linspace(0.1, 1, obs.queries.shape[2])
    w = w.to(device)
    fresh = _observation(device=device)  # `attention` not yet materialised: the reduction runs
    assert torch.allclose(fresh.attention_sum(w), (full.mean(2) * w[:, None]).sum(2), atol=1e-5)
    assert torch.allclose(obs.attention_sum(), full.mean(2).sum(2), atol=1e-5)


def _old_lazy(obs: Observation) -> Tensor:
    """The pre-port LazyEviction score, verbatim: the whole [m, n] attention at once."""
    attn = obs.attention
    qpos = obs.query_positions.to(obs.keys.device).float()[None, None, :, None]
    pos = obs.positions.float()
    visible = pos[:, :, None, :] <= qpos
    if obs.valid is not None:
        visible = visible & obs.valid[:, :, None, :]
    important = attn > 1.0 / visible.sum(-1, keepdim=True).clamp(min=1)
    last = torch.maximum(obs.state.get("lazy_last", obs.zeros()), pos)
    events = torch.where(important, qpos, torch.tensor(float("-inf"), device=attn.device))
    previous = torch.cat([last[:, :, None], events], dim=2).cummax(dim=2).values
    gaps = torch.where(important, qpos - previous[:, :, :-1], 0.0)
    gap = torch.maximum(obs.state.get("lazy_gap", obs.zeros()), gaps.amax(dim=2))
    last = previous[:, :, -1]
    obs.state["lazy_last"], obs.state["lazy_gap"] = last, gap
    overdue = (obs.seen - 1 - last) - gap
    on_schedule = 1e4 + attn.sum(dim=2)
    return torch.where(overdue <= 0, on_schedule, -overdue)


def test_lazy_in_chunks_equals_the_materialised_scan(monkeypatch):
    monkeypatch.setattr(scoring, "CHUNK_BYTES", 2 * 4 * 70 * 4 * 6)  # 6 queries per chunk
    state = {"lazy_last": torch.full((1, 2, 70), 30.0), "lazy_gap": torch.full((1, 2, 70), 5.0)}
    old, new = _observation(state=state), _observation(state=state)
    want = _old_lazy(old)
    got = SCORERS["lazy"]().score(new)
    assert torch.allclose(got, want, atol=1e-4)
    for name in ("lazy_last", "lazy_gap"):
        assert torch.equal(new.state[name], old.state[name])


@pytest.mark.parametrize("name", ["h2o", "a2sf", "kvzip", "snapkv"])
@pytest.mark.parametrize("path", ["chunked", "triton"])
def test_ported_scorers_equal_their_materialised_form(monkeypatch, name, path):
    device = DEVICE if path == "triton" else "cpu"
    monkeypatch.setenv("KVBUDGET_SCORING", "materialise")
    want = SCORERS[name]().score(_observation(device=device))
    monkeypatch.setenv("KVBUDGET_SCORING", path)
    got = SCORERS[name]().score(_observation(device=device))
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], atol=1e-5)


COMPILE = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbudget.kernels import attn_scores as K

def build(fn, consts, types, warps):
    names = [a for a in fn.arg_names if a not in consts]
    signature = dict(zip(names, types)) | {k: "constexpr" for k in consts}
    where = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=where),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

for dt, bm in (("bf16", 64), ("fp32", 32)):
    ieee = dt == "fp32"
    c = build(K._lse_kernel, {"HQ": 32, "G": 4, "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_D": 128, "IEEE": ieee},
              [f"*{dt}", "*i64", f"*{dt}", "*i32", "*i32", "*fp32", "*i32", "i32", "i32", "i32", "fp32", "i32"]
              + ["i64"] * 11, 4)
    assert "cubin" in c.asm
    for mode, weighted, qaxis in ((0, False, 0), (0, True, 0), (1, False, 0), (2, False, 0), (2, False, 1)):
        c = build(K._reduce_kernel, {"H": 8, "G": 4, "MODE": mode, "WEIGHTED": weighted, "BLOCK_M": bm,
                                     "BLOCK_N": 64, "BLOCK_D": 128, "IEEE": ieee, "QAXIS": qaxis},
                  [f"*{dt}", "*i64", f"*{dt}", "*i32", "*i32", "*fp32", "*fp32", "*fp32", "*i32", "i32", "i32", "i32",
                   "fp32", "fp32", "i32"] + ["i64"] * 11, 4)
        assert "cubin" in c.asm
        if dt == "bf16":
            assert "wgmma" in c.asm["ptx"]  # Hopper tensor cores
print("compiled")
'''


def test_kernels_compile_for_hopper_without_a_gpu():
    """The real compiler (not the interpreter) takes both kernels down to sm_90 cubin: what the
    interpreter cannot check (constexpr globals, dot shapes, types) fails here, not on the GPU."""
    import subprocess
    import sys
    from pathlib import Path

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("shuffled", [False, True])
def test_triton_skips_hidden_tiles_exactly(shuffled):
    """Small tiles over a prefill-like block (old keys seen by all, new keys causal): the skipped
    tiles (before ``qstart``, after ``kend``) change nothing; with keys out of position order
    nothing is skipped and the result is still exact."""
    from kvbudget.kernels.attn_scores import _tile_bounds
    from kvbudget.kernels.attn_scores import attention_reduce as kernel_reduce

    gen = torch.Generator().manual_seed(3)
    m, n_old, g, h, d = 80, 48, 2, 2, 32
    n = n_old + m
    q = torch.randn(1, h * g, m, d, generator=gen)
    k = torch.randn(1, h, n, d, generator=gen)
    pos = torch.cat([torch.sort(torch.randperm(500, generator=gen)[:n_old]).values, torch.arange(600, 600 + m)])
    pos = pos.expand(1, h, n).clone().to(torch.int32)
    qpos = torch.arange(600, 600 + m)
    if shuffled:
        perm = torch.randperm(n, generator=gen)
        k, pos = k[:, :, perm], pos[:, :, perm]
    kpos = scoring.key_positions(pos, None)
    kend, qstart = _tile_bounds(kpos.to(DEVICE), qpos.to(DEVICE, torch.int32), 16, 16)
    if shuffled:
        assert bool((kend == n).all()) and bool((qstart == 0).all())
    else:
        assert int(kend.min()) < n and int(qstart.max()) > 0  # something is skipped
    for mode in ("sum", "max"):
        ref = reference(q, k, pos, None, qpos, 0.125, mode)
        out = kernel_reduce(q.to(DEVICE), k.to(DEVICE), kpos.to(DEVICE), qpos.to(DEVICE), 0.125, mode,
                            block_m=16, block_n=16).cpu()
        assert rel_err(out, ref) < 1e-4


# LazyEviction's scan (`scoring.lazy_scan`, the Triton reduction's "lazy" mode).


@triton.jit
def _scan_tiles(attn_ptr, thr_ptr, qpos_ptr, last_ptr, gap_ptr, m, N: tl.constexpr, BLOCK_M: tl.constexpr,
                BITS: tl.constexpr = False):
    """`_lazy_step` alone over attention given as is, [rows, m, N], one program per row; with
    ``BITS``, `_lazy_bits` instead, the queries consecutive from the first of ``qpos``."""
    r = tl.program_id(0)
    cols = tl.arange(0, N)
    last = tl.load(last_ptr + r * N + cols)
    gap = tl.load(gap_ptr + r * N + cols)
    for start in range(0, m, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = rows < m
        attn = tl.load(attn_ptr + (r * m + rows[:, None]) * N + cols[None, :], mask=ok[:, None], other=0.0)
        thr = tl.load(thr_ptr + r * m + rows, mask=ok, other=float("inf"))
        if BITS:
            q0 = tl.load(qpos_ptr) + start
            last, gap = _lazy_bits(attn, thr, q0.to(tl.float32), last, gap, 0, BLOCK_M)
        else:
            qpos = tl.load(qpos_ptr + rows, mask=ok, other=-(2**31))
            last, gap = _lazy_step(attn, thr, qpos, last, gap, 0)
    tl.store(last_ptr + r * N + cols, last)
    tl.store(gap_ptr + r * N + cols, gap)


@pytest.mark.parametrize("shuffled", [False, True])
def test_lazy_tile_scan_equals_the_torch_scan(shuffled):
    """The tile-wise formulation (exclusive prefix max inside a tile, state carried across
    tiles) against the torch scan, on attention built around the threshold so that importance
    is exact: columns important never, once, at every row, exactly at the threshold (not
    important: strictly above), once per tile, in the first and last tile only, across a tile
    boundary; repeated query positions; keys in the future and padding; state carried in,
    some of it ahead of the queries; queries out of order (the scan keeps a running max)."""
    from kvbudget.kernels.attn_scores import _importance_thresholds

    gen = torch.Generator().manual_seed(5)
    h, n, m = 2, 16, 20
    pos = torch.sort(torch.randperm(40, generator=gen)[:n]).values.expand(1, h, n).clone()
    valid = torch.ones(1, h, n, dtype=torch.bool)
    valid[0, 1, -2:] = False
    pos = pos.masked_fill(~valid, -1)
    qpos = torch.tensor([2, 5, 5, 8, 9, 12, 15, 15, 18, 20, 22, 25, 25, 28, 30, 31, 33, 36, 38, 39])
    factor = torch.rand(m, n, generator=gen) * 2.5
    factor[:, 0] = 0.5
    factor[:, 1] = 0.5
    factor[11, 1] = 3.0
    factor[:, 2] = 3.0
    factor[:, 3] = 1.0
    factor[:, 4:7] = 0.5
    factor[[3, 9, 17], 4] = 3.0
    factor[[0, 19], 5] = 3.0
    factor[[6, 7, 8], 6] = 3.0
    if shuffled:
        perm = torch.randperm(m, generator=gen)
        qpos, factor = qpos[perm], factor[perm]
    kpos = scoring.key_positions(pos, valid)
    thr = _importance_thresholds(kpos, qpos.to(torch.int32))  # [H, m]
    visible = kpos[0, :, None, :] <= qpos[None, :, None]
    attn = torch.where(visible, thr[:, :, None] * factor, 0.0)[None]  # [1, H, m, n]
    last = torch.maximum(torch.randint(0, 30, (1, h, n), generator=gen).float(), pos.float())
    last[0, 0, 7] = 100.0  # ahead of every query
    gap = torch.randint(0, 5, (1, h, n), generator=gen).float()
    want = scoring.lazy_scan([(0, attn)], pos, valid, qpos, last, gap)
    chunked = scoring.lazy_scan([(s, attn[:, :, s : s + 3]) for s in range(0, m, 3)], pos, valid, qpos, last, gap)
    assert torch.equal(want[1], chunked[1]) and torch.equal(want[2], chunked[2])
    on = (lambda t: t.to(DEVICE).contiguous())
    for block_m in (4, 8):
        got_last, got_gap = on(last), on(gap)
        _scan_tiles[(h,)](on(attn), on(thr), on(qpos.to(torch.int32)), got_last, got_gap, m, N=n, BLOCK_M=block_m)
        assert torch.equal(got_last.cpu(), want[1]) and torch.equal(got_gap.cpu(), want[2])
    # The scan as written (query by query), and the coverage the columns were built for.
    important = attn[0] > thr[:, :, None]
    for r in range(h):
        for j in range(n):
            lj, gj = float(last[0, r, j]), float(gap[0, r, j])
            for i in range(m):
                if important[r, i, j]:
                    gj, lj = max(gj, float(qpos[i]) - lj), max(lj, float(qpos[i]))
            assert (lj, gj) == (float(want[1][0, r, j]), float(want[2][0, r, j]))
    per_tile = important.view(h, m // 4, 4, n).sum(2)  # tiles of 4 rows as well as 8
    assert {0, 1} <= set(per_tile.unique().tolist()) and int(per_tile.max()) >= 2
    assert bool((attn[0] == thr[:, :, None]).any())  # ties at the threshold


@triton.jit
def _bit_ops(x_ptr, hi_ptr, run_ptr, N: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, N)).to(tl.uint32, bitcast=True)
    tl.store(hi_ptr + tl.arange(0, N), _high_bit(x))
    tl.store(run_ptr + tl.arange(0, N), _longest_run(x).to(tl.int32))


def test_bit_helpers_on_32_bit_edges():
    """`_high_bit` (a float32 conversion that may round up to the next power of two, corrected)
    and `_longest_run` against Python's integers, over the values where rounding or the sign
    bit matter: 2**k - 1, 2**k, 2**k + 1, all bits set, bit 31 alone, random words."""
    gen = torch.Generator().manual_seed(5)
    values = {1, 2**32 - 1, 2**31, 2**31 + 1, 0x7FFFFFFF, 0xFFFFFF80, 0xFFFFFF7F, 0x80000001, 0xAAAAAAAA}
    values |= {v for k in range(1, 32) for v in (2**k - 1, 2**k, 2**k + 1)}
    values |= set(torch.randint(1, 2**32, (64,), generator=gen, dtype=torch.int64).tolist())
    words = sorted(values)
    words += [1] * (triton.next_power_of_2(len(words)) - len(words))
    x = torch.tensor(words, dtype=torch.int64)
    signed = torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)  # the same 32 bits
    hi = torch.empty(len(words), dtype=torch.int32, device=DEVICE)
    run = torch.empty_like(hi)
    _bit_ops[(1,)](signed.to(DEVICE), hi, run, N=len(words))

    def longest(v: int) -> int:
        return max(len(r) for r in bin(v)[2:].split("0"))

    assert hi.cpu().tolist() == [v.bit_length() - 1 for v in words]
    # Runs up to 31 bits (`_lazy_bits` asks only of bits strictly between two set ones).
    assert run.cpu().tolist() == [min(longest(v), 31) for v in words]


@pytest.mark.parametrize("block_m", [4, 16, 32])
def test_lazy_bits_equal_the_torch_scan_on_consecutive_queries(block_m):
    """The scan without a scan (`_lazy_bits`: each key's important queries of a tile as bits,
    intervals from runs of unset bits) against the torch scan, with consecutive query positions
    (a prefill block): random importance (runs of every length), columns important never, at
    every row, at the first and last row of a tile only (bit 31 with tiles of 32), once, and
    the carried state ahead of the queries or behind them."""
    gen = torch.Generator().manual_seed(11)
    h, n, m = 2, 16, 70
    pos = torch.sort(torch.randperm(60, generator=gen)[:n]).values.expand(1, h, n).clone()
    qpos = torch.arange(60, 60 + m)
    thr = torch.full((h, m), 0.1)
    factor = torch.where(torch.rand(h, m, n, generator=gen) < 0.3, 2.0, 0.5)
    factor[:, :, 0] = 0.5
    factor[:, :, 1] = 2.0
    factor[:, :, 2] = 0.5
    factor[:, [0, 31, 32, 63, 64, 69], 2] = 2.0  # first and last rows of tiles of 32
    factor[:, :, 3] = 0.5
    factor[:, 40, 3] = 2.0
    factor[:, :, 4] = torch.where(torch.rand(h, m, generator=gen) < 0.05, 2.0, 0.5)  # long runs unset
    attn = (thr[:, :, None] * factor)[None]  # [1, H, m, n]
    last = torch.maximum(torch.randint(0, 90, (1, h, n), generator=gen).float(), pos.float())
    last[0, 0, 5] = 200.0  # ahead of every query
    gap = torch.randint(0, 5, (1, h, n), generator=gen).float()
    want = scoring.lazy_scan([(0, attn)], pos, None, qpos, last, gap)
    on = (lambda t: t.to(DEVICE).contiguous())
    got_last, got_gap = on(last), on(gap)
    _scan_tiles[(h,)](on(attn), on(thr), on(qpos.to(torch.int32)), got_last, got_gap, m, N=n, BLOCK_M=block_m, BITS=True)
    assert torch.equal(got_last.cpu(), want[1]) and torch.equal(got_gap.cpu(), want[2])
    assert float(want[2].max()) > 20  # a long interval was found


def lazy_margin(q, k, pos, valid, qpos, scaling) -> float:
    """How far from its importance threshold the nearest visible attention is (float64, relative):
    float32 paths agree on importance when this is well above their rounding (~1e-6). Queries
    that see one key are left out: their attention 1 is never above 1/1, in every path."""
    attn = group_probs64(q, k, pos, valid, qpos, scaling).mean(2)
    visible = pos[:, :, None, :] <= qpos.to(pos)[None, None, :, None]
    if valid is not None:
        visible = visible & valid[:, :, None, :]
    share = visible.sum(-1, keepdim=True)
    return float((attn * share - 1).abs()[visible & (share > 1)].min())


def lazy_state(pos, seed: int = 0):
    """State carried in from an earlier scan: last important moments (some later than the entry's
    own position) and intervals, both non-zero."""
    gen = torch.Generator().manual_seed(seed)
    last = torch.maximum(torch.randint(0, 250, pos.shape, generator=gen).float(), pos.float())
    return last, torch.randint(1, 40, pos.shape, generator=gen).float()


# Query positions of the lazy kernel tests: "holes" (sorted, repeats and gaps), "consecutive" (a
# prefill block), "shuffled" (keys and queries out of order).
LAZY_QPOS = {"consecutive": torch.arange(60, 97)}


# (positions, lse_given, g, axis): axis 0 with GQA only; in CI the "holes" positions (the
# interpreter's slowest) with GQA once per axis and LSE setting, the whole grid in `make test-slow`.
LAZY_CASES = [(p, lse, g, axis) for p in ("holes", "consecutive", "shuffled") for lse in (False, True)
              for g, axis in [(1, 1), (4, 1), (4, 0)]]
LAZY_SLOW = [("holes", False, 4, 1), ("holes", True, 4, 0)]


@pytest.mark.parametrize(("positions", "lse_given", "g", "axis"),
                         [pytest.param(*c, marks=pytest.mark.slow) if c in LAZY_SLOW else c for c in LAZY_CASES])
def test_triton_lazy_equals_the_torch_scan(g, lse_given, positions, axis):
    """The kernel's lazy mode equals the chunked torch scan: batch 2, ragged padding, the first
    queries seeing nothing, key tiles partly in the causal future, query tiles skipped before
    `qstart`, state carried in, several query tiles (carry across them), the row LSE given or
    computed, the queries along either axis of the tiles, tiles of 16 and 32 queries; query
    positions as `LAZY_QPOS` says."""
    from kvbudget.kernels.attn_scores import _tile_bounds
    from kvbudget.kernels.attn_scores import attention_lazy as kernel_lazy

    shuffled = positions == "shuffled"
    q, k, pos, valid, qpos = case(g, n=48, b=2, seed=1)
    qpos = LAZY_QPOS.get(positions, qpos)
    if shuffled:
        gen = torch.Generator().manual_seed(7)
        keys, queries = torch.randperm(k.shape[2], generator=gen), torch.randperm(q.shape[2], generator=gen)
        k, pos, valid, q, qpos = k[:, :, keys], pos[:, :, keys], valid[:, :, keys], q[:, :, queries], qpos[queries]
    assert lazy_margin(q, k, pos, valid, qpos, 0.125) > 1e-5
    last, gap = lazy_state(pos)
    want = scoring.attention_lazy(q, k, pos, valid, qpos, 0.125, last, gap, path="chunked", chunk=5)
    kpos = scoring.key_positions(pos, valid)
    _, qstart = _tile_bounds(kpos, qpos.to(torch.int32), 16, 16)
    assert bool(qstart.max() > 0) != shuffled
    lse = row_lse(q, k, pos, valid, qpos, 0.125) if lse_given else None
    on = (lambda t: None if t is None else t.to(DEVICE))
    for block_m in (16, 32) if positions == "holes" and not lse_given else (16,):  # 32: carry across tiles
        got = kernel_lazy(on(q), on(k), on(kpos), on(qpos), 0.125, on(last), on(gap), block_m=block_m, block_n=16,
                          lse=on(lse), query_axis=axis)
        received, got_last, got_gap = (t.cpu() for t in got)
        assert rel_err(received, want[0].double()) < 1e-6
        assert torch.equal(got_last, want[1]) and torch.equal(got_gap, want[2])
    if positions != "holes" or g == 1:
        return
    # Through kvbudget.scoring, default tiles (one query tile here): the same scan.
    via = scoring.attention_lazy(on(q), on(k), on(pos), on(valid), on(qpos), 0.125, on(last), on(gap),
                                 path="triton", lse=on(lse))
    assert torch.equal(via[1].cpu(), want[1]) and torch.equal(via[2].cpu(), want[2])
    assert torch.equal(on(last).cpu(), last)  # the state passed in is not modified


def test_triton_lazy_query_that_sees_one_key_finds_it_unimportant():
    """A query that sees a single key gives it attention exactly 1, never above the share 1/1;
    a given LSE a little below the logit (rounding of another kernel) must not make it
    important: here that would move the entry's last important moment from 10 to 15."""
    from kvbudget.kernels.attn_scores import attention_lazy as kernel_lazy

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16, generator=gen), torch.randn(1, 1, 3, 16, generator=gen)
    pos = torch.tensor([[[10, 20, 30]]], dtype=torch.int32)
    qpos = torch.tensor([15])
    lse = row_lse(q, k, pos, None, qpos, 0.25) - 1e-4
    last, gap = pos.float(), torch.zeros(1, 1, 3)
    want = scoring.attention_lazy(q, k, pos, None, qpos, 0.25, last, gap, path="chunked")
    on = (lambda t: t.to(DEVICE))
    got = kernel_lazy(on(q), on(k), on(pos), on(qpos), 0.25, on(last), on(gap), lse=on(lse))
    assert want[1].tolist() == [[[10.0, 20.0, 30.0]]]
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[2].cpu(), want[2])
    assert float(got[0][0, 0, 0]) > 1  # the rounding the threshold has to withstand


def test_triton_lazy_without_queries_keeps_the_state():
    from kvbudget.kernels.attn_scores import attention_lazy as kernel_lazy

    q, k, pos, valid, qpos = case(2, m=4)
    last, gap = lazy_state(pos)
    received, new_last, new_gap = kernel_lazy(q[:, :, :0], k, scoring.key_positions(pos, valid), qpos[:0], 0.125, last, gap)
    assert (received == 0).all() and torch.equal(new_last, last) and torch.equal(new_gap, gap)


@pytest.mark.parametrize("lse_given", [False, True])
def test_lazy_policy_same_through_both_backends(monkeypatch, lse_given):
    """LazyEviction's scores and state, chunked torch vs Triton (`KVBUDGET_SCORING`), through the
    Observation; with the attention call's LSE for the Triton run (the chunked path ignores it)."""
    q, k, pos, valid, qpos = case(4, seed=0)
    assert lazy_margin(q, k, pos, valid, qpos, 0.125) > 1e-5
    last, gap = lazy_state(pos, seed=3)
    monkeypatch.setenv("KVBUDGET_SCORING", "chunked")
    ref = _observation(state={"lazy_last": last, "lazy_gap": gap})
    want = SCORERS["lazy"]().score(ref)
    monkeypatch.setenv("KVBUDGET_SCORING", "triton")
    obs = _observation(state={"lazy_last": last, "lazy_gap": gap}, device=DEVICE)
    if lse_given:
        obs.lse = row_lse(q, k, pos, valid, qpos, 0.125).to(DEVICE)
    got = SCORERS["lazy"]().score(obs).cpu()
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    for name in ("lazy_last", "lazy_gap"):
        assert torch.equal(obs.state[name].cpu(), ref.state[name])


def test_triton_reads_query_parts_where_they_lie():
    """Stacked layers' queries given as parts along the batch (separate tensors, never
    concatenated) give exactly what their concatenation gives, for every mode, with the
    log-sum-exp given or computed; parts that are not alike are concatenated after all."""
    from kvbudget.kernels.attn_scores import _query_parts
    from kvbudget.kernels.attn_scores import attention_lazy as kernel_lazy
    from kvbudget.kernels.attn_scores import attention_reduce as kernel_reduce

    gen = torch.Generator().manual_seed(5)
    layers, h, g, m, n, d = 3, 2, 2, 40, 56, 32
    parts = [torch.randn(1, h * g, m, d, generator=gen).to(DEVICE) for _ in range(layers)]
    whole = torch.cat(parts)
    keys = torch.randn(layers, h, n, d, generator=gen).to(DEVICE)
    pos = torch.cat([torch.arange(0, 2 * (n - m), 2), torch.arange(200, 200 + m)]).to(torch.int32)
    kpos = pos.expand(layers, h, n).contiguous().to(DEVICE)
    qpos = torch.arange(200, 200 + m).to(DEVICE)
    lse = torch.randn(layers, h * g, m, generator=gen).to(DEVICE)
    first, offsets, rows = _query_parts(parts)
    assert first is parts[0] and offsets.shape == (layers,) and rows == 1
    for given in (None, lse):
        for mode in ("sum", "max"):
            want = kernel_reduce(whole, keys, kpos, qpos, 0.2, mode, lse=given)
            assert torch.equal(kernel_reduce(parts, keys, kpos, qpos, 0.2, mode, lse=given), want)
        last, gap = torch.full((layers, h, n), 150.0), torch.zeros(layers, h, n)
        want = kernel_lazy(whole, keys, kpos, qpos, 0.2, last, gap, lse=given)
        got = kernel_lazy(parts, keys, kpos, qpos, 0.2, last, gap, lse=given)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    unlike = [parts[0], parts[1].transpose(2, 3).contiguous().transpose(2, 3), parts[2]]
    assert _query_parts(unlike)[1].shape == (1,)  # concatenated: one part
    want = kernel_reduce(whole, keys, kpos, qpos, 0.2, "sum")
    assert torch.equal(kernel_reduce(unlike, keys, kpos, qpos, 0.2, "sum"), want)


@pytest.mark.parametrize("name", ["h2o", "lazy"])
def test_stacked_triton_scoring_equals_the_loop(tiny_llama, monkeypatch, name):
    """Through the Triton reductions (the interpreter here), the stacked compression, which hands
    the kernels the layers' queries as parts, keeps exactly what the per-layer loop keeps."""
    import kvbudget as kb
    from conftest import use_batched, random_ids
    from test_policies import _assert_same_entries

    monkeypatch.setenv("KVBUDGET_SCORING", "triton")
    model = on_device(tiny_llama)
    caches = []
    for stacked in (True, False):
        policy = kb.policy(name, budget=40)
        use_batched(stacked)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, random_ids(120), block_size=32)
        caches.append(cache)
    _assert_same_entries(*caches)


def on_device(model):
    """``model`` where the Triton kernels can read its tensors: as is under the interpreter (CPU),
    a copy on the GPU on a CUDA machine (compiled kernels take no CPU tensors)."""
    return model if DEVICE == "cpu" else copy.deepcopy(model).to(DEVICE)
