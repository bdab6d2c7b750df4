"""The log-sum-exp of the model's own attention call, reused by the scoring (issue 6).

On CPU the fast op (flash attention, CUDA only) is replaced by its torch reference,
`attention_with_lse` (``KVBUDGET_ATTENTION_LSE=reference``): these tests check the reference's
semantics, the plumbing hook -> `BudgetedLayer` -> `Observation` -> Triton kernel (under the
interpreter), and that eviction is unchanged. tests/gpu/test_lse_cuda.py compares the CUDA op
with the reference on a GPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from types import SimpleNamespace

import pytest
from conftest import random_ids

import kvbudget as kb
from kvbudget.kv.ragged import RaggedEntries
from kvbudget.kv import hook as attention, plan as plans
from kvbudget.compress import engine, scoring
from kvbudget.kv.plan import AttentionPlan
from kvbudget.kernels.flash import attention_with_lse
from kvbudget.kv.hook import lse_mode
from transformers.integrations.sdpa_attention import sdpa_attention_forward as transformers_sdpa
from kvbudget.kv.cache import BudgetedCache

triton = pytest.importorskip("triton")
from test_attn_scores import DEVICE, on_device, rel_err, row_lse  # also patches the interpreter


def _qkv(n_old: int, m: int, hq: int = 4, h: int = 2, d: int = 16, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, m, d, generator=gen).to(dtype)
    k = torch.randn(1, h, n_old + m, d, generator=gen).to(dtype)
    v = torch.randn(1, h, n_old + m, d, generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("n_old,m", [(7, 5), (0, 6), (9, 1)])
def test_reference_equals_sdpa_with_the_plans_mask(n_old, m):
    """Output = transformers' sdpa with the plan's mask (the path without LSE); lse = logsumexp of
    the masked logits. GQA (4 query heads over 2 KV heads); first block (n_old 0) and decode."""
    q, k, v = _qkv(n_old, m)
    plan = AttentionPlan(keys=k, head_lens=None, n_old=n_old, layer=None)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    want, _ = transformers_sdpa(module, q, k, v, plan.mask(m, 4), scaling=0.3)  # [B, M, Hq, dv]
    out, lse = attention_with_lse(q, k, v, n_old, 0.3)
    assert out.shape == (1, 4, m, 16) and lse.shape == (1, 4, m) and lse.dtype == torch.float32
    torch.testing.assert_close(out.transpose(1, 2), want, atol=1e-5, rtol=1e-5)
    mask = plan.mask(m, 4)
    logits = torch.einsum("bhmd,bhnd->bhmn", q, k.repeat_interleave(2, dim=1)) * 0.3
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse, logits.logsumexp(-1), atol=1e-5, rtol=1e-5)


def test_reference_lse_drives_the_kernel_like_its_own_first_pass():
    """A prefill-shaped layer (old entries at scattered positions, then the block): the LSE of
    the attention call fed to the reduction equals the kernel's two passes, in bf16 too."""
    from kvbudget.kernels.attn_scores import attention_reduce as kernel_reduce

    n_old, m = 40, 24
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        q, k, v = _qkv(n_old, m, dtype=dtype, seed=1)
        old = torch.sort(torch.randperm(100)[:n_old]).values
        pos = torch.cat([old, torch.arange(100, 100 + m)]).expand(1, 2, n_old + m).to(torch.int32)
        qpos = torch.arange(100, 100 + m)
        _, lse = attention_with_lse(q, k, v, n_old, 0.25)
        torch.testing.assert_close(lse, row_lse(q, k, pos, None, qpos, 0.25), atol=1e-4, rtol=1e-4)
        args = [t.to(DEVICE) for t in (q, k, pos, qpos)]
        for mode in ("sum", "max"):
            one = kernel_reduce(*args, 0.25, mode, lse=lse.to(DEVICE)).cpu()
            two = kernel_reduce(*args, 0.25, mode).cpu()
            assert rel_err(one, two.double()) < tol


