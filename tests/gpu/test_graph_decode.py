"""Static buffers + one CUDA graph per token give what eager decoding gives, on CUDA.

For dense and ragged policies and KIVI store layers, with decode-time compression every 16
tokens (write-back, compress, reload while the graph stays captured): the same tokens and the
same cache as eager decoding. Also: decoders leave no memory behind, a cache survives a round
trip through pinned host memory while the GPU computes, and an answer rolled back to its
snapshot (held on the host or on the GPU) leaves the cache exactly as before it.
"""

import gc

import pytest
import torch

import kvbudget as kb
from kvbudget.runtime import fusion
from kvbudget.runtime import static as kstatic
from kvbudget.runtime.decoder import StaticDecoder
from kvbudget.kv.cache import BudgetedCache
from kvbudget.kv.encoded import EncodedEntries

from .gpu_kit import answer, compare_caches, decode, random_ids

pytestmark = pytest.mark.gpu

POLICIES = [("full", {}), ("snapkv", {"budget": 512}), ("h2o", {"budget": 512}), ("adakv", {"budget": 512}),
            ("streaming", {"budget": 512})]


def test_decoders_leave_no_memory_behind(model_f32):
    """Building, capturing and dropping decoders, answer after answer, leaves GPU memory where
    it was (each capture's warm-up must not keep its own cuBLAS workspace)."""
    policy = kb.policy("snapkv", budget=512)
    cache = policy.new_cache(model_f32)
    kb.prefill(model_f32, cache, policy, random_ids(1500), 512)
    tok = torch.tensor([5], device="cuda")
    sizes = []
    for _ in range(4):
        dec = StaticDecoder.from_cache(model_f32, cache, capacity=8)
        dec.step(tok)
        del dec
        gc.collect()
        torch.cuda.synchronize()
        sizes.append(torch.cuda.memory_allocated())
    growth = (sizes[-1] - sizes[1]) / 2**20
    assert growth < 1, f"GPU memory grew by {growth:.1f} MiB over decoders 2..4"


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("name,kw", POLICIES, ids=[p[0] for p in POLICIES])
def test_graph_equals_eager(model_f32, monkeypatch, backend, name, kw):
    if backend == "triton":
        from kvbudget.kernels import HAVE_TRITON

        if not HAVE_TRITON:
            pytest.skip("triton is not installed: the varlen decode kernel cannot run")
    if backend == "sdpa" and name == "adakv":
        pytest.skip("ragged layers take the reference path under the sdpa backend: covered by 'reference'")
    fusion.maybe_fuse(model_f32, torch.device("cuda"))  # eager and graph run the same kernels
    monkeypatch.setattr(kstatic, "ATTENTION", backend)
    eager, ce = decode(model_f32, name, "eager", **kw)
    graph, cg = decode(model_f32, name, "graph", **kw)
    diff = compare_caches(ce, cg)
    assert eager == graph, f"tokens differ: eager {eager} graph {graph}"
    assert diff < 1e-3, f"max |cache diff| {diff:.2e}"


KIVI = [("kivi4", {}), ("kivi2", {}), ("snapkv+kivi4", {"budget": 512}), ("h2o+kivi2", {"budget": 512})]


@pytest.mark.parametrize("name,kw", KIVI, ids=[p[0] for p in KIVI])
def test_kivi_layers_in_the_graph(model_f32, monkeypatch, name, kw):
    """KIVI layers decode in the graph (the body in static buffers read by the fused kernel, the
    tail appended in place; write-back, flush or eviction, reload between replays): every layer
    in the graph, the eager tokens, the same body lengths. float32 paths agree to ~1e-5, but a
    value that close to a rounding boundary of the quantizer can take the neighbouring code and
    the tokens after it then see a slightly different key: the codes must nearly all agree, the
    full-precision tails to 1e-4 without a differing code, 1e-2 with one."""
    from kvbudget.runtime import static_store

    fusion.maybe_fuse(model_f32, torch.device("cuda"))
    eager, ce = decode(model_f32, name, "eager", n_new=96, **kw)
    built = []
    real = static_store.StaticStoreLayer.build.__func__
    monkeypatch.setattr(static_store.StaticStoreLayer, "build",
                        classmethod(lambda cls, layer, cap: built.append(1) or real(cls, layer, cap)))
    graph, cg = decode(model_f32, name, "graph", n_new=96, **kw)
    compare_caches(ce, cg)  # asserts equal positions: the same entries kept
    pairs = list(zip(ce.layers, cg.layers))
    tail = max(float((a.keys - b.keys).abs().max()) for a, b in pairs)
    codes = sum(int((a.entries.body.tokens[k] != b.entries.body.tokens[k]).sum()) for a, b in pairs for k in ("k", "v"))
    total = sum(a.entries.body.tokens[k].numel() for a, _ in pairs for k in ("k", "v"))
    assert len(built) == 4, f"{len(built)} of 4 store layers in the graph"
    assert eager == graph
    assert all(len(a.entries.body) == len(b.entries.body) for a, b in pairs), "body lengths differ from eager decoding"
    assert codes <= total * 1e-4, f"{codes} of {total} code bytes differ"
    assert tail < (1e-2 if codes else 1e-4), f"tail max |diff| {tail:.2e} with {codes} codes differing"


def test_cache_round_trip_through_pinned_host_memory(model_f32):
    """A cache sent to pinned host memory and back with non-blocking copies is unchanged, also
    while the GPU computes something else meanwhile."""
    policy = kb.policy("snapkv", budget=512)
    cache = policy.new_cache(model_f32)
    kb.prefill(model_f32, cache, policy, random_ids(2000))
    before = [(layer.keys.clone(), layer.values.clone(), layer.entries.positions.clone()) for layer in cache.layers]
    cache.to("cpu", non_blocking=True)
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        busy = busy @ busy.T / 64  # compute queued on the main stream meanwhile
    cache.wait()
    assert all(layer.keys.is_pinned() for layer in cache.layers), "host copy not pinned"
    cache.to("cuda", non_blocking=True)
    cache.wait()
    for (k, v, p), layer in zip(before, cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values) and torch.equal(p, layer.entries.positions)


@pytest.mark.parametrize("host", [True, False], ids=["snapshot-on-host", "snapshot-on-gpu"])
@pytest.mark.parametrize("name", ["snapkv", "snapkv+kivi4"])
def test_answer_rolls_back_to_its_snapshot(model_f32, monkeypatch, name, host):
    """An answer with decode-time compression inside `scratch` (as `Session` answers), graph
    decoding: the rollback gives back exactly the cache from before the answer (keys, values,
    positions, body codes), whether the snapshot waits in pinned host memory or on the GPU."""
    monkeypatch.setattr(BudgetedCache, "host_snapshots", host)
    torch.manual_seed(0)
    policy = kb.policy(name, budget=512, decode_interval=16)
    cache = policy.new_cache(model_f32)
    logits, _ = kb.prefill(model_f32, cache, policy, random_ids(3000), 512)
    before = [(layer.view(),
               {k: t.clone() for k, t in layer.entries.body.tokens.items()} if isinstance(layer.entries, EncodedEntries) else {})
              for layer in cache.layers]
    with torch.inference_mode(), cache.scratch():
        answer(model_f32, cache, policy, logits, 48, "graph")
    for layer, (view, body) in zip(cache.layers, before):
        now = layer.view()
        assert torch.equal(now.keys, view.keys) and torch.equal(now.values, view.values)
        assert torch.equal(now.positions, view.positions)
        assert all(torch.equal(layer.entries.body.tokens[k], t) for k, t in body.items())