def _append(cache: BudgetedCache, m: int) -> None:
    for layer in cache.layers:
        layer.update(torch.randn(1, 2, m, 16), torch.randn(1, 2, m, 16))
        plans.discard_plan()  # no attention call here to take it


def _layer(cache: BudgetedCache, n: int):
    """The first budgeted layer of ``cache`` (every layer holding ``n`` tokens)."""
    _append(cache, n)
    layer = cache.layers[0]
    layer.observed.keep = -1
    layer.cache = cache  # for _chunk
    return layer


def _chunk(layer, m: int, with_lse: bool = True):
    """``m`` more tokens in every layer; ``layer`` observes their queries (and an LSE)."""
    q = torch.randn(1, 4, m, 16)
    lse = torch.randn(1, 4, m) if with_lse else None
    _append(layer.cache, m)
    layer.observe(q, 0.25, lse)
    return q, lse


def test_layer_keeps_lse_aligned_and_drops_it_for_the_interval(tiny_llama):
    cache = BudgetedCache(tiny_llama.config)
    layer = _layer(cache, 10)
    assert layer.wants_lse()
    (q1, l1), (q2, l2) = _chunk(layer, 3), _chunk(layer, 2)
    assert torch.equal(layer.observed.queries, torch.cat([q1, q2], 2)) and torch.equal(layer.observed.lse, torch.cat([l1, l2], 2))
    assert layer.observed.positions.tolist() == [10, 11, 12, 13, 14]
    _chunk(layer, 1, with_lse=False)  # e.g. a decode step through a path without LSE
    assert layer.observed.lse is None and not layer.wants_lse()
    _chunk(layer, 2)  # a later chunk with LSE does not bring it back: the rows would mix
    assert layer.observed.lse is None and layer.observed.queries.shape[2] == 8
    layer.clear_queries()
    assert layer.wants_lse()
    _, l3 = _chunk(layer, 4)
    assert torch.equal(layer.observed.lse, l3)
    # Evicting (anything but appending) changes the keys those LSEs were taken over.
    layer.keep(torch.arange(5).expand(1, 2, 5))
    assert layer.observed.lse is None and layer.observed.queries is not None
    # Transient tokens attend to their own keys, never stored.
    layer.clear_queries()
    with cache.transient():
        assert not layer.wants_lse()
        _chunk(layer, 2)
    assert layer.observed.lse is None


def test_lse_truncated_like_the_queries(tiny_llama):
    cache = BudgetedCache(tiny_llama.config)
    layer = _layer(cache, 6)
    layer.observed.keep = 3  # a window scorer (SnapKV) wants the LSE of its window too
    assert layer.wants_lse()
    _, l1 = _chunk(layer, 2)
    q2, l2 = _chunk(layer, 2)
    assert layer.observed.queries.shape[2] == 3 and torch.equal(layer.observed.queries[:, :, 1:], q2)
    assert torch.equal(layer.observed.lse, torch.cat([l1, l2], 2)[:, :, -3:])


def test_window_lse_comes_back_once_the_window_is_refilled(tiny_llama):
    """A window kept across an eviction loses its LSE; the rows observed since with one fill it
    again, and the LSE covers the whole window. Accumulating scorers (every query kept) never
    get it back within the interval."""
    cache = BudgetedCache(tiny_llama.config)
    layer = _layer(cache, 6)
    layer.observed.keep = 3
    _chunk(layer, 3)
    layer.keep(torch.arange(4).expand(1, 2, 4))  # an eviction: the window stays, its LSE goes
    assert layer.observed.lse is None and layer.observed.queries.shape[2] == 3 and layer.wants_lse()
    _, l1 = _chunk(layer, 2)
    assert layer.observed.lse is None and torch.equal(layer.observed.lse_tail, l1)
    _, l2 = _chunk(layer, 2)
    assert torch.equal(layer.observed.lse, torch.cat([l1, l2], 2)[:, :, -3:]) and layer.observed.lse_tail is None
    _chunk(layer, 1, with_lse=False)
    assert layer.observed.lse is None and layer.observed.lse_tail is None and layer.wants_lse()
    layer.observed.keep = -1
    _chunk(layer, 4)
    assert layer.observed.lse is None and not layer.wants_lse()


def test_scratch_restores_or_drops_the_lse(tiny_llama):
    cache = BudgetedCache(tiny_llama.config)
    layer = _layer(cache, 6)
    _, l1 = _chunk(layer, 2)
    with cache.scratch():  # forgotten afterwards: back to the same entries, the same LSE
        _chunk(layer, 3)
    assert torch.equal(layer.observed.lse, l1) and layer.observed.queries.shape[2] == 2
    with cache.scratch(keep_queries=True):  # kept queries attended to entries now dropped
        _chunk(layer, 3)
    assert layer.observed.lse is None and layer.observed.queries.shape[2] == 5


def _spy(monkeypatch) -> list:
    """Record, at each Triton reduction, whether an LSE was supplied."""
    from kvbudget.kernels import attn_scores

    seen = []
    real = attn_scores.attention_reduce

    def spy(*args, lse=None, **kwargs):
        seen.append(lse is not None)
        return real(*args, lse=lse, **kwargs)

    monkeypatch.setattr(attn_scores, "attention_reduce", spy)
    return seen


def _kept(model, name: str, stack: bool = True, context: int = 96):
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "BATCHED", stack)
        policy = kb.policy(name, budget=24)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, random_ids(context, seed=4), 32)
    return [(layer.entries.positions.clone(), dict(layer.entries.state)) for layer in cache.layers]


@pytest.mark.parametrize("name", ["h2o", "a2sf", "snapkv"])
def test_prefill_with_the_attention_lse_keeps_the_same_entries(tiny_llama, monkeypatch, name):
    """End to end on CPU: the hook computes the attention with its LSE (reference op), the layer
    keeps it (every query's for H2O and A2SF, the window's for SnapKV), the stacked compression
    hands it to the kernel, which skips pass 1; the kept entries and the accumulated scores equal
    those of the path without LSE."""
    monkeypatch.setenv("KVBUDGET_SCORING", "triton")
    seen = _spy(monkeypatch)
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "off")
    tiny_llama = on_device(tiny_llama)
    off = _kept(tiny_llama, name)
    assert seen and not any(seen)
    seen.clear()
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "reference")
    ref = _kept(tiny_llama, name)
    assert seen and all(seen)
    for (pa, sa), (pb, sb) in zip(off, ref):
        assert torch.equal(pa, pb)
        if name in sa:
            torch.testing.assert_close(sa[name], sb[name], atol=1e-5, rtol=1e-4)


def test_window_lse_is_over_exactly_the_scored_keys(tiny_llama, monkeypatch):
    """The LSE a window scorer is handed (the last rows of the block's attention call) is each
    window query's log-sum-exp over exactly the keys it scores: the kept entries and the block,
    causal inside it. A window that still holds queries from before the last compression (a
    last block shorter than the window) comes without one: they attended to entries since
    evicted."""
    from kvbudget.methods.scorers.snapkv import SnapKV

    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "reference")
    seen = []
    real = SnapKV.score

    def score(self, obs):
        seen.append((obs.lse, row_lse(obs._queries(), obs.keys, obs.positions, obs.valid,
                                      obs.query_positions, obs.scaling)))
        return real(self, obs)

    monkeypatch.setattr(SnapKV, "score", score)
    policy = kb.policy("snapkv", budget=24)
    kb.prefill(tiny_llama, policy.new_cache(tiny_llama), policy, random_ids(100, seed=5), 32)
    assert len(seen) == 4  # four compressions of stacked layers, the last after a block of 4
    for got, want in seen[:3]:
        assert got is not None and got.shape == want.shape == (3, 4, 32)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert seen[3][0] is None


def test_stacked_compression_with_lse_equals_the_layer_loop(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVBUDGET_SCORING", "triton")
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "reference")
    seen = _spy(monkeypatch)
    tiny_llama = on_device(tiny_llama)
    stacked = _kept(tiny_llama, "h2o", stack=True)
    n_stacked = len(seen)
    loop = _kept(tiny_llama, "h2o", stack=False)
    assert all(seen) and len(seen) - n_stacked == len(tiny_llama.model.layers) * n_stacked  # really stacked
    for (pa, sa), (pb, sb) in zip(stacked, loop):
        assert torch.equal(pa, pb)
        torch.testing.assert_close(sa["h2o"], sb["h2o"], atol=1e-5, rtol=1e-4)


def test_stacking_drops_the_lse_if_one_layer_lacks_it(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVBUDGET_SCORING", "triton")
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "reference")
    seen = _spy(monkeypatch)
    policy = kb.policy("h2o", budget=24)
    tiny_llama = on_device(tiny_llama)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(64, seed=4), 32, compress_last=False)
    assert all(layer.observed.lse is not None for layer in cache.layers)
    seen.clear()
    cache.layers[1].observed.lse = None
    kb.compress(cache, policy)
    assert seen == [False]


def test_no_lse_for_the_eager_hook_or_when_off(tiny_llama_eager, tiny_llama, monkeypatch):
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "reference")
    for model, expect in ((tiny_llama_eager, False), (tiny_llama, True)):
        policy = kb.policy("h2o", budget=24)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, random_ids(40), 32, compress_last=False)
        assert all((layer.observed.lse is not None) == expect for layer in cache.layers)
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "bogus")
    with pytest.raises(ValueError):
        lse_mode()
    monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", "auto")
    assert lse_mode() == "auto"
    # auto on CPU / float32: no fast op, the ordinary path, no LSE.
    policy = kb.policy("h2o", budget=24)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(40), 32, compress_last=False)
    if not torch.cuda.is_available():
        assert all(layer.observed.lse is None for layer in cache.layers)


def test_scoring_ignores_lse_on_torch_paths():
    q, k, _ = _qkv(6, 4)
    pos = torch.arange(10).expand(1, 2, 10)
    qpos = torch.arange(6, 10)
    want = scoring.attention_reduce(q, k, pos, None, qpos, 0.25, path="chunked")
    bogus = torch.zeros(1, 4, 4)
    for path in ("chunked", "materialise"):
        got = scoring.attention_reduce(q, k, pos, None, qpos, 0.25, path=path, lse=bogus)
        torch.testing.assert_close(got, want)


def test_session_file_keeps_the_lse(tiny_llama):
    """The same entries come back from a session file, so their queries' LSE comes back too."""
    from kvbudget.runtime import sessionfile

    cache = BudgetedCache(tiny_llama.config)
    layer = _layer(cache, 6)
    _, lse = _chunk(layer, 3)
    tensors: dict = {}
    meta = sessionfile._budgeted_to_file("l0", layer, tensors)
    fresh = BudgetedCache(tiny_llama.config).layers[0]
    sessionfile._budgeted_from_file("l0", fresh, meta, tensors)
    assert torch.equal(fresh.observed.lse, lse) and torch.equal(fresh.observed.queries, layer.observed.queries)
    del tensors["l0.lse"]  # a file written before the LSE was kept
    older = BudgetedCache(tiny_llama.config).layers[0]
    sessionfile._budgeted_from_file("l0", older, meta, tensors)
    assert older.observed.lse is None and older.observed.queries is not None


@pytest.mark.parametrize("name", ["streaming", "full"])
def test_blocks_of_other_policies_take_the_lse_op_and_keep_no_lse(tiny_llama, monkeypatch, name):
    """Prefill blocks of dense layers go through the op that returns the LSE (flash on CUDA) even
    when the scorer does not want it: same kept entries as the masked path, no LSE kept, and
    one-token steps keep the ordinary path."""
    import kvbudget.kv.hook as katt

    calls = []
    real = katt.attention_with_lse
    monkeypatch.setattr(katt, "attention_with_lse", lambda q, *a, **k: calls.append(q.shape[2]) or real(q, *a, **k))
    kept = {}
    for mode in ("off", "reference"):
        monkeypatch.setenv("KVBUDGET_ATTENTION_LSE", mode)
        policy = kb.policy(name, budget=24) if name != "full" else kb.policy(name)
        cache = policy.new_cache(tiny_llama)
        logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(96, seed=4), 32)
        with torch.inference_mode():
            tiny_llama(input_ids=logits.argmax(-1, keepdim=True), cache=cache, use_cache=True)
        kept[mode] = [layer.entries.positions.clone() for layer in cache.layers]
        assert all(layer.observed.lse is None for layer in cache.layers)
    assert calls and min(calls) == 32  # blocks only: the one-token step took the ordinary path
    for a, b in zip(kept["off"], kept["reference"]):
        assert torch.equal(a, b)


def _varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale):
    """What varlen flash attention computes, in torch: per sequence i, queries cu_q[i]..cu_q[i+1]
    over keys cu_k[i]..cu_k[i+1], causal aligned bottom-right (query r of M sees the first
    L - M + r + 1 keys), every query head over the sequence's one KV head."""
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qi, ki, vi = q[cu_q[i]:cu_q[i + 1]], k[cu_k[i]:cu_k[i + 1], 0], v[cu_k[i]:cu_k[i + 1], 0]
        m, n = qi.shape[0], ki.shape[0]
        logits = torch.einsum("mgd,nd->gmn", qi.float(), ki.float()) * scale
        if causal:
            later = torch.arange(n)[None, :] > torch.arange(m)[:, None] + (n - m)
            logits = logits.masked_fill(later, float("-inf"))
        out[cu_q[i]:cu_q[i + 1]] = torch.einsum("gmn,nd->mgd", logits.softmax(-1), vi.float()).to(q.dtype)
    return (out,)


@pytest.mark.parametrize("m", [1, 5])
def test_ragged_flash_layout_equals_the_masked_padded_path(m):
    """`ragged_flash` hands varlen flash attention the right sequences: with a torch stand-in for
    the op it equals SDPA over the padded keys with the ragged plan's mask (old entries of each
    head, then padding, then the block causally), GQA included."""
    from ragged_layout import padded_segments

    from kvbudget.kernels.flash import ragged_flash

    gen = torch.Generator().manual_seed(2)
    h, g, d = 3, 2, 8
    old = torch.tensor([4, 7, 2])
    lens = tuple(int(n) + m for n in old)
    flat_k, flat_v = torch.randn(sum(lens), d, generator=gen), torch.randn(sum(lens), d, generator=gen)
    query = torch.randn(1, h * g, m, d, generator=gen)
    n_old = int(old.max())
    pad_k, pad_v = padded_segments(flat_k, flat_v, old.tolist(), m)
    mask = AttentionPlan(keys=pad_k, head_lens=old, n_old=n_old, layer=None).mask(m, h * g)
    want = torch.nn.functional.scaled_dot_product_attention(
        query, pad_k.repeat_interleave(g, 1), pad_v.repeat_interleave(g, 1), attn_mask=mask, scale=0.3)
    got = ragged_flash(query, flat_k, flat_v, lens, 0.3, op=_varlen_reference)
    assert got.shape == (1, m, h * g, d)
    torch.testing.assert_close(got, want.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_ragged_plan_carries_the_layers_storage(tiny_llama):
    """A block over a ragged layer (Ada-KV after its first compression) leaves the attention call
    the layer's storage with each head's segment holding the block, and the host lengths."""
    from kvbudget.kv import hook as attention, plan as plans

    policy = kb.policy("adakv", budget=24)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(64), block_size=16)
    layer = cache.layers[0]
    assert isinstance(layer.entries, RaggedEntries)
    before = layer.entries.sizes
    keys = torch.randn(1, layer.n_heads, 3, layer.keys.shape[-1])
    layer.update(keys, keys.clone())
    plan = plans.take_plan(plans._local.plan.keys)
    flat_k, _, lens = plan.segments
    assert lens == tuple(n + 3 for n in before) == layer.entries.sizes and flat_k is layer.keys
    ends = torch.tensor(lens).cumsum(0)
    for i in range(layer.n_heads):  # each segment ends with the block's tokens of that head
        assert torch.equal(flat_k[ends[i] - 3 : ends[i]], keys[0, i])
