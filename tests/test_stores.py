"""Stores (KIVI, rotated, MiKV, ThinK): bytes equal the formula, encoded entries decode within a
stated error, eviction composes with them, and quantization primitives are exact where claimed."""

import pytest
import torch
from conftest import limit_groups, random_ids, use_batched
from transformers import LlamaConfig, LlamaForCausalLM

import kvbudget as kb
from kvbudget.kv.cache import flush_layers
from kvbudget.kv.hook import attach
from kvbudget.errors import UnknownPolicyError
from kvbudget.methods.stores.quant import dequantize, dequantize_groups, hadamard, pack, quantize, quantize_groups, unpack
from kvbudget.runtime.answer import greedy_decode


def _llama64(layers: int) -> LlamaForCausalLM:
    """Random-weight Llama with head_dim 64 (KIVI's group of 32 channels divides it), fp32."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    attach(model)
    return model


@pytest.fixture(scope="module")
def llama64():
    return _llama64(layers=2)


def _prefill(model, name, ids, budget=None, block=64, **kw):
    policy = kb.policy(name, budget=budget, **kw)
    cache = policy.new_cache(model)
    logits, _ = kb.prefill(model, cache, policy, ids, block)
    return policy, cache, logits


# --- primitives ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4])
def test_quantization_error_is_at_most_half_a_step(bits):
    x = torch.randn(4, 32, 64)
    codes, scale, zero = quantize(x, bits, dim=1)
    assert int(codes.max()) <= 2**bits - 1
    err = (dequantize(codes, scale, zero, x.dtype) - x).abs()
    assert bool((err <= scale / 2 + 1e-6).all())
    packed, s, z = quantize_groups(x, bits, 32)
    back = dequantize_groups(packed, s, z, bits, x.dtype)
    assert back.shape == x.shape and float((back - x).abs().max()) <= float(s.max()) / 2 + 1e-6


def test_masked_statistics_ignore_padding():
    x = torch.tensor([[0.0, 1.0, 100.0]])
    codes, scale, zero = quantize(x, 2, dim=-1, valid=torch.tensor([[True, True, False]]))
    assert float(zero) == 0.0 and float(scale) == pytest.approx(1 / 3)


def test_hadamard_is_orthogonal_and_rejects_odd_sizes():
    r = hadamard(64, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(64), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


# --- bytes ---------------------------------------------------------------------------------------
def test_kivi2_bytes_equal_the_formula(llama64):
    """KIVI-2, group 32, head_dim 64, fp32 scales/zeros: 256 tokens, residual 64 -> 192 tokens
    quantized (6 key groups), 64 in full precision."""
    _, cache, _ = _prefill(llama64, "kivi2", random_ids(256), residual=64)
    h, d, n_body, n_tail, f32 = 1, 64, 192, 64, 4
    key_codes = n_body * d * 2 // 8
    key_scales = (n_body // 32) * d * 2 * f32  # per channel, per group of 32 tokens: scale + zero
    value_codes = n_body * d * 2 // 8
    value_scales = n_body * (d // 32) * 2 * f32  # per token, per group of 32 channels
    chunk_ids = n_body * 2  # int16: which key group each token belongs to
    tail = n_tail * d * 2 * f32
    positions = (n_body + n_tail) * 4
    expected = h * (key_codes + key_scales + value_codes + value_scales + chunk_ids + tail + positions)
    for layer in cache.layers:
        assert len(layer.entries.body) == n_body and layer.keys.shape[-2] == n_tail
        assert layer.nbytes() == expected
    full = _prefill(llama64, "full", random_ids(256))[1]
    assert cache.nbytes() < 0.36 * full.nbytes()  # a quarter of the tokens stay full precision


def test_store_entry_bytes_match_what_is_held(llama64):
    """The per-entry figure used for byte budgets equals the bytes really held per body entry."""
    for name in ["kivi2", "kivi4", "rotate2", "think"]:
        policy, cache, _ = _prefill(llama64, name, random_ids(256), residual=64)
        layer = cache.layers[0]
        per_entry = layer.entries.body.nbytes() / len(layer.entries.body)
        assert per_entry == pytest.approx(policy.store.entry_bytes(64, torch.float32), rel=0.02), name


def test_eviction_composes_with_kivi(llama64):
    ids = random_ids(300)
    _, plain, _ = _prefill(llama64, "snapkv", ids, budget=96)
    policy, quant, logits = _prefill(llama64, "snapkv+kivi4", ids, budget=96)
    assert policy.name == "snapkv+kivi4"
    for a, b in zip(plain.layers, quant.layers):
        assert a.max_entries == b.max_entries == 96
        # The tail is the protected window; everything older is 4-bit.
        assert b.keys.shape[-2] == policy.protected(96) and len(b.entries.body) == 96 - policy.protected(96)
        pos = b.entries.positions[0, 0]
        assert bool((pos[1:] > pos[:-1]).all())
    assert quant.nbytes() < 0.5 * plain.nbytes()  # a third of the entries are the fp window
    assert torch.isfinite(logits).all()


def test_head_adaptive_with_a_store_is_a_clear_error():
    with pytest.raises(UnknownPolicyError, match="same number of entries"):
        kb.policy("adakv+kivi4", budget=64)


# --- error vs full precision ---------------------------------------------------------------------
def test_eight_bit_rotation_is_nearly_exact(llama64):
    ids = random_ids(200)
    ref = _prefill(llama64, "full", ids)[2]
    for name in ["rotate", "kivi"]:
        logits = _prefill(llama64, name, ids, bits=8, residual=32)[2]
        torch.testing.assert_close(logits, ref, atol=2e-2, rtol=0)


def test_mikv_demotes_instead_of_evicting(llama64):
    ids = random_ids(300)
    policy, cache, _ = _prefill(llama64, "mikv", ids, budget=64)
    assert policy.scorer.name == "h2o" and policy.store.demotes
    for layer in cache.layers:
        assert layer.max_entries == 300  # no token left behind
        assert layer.keys.shape[-2] == 64  # only the budget at full precision
        assert sorted(layer.entries.positions[0, 0].tolist()) == list(range(300))
    full = _prefill(llama64, "full", ids)[1]
    assert cache.nbytes() < 0.4 * full.nbytes()
    # Budget >= context: nothing is demoted, identical to full.
    same = _prefill(llama64, "mikv", ids, budget=300)[2]
    torch.testing.assert_close(same, _prefill(llama64, "full", ids)[2])


def test_think_keeps_the_top_channels_and_stores_only_them(llama64):
    ids = random_ids(200)
    ref = _prefill(llama64, "full", ids)[2]
    torch.testing.assert_close(_prefill(llama64, "think", ids, ratio=0.0)[2], ref)  # nothing pruned
    policy, cache, _ = _prefill(llama64, "think", ids, ratio=0.5)
    layer = cache.layers[0]
    assert layer.entries.body.tokens["k"].shape[-1] == 32 and layer.entries.body.chunks["channels"].shape[-1] == 32
    keys = layer.view().keys[0, 0, : len(layer.entries.body)]
    assert int((keys.abs().sum(0) > 0).sum()) <= 32 * layer.entries.body.chunks["channels"].shape[2]


def test_store_state_survives_decode_and_scratch(llama64):
    """Tokens decoded after a quantized prefill land in the full-precision tail, and scratch
    rolls them back exactly."""
    _, cache, logits = _prefill(llama64, "kivi4", random_ids(200), residual=32)
    before = [(len(layer.entries.body), layer.keys.clone()) for layer in cache.layers]
    with cache.scratch(), torch.inference_mode():
        for _ in range(5):
            tok = logits.argmax(-1, keepdim=True)
            logits = llama64(input_ids=tok, cache=cache, use_cache=True).logits[:, -1]
    for layer, (n_body, tail) in zip(cache.layers, before):
        assert len(layer.entries.body) == n_body and torch.equal(layer.keys, tail)


def test_minicache_merges_upper_layer_pairs(llama64):
    ids = random_ids(200)
    ref = _prefill(llama64, "full", ids)
    # Everything retained unmerged: exact.
    torch.testing.assert_close(_prefill(llama64, "minicache", ids, retain=1.0)[2], ref[2])
    policy, cache, logits = _prefill(llama64, "minicache", ids, retain=0.0)
    assert policy.store.pairs(2) == []  # two layers: the upper half is one layer, nothing to pair
    torch.testing.assert_close(logits, ref[2])


def test_minicache_bytes_and_restoration():
    """Four layers: layers 2 and 3 are merged; the shared directions are counted once."""
    model = _llama64(layers=4)
    ids = random_ids(160)
    _, full, _ = _prefill(model, "full", ids)
    policy, cache, _ = _prefill(model, "minicache", ids, retain=0.0, residual=32)
    assert policy.store.pairs(4) == [(2, 3)]
    layers = cache.layers
    assert layers[0].entries.body is None and layers[1].entries.body is None
    n = len(layers[2].entries.body)
    assert n == 160 - 32 and layers[3].entries.body.pair is layers[2].entries.body.pair
    f32, d = 4, 64
    merged = n * (2 * d + 2) * f32 + n * 2 * f32  # shared K/V directions + both layers' K/V norms
    held = sum(layer.nbytes() for layer in layers[2:])
    unmerged = 2 * (32 * 2 * d * f32) + 2 * 160 * 4  # both tails + positions
    assert held == merged + unmerged + layers[2].entries.body.pair.retained.nbytes
    assert cache.nbytes() < full.nbytes()
    # Norms are exact: restored vectors keep their own lengths. (Layer 2's inputs come from exact
    # layers 0-1, so its keys match the full run; layer 3 already sees merged layer-2 attention.)
    got, ref_keys = layers[2].view().keys, full.layers[2].view().keys
    torch.testing.assert_close(got.norm(dim=-1), ref_keys.norm(dim=-1))
    assert float(torch.nn.functional.cosine_similarity(got, ref_keys, dim=-1).min()) > 0.5


def test_minicache_refuses_eviction():
    with pytest.raises(UnknownPolicyError, match="merges layers"):
        kb.policy("snapkv+minicache", budget=64)


def test_chunk_tables_are_compacted_per_head(tiny_llama):
    """Two KV heads evicting independently: each head's live chunks are packed to the front, so
    the table is as wide as the head with the most live chunks, and every id points inside it."""
    _, cache, _ = _prefill(tiny_llama, "snapkv+kivi4", random_ids(400), budget=48, block=32)
    for layer in cache.layers:
        ids = layer.entries.body.chunk_id[0].long()
        live = [len(set(ids[h].tolist())) for h in range(ids.shape[0])]
        assert layer.entries.body.chunks["k_scale"].shape[2] == max(live)
        assert int(ids.max()) < max(live)


@pytest.mark.parametrize("name", ["kivi4", "kivi2", "rotate4", "think"])
def test_flush_appends_what_a_rebuild_would_hold(llama64, name):
    """A flush encodes the tail's oldest entries and appends them to the body (no gather of the old
    body): the same body, chunk ids, chunk table and tail as rebuilding with every entry kept."""
    from kvbudget.kv.body import rebuild_body

    _, cache, _ = _prefill(llama64, name, random_ids(300), block=64)
    with torch.inference_mode():  # 80 more tokens in the tail, not yet flushed
        llama64(input_ids=random_ids(80, seed=1), cache=cache, use_cache=True)
    for layer in cache.layers:
        store, body, keys, values = layer.store, layer.entries.body, layer.keys, layer.values
        n, tail = len(body), keys.shape[2]
        older = tail - layer.residual - (tail - layer.residual) % (store.chunk or 1)
        index = torch.arange(n + tail).expand(*keys.shape[:2], n + tail)
        want, want_k, want_v = rebuild_body(store, body, keys, values, index, tail - older, layer.observed.queries)
        flush_layers([layer])
        got = layer.entries.body
        assert len(got) == n + older > n
        assert torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)
        for k in want.tokens:
            assert torch.equal(got.tokens[k], want.tokens[k])
        for k in want.chunks:
            assert torch.equal(got.chunks[k], want.chunks[k])
        if want.chunk_id is None:
            assert got.chunk_id is None
        else:
            assert got.chunk_id.dtype == want.chunk_id.dtype and torch.equal(got.chunk_id, want.chunk_id)


@pytest.mark.parametrize("stack_bytes", [None, 1])  # all layers in one call / one call per layer
def test_stacked_flush_equals_layer_by_layer(llama64, monkeypatch, stack_bytes):
    """`flush_layers` encodes the layers of one shape in one call: the bodies are those of
    flushing each layer on its own, and each layer owns its tensors (no shared batch buffer)."""
    from kvbudget.kv import cache as kcache

    if stack_bytes:
        monkeypatch.setattr(kcache, "FLUSH_STACK_BYTES", stack_bytes)
    caches = []
    for _ in range(2):
        _, cache, _ = _prefill(llama64, "kivi2", random_ids(300), block=64)
        with torch.inference_mode():
            llama64(input_ids=random_ids(80, seed=1), cache=cache, use_cache=True)
        caches.append(cache)
    for layer in caches[0].layers:
        flush_layers([layer])
    flush_layers(caches[1].layers)
    ptrs = set()
    for a, b in zip(caches[0].layers, caches[1].layers):
        assert len(b.entries.body) == len(a.entries.body) and torch.equal(a.keys, b.keys)
        for k in a.entries.body.tokens:
            assert torch.equal(a.entries.body.tokens[k], b.entries.body.tokens[k])
            ptrs.add(b.entries.body.tokens[k].untyped_storage().data_ptr())
        for k in a.entries.body.chunks:
            assert torch.equal(a.entries.body.chunks[k], b.entries.body.chunks[k])
        assert torch.equal(a.entries.body.chunk_id, b.entries.body.chunk_id)
    assert len(ptrs) == 4 * 2  # 4 token fields x 2 layers, each its own storage


def _evicting_store_run(model, name: str, stack: bool, group_bytes: int | None = None, budget: int | str = 64, **kw):
    """Prefill 300 tokens in blocks of 32 with eviction to ``budget`` (a ratio resolved as a
    session does, against the 300 tokens), then decode 12 tokens with a compression every 5
    (decode-time compression); returns the cache."""
    policy = kb.policy(name, budget=budget, decode_interval=5, **kw)
    use_batched(stack)
    if group_bytes:
        limit_groups(group_bytes)
    cache = policy.new_cache(model)
    if policy.budget.ratio is not None:
        cache.tokens = policy.resolve(cache, context_tokens=300, block_size=32)
        cache.target_bytes = policy.target_bytes(cache, 300)
    logits, _ = kb.prefill(model, cache, policy, random_ids(300), block_size=32)
    with torch.inference_mode():
        for step in range(12):
            logits = model(input_ids=logits.argmax(-1, keepdim=True), cache=cache, use_cache=True).logits[:, -1]
            if (step + 1) % 5 == 0:
                kb.compress(cache, policy)
    return cache


@pytest.mark.parametrize("name", ["kivi4", "kivi2", "rotate4", "think"])
def test_rebuild_of_many_heads_equals_each_head_alone(name):
    """A rebuild encodes each head's new body entries in as many slots as the most that can move
    in (known on the host, no sync): heads that move fewer, or none, are padded, and chunks that
    only padding fills are dropped. Every head then holds what rebuilding it alone gives, which
    pads nothing: the same codes, chunk ids and live chunk rows (the table as wide as its widest
    head), the same decoded keys and values."""
    from kvbudget.kv.store import STORE_VARIANTS, STORES
    from kvbudget.kv.body import rebuild_body

    store = STORES[name](**STORE_VARIANTS.get(name, {}))
    gen = torch.Generator().manual_seed(0)
    b, h, m, d, tail = 1, 4, 160, 64, 16
    k = torch.randn(b, h, m, d, generator=gen)
    v = torch.randn(b, h, m, d, generator=gen)
    body, tk, tv = rebuild_body(store, None, k, v, torch.arange(m).expand(b, h, m), 96, None)
    nb, nt = len(body), tk.shape[2]
    # 48 body entries per head, 0 .. 44 of them from the tail: the slots (48) exceed every head's.
    moved = [0, 5, 40, 44]
    rows = []
    for head, n_new in enumerate(moved):
        old = torch.randperm(nb, generator=gen)[: 48 - n_new]
        new = nb + torch.randperm(nt - tail, generator=gen)[:n_new]
        rows.append(torch.cat([old, new]).sort().values)
    index = torch.cat([torch.stack(rows), nb + nt - tail + torch.arange(tail).expand(h, tail)], -1)[None]
    got, got_k, got_v = rebuild_body(store, body, tk, tv, index, tail, None)
    keys, values = got.decode(store, torch.float32)
    for head in range(h):
        one = slice(head, head + 1)
        alone = rebuild_body(store, _body_rows(body, one), tk[:, one], tv[:, one], index[:, one], tail, None)[0]
        want_k, want_v = alone.decode(store, torch.float32)
        assert torch.equal(keys[:, one], want_k) and torch.equal(values[:, one], want_v)
        for key, t in alone.tokens.items():
            assert torch.equal(got.tokens[key][:, one], t), key
        if alone.chunk_id is not None:
            assert torch.equal(got.chunk_id[:, one].long(), alone.chunk_id.long())
            for key, t in alone.chunks.items():
                width = t.shape[2]
                assert torch.equal(got.chunks[key][:, one, :width], t), key
    if got.chunk_id is not None:  # the table is as wide as its widest head: no padding chunk kept
        live = [len(set(got.chunk_id[0, head].tolist())) for head in range(h)]
        assert next(iter(got.chunks.values())).shape[2] == max(live)
    assert torch.equal(got_k, tk[:, :, -tail:]) and torch.equal(got_v, tv[:, :, -tail:])


def _body_rows(body, heads: slice):
    from kvbudget.kv.body import Body

    return Body({k: t[:, heads] for k, t in body.tokens.items()},
                None if body.chunk_id is None else body.chunk_id[:, heads],
                {k: c[:, heads] for k, c in body.chunks.items()})


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "loop"])
def test_store_eviction_reads_the_device_once_per_compression(tiny_llama, stack):
    """Store eviction reads nothing back while it queues its work: the tail length is known on
    the host and the new entries are encoded in a width known on the host, and the chunk
    tables' widths (with the checks) are read in one sync for all groups of stacked layers
    together, or once per layer in the loop. It was three per group."""
    from test_ragged_ops import _HostReads

    for group_bytes in ((None, 1) if stack else (None,)):  # all layers in one group / one per group
        policy = kb.policy("snapkv+kivi4", budget=64)
        use_batched(stack)
        if group_bytes:
            limit_groups(group_bytes)
        cache = policy.new_cache(tiny_llama)
        kb.prefill(tiny_llama, cache, policy, random_ids(200), block_size=32)
        with torch.inference_mode():
            tiny_llama(input_ids=random_ids(32, seed=2), cache=cache, use_cache=True)
            with _HostReads() as reads:
                kb.compress(cache, policy)
        assert reads.count == (1 if stack else len(cache.layers)), group_bytes


def test_prefill_reads_a_store_eviction_back_after_queueing_the_next_block(tiny_llama, monkeypatch):
    """In a block-wise prefill a store eviction's one host read (the chunk tables' widths) waits
    until the next block's forward is queued (`BudgetedCache.defer`): the compression itself
    reads nothing, the layers are correct meanwhile (wider tables), and every table is cut to its
    widest head by the end. The result is the loop's (which reads at once)."""
    from test_ragged_ops import _HostReads

    import kvbudget.runtime.prefill as kprefill

    counts, compress = [], kprefill.compress

    def counted(cache, policy):
        with _HostReads() as reads:
            compress(cache, policy)
        counts.append((reads.count, cache.unsettled))

    monkeypatch.setattr(kprefill, "compress", counted)
    policy = kb.policy("snapkv+kivi4", budget=64)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(200), block_size=32)
    evicting = [c for c in counts if c[1]]
    assert len(evicting) >= 4 and all(n == 0 for n, _ in evicting)
    assert not cache.unsettled
    loop = kb.policy("snapkv+kivi4", budget=64)
    use_batched(False)
    want = loop.new_cache(tiny_llama)
    kb.prefill(tiny_llama, want, loop, random_ids(200), block_size=32)
    for a, b in zip(cache.layers, want.layers):
        live = max(len(set(a.entries.body.chunk_id[0, h].tolist())) for h in range(a.entries.body.chunk_id.shape[1]))
        assert a.entries.body.chunks["k_scale"].shape[2] == live
        assert a.entries.body.chunk_id.dtype == b.entries.body.chunk_id.dtype and torch.equal(a.entries.body.chunk_id, b.entries.body.chunk_id)
        for k in b.entries.body.chunks:
            assert torch.equal(a.entries.body.chunks[k], b.entries.body.chunks[k])
        assert a.nbytes() == b.nbytes()


def test_tail_length_is_known_on_the_host_and_checked(tiny_llama):
    """After an eviction the kept entries of the residual window stay in the tail. Their count is
    ``min(residual, tail)`` on the host (the window's positions are all held: every eviction
    keeps its protected window); it equals what the positions say, through prefill and
    decode-time compressions. With transient tokens counted in ``seen`` it is read from the
    device; and a count the positions contradict makes the rebuild raise, not keep a wrong tail."""
    from kvbudget.kv.body import rebuild_body

    cache = _evicting_store_run(tiny_llama, "snapkv+kivi4", stack=True)
    for layer in cache.layers:
        n, check = layer.entries.tail_kept(layer.entries.positions, layer.seen, layer.residual, layer.phantom)
        assert n == int((layer.entries.positions >= layer.seen - layer.residual).sum(-1).min()) == layer.residual
        assert layer.keys.shape[2] > n  # tokens decoded since the last compression
        assert bool(check)
        # Without the newest entry, the window is not all there: the host count is wrong.
        index = torch.arange(layer.max_entries - 1).expand(*layer.entries.positions.shape[:2], -1)
        n, check = layer.entries.tail_kept(layer.entries.positions[..., :-1], layer.seen, layer.residual, layer.phantom)
        assert not bool(check)
        with pytest.raises(RuntimeError, match="cannot return to the full-precision tail"):
            rebuild_body(layer.store, layer.entries.body, layer.keys, layer.values, index, n, None, check)
    layer = cache.layers[0]
    with torch.inference_mode(), cache.scratch(), cache.transient():
        tiny_llama(input_ids=random_ids(3, seed=1), cache=cache, use_cache=True)
        n, check = layer.entries.tail_kept(layer.entries.positions, layer.seen, layer.residual, layer.phantom)
        assert check is None and n == int((layer.entries.positions >= layer.seen - layer.residual).sum(-1).min())


@pytest.mark.parametrize("name", ["snapkv+kivi4", "h2o+kivi2", "tova+rotate4", "streaming+kivi2"])
def test_stacked_store_compression_equals_layer_by_layer(tiny_llama, name):
    """Store layers compressed together (`kvbudget.stacked_store`) keep what the per-layer loop
    keeps: the same positions and state, codes, scales, chunk ids and tables, decoded keys and
    values and bytes, through prefill and decode-time compressions."""
    loop = _evicting_store_run(tiny_llama, name, stack=False)
    for group_bytes in (None, 1):  # all layers in one group / one layer per group
        _assert_same_store_layers(loop, _evicting_store_run(tiny_llama, name, stack=True, group_bytes=group_bytes))


@pytest.mark.parametrize("name", ["snapkv+kivi4", "tova+rotate4"])
def test_stacked_store_compression_of_a_fitted_byte_budget_equals_the_loop(tiny_llama, monkeypatch, name):
    """A ratio budget fitted to the layers' layout at each compression (`compress.bytefit`) gives
    both paths the same entries per layer: they keep the same (the layers stacked, not routed to
    the loop), and hold more entries than the ratio's worst-case resolution, within its bytes."""
    from kvbudget.compress import batched_store

    loop = _evicting_store_run(tiny_llama, name, stack=False, budget="6x")
    stacked_calls, compress = [], batched_store.compress
    monkeypatch.setattr(batched_store, "compress", lambda *a: stacked_calls.append(1) or compress(*a))
    stacked = _evicting_store_run(tiny_llama, name, stack=True, budget="6x")
    assert len(stacked_calls) > 5
    _assert_same_store_layers(loop, stacked)
    assert min(layer.max_entries for layer in loop.layers) > loop.tokens
    kb.compress(loop, kb.policy(name, budget="6x"))  # tokens decoded since the last compression
    assert loop.nbytes() <= loop.target_bytes


def _assert_same_store_layers(loop, stacked) -> None:
    for a, b in zip(loop.layers, stacked.layers):
        assert torch.equal(a.entries.positions, b.entries.positions)
        for k in a.entries.state:
            torch.testing.assert_close(a.entries.state[k], b.entries.state[k])
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert len(a.entries.body) == len(b.entries.body) > 0
        for k in a.entries.body.tokens:
            assert torch.equal(a.entries.body.tokens[k], b.entries.body.tokens[k])
        if a.entries.body.chunk_id is None:  # rotated KIVI: no per-chunk data
            assert b.entries.body.chunk_id is None
        else:
            assert a.entries.body.chunk_id.dtype == b.entries.body.chunk_id.dtype and torch.equal(a.entries.body.chunk_id, b.entries.body.chunk_id)
            # The live rows of every head's table (a head's live chunks are packed to its front;
            # rows past them, up to the widest head's, are never referenced by a chunk id).
            ids = a.entries.body.chunk_id.long()
            for k in a.entries.body.chunks:
                ta, tb = a.entries.body.chunks[k], b.entries.body.chunks[k]
                assert ta.shape == tb.shape
                live = torch.arange(ta.shape[2]) <= ids.amax(-1, keepdim=True)
                assert torch.equal(ta[live], tb[live])
        va, vb = a.view(), b.view()
        assert torch.equal(va.keys, vb.keys) and torch.equal(va.values, vb.values)
        assert a.nbytes() == b.nbytes()


def test_stacked_store_compression_is_used_and_falls_back(tiny_llama, monkeypatch):
    """SnapKV + KIVI compresses its layers together (no per-layer compression once over budget);
    per-layer budgets (PyramidKV) and MiKV's demotion go through the loop."""
    from kvbudget.compress import batched_store as stacked_store

    looped, stacked = [], []
    from kvbudget.compress import engine

    compress_layer, compress = engine._score_and_keep, stacked_store.compress
    monkeypatch.setattr(engine, "_score_and_keep", lambda *a, **k: looped.append(1) or compress_layer(*a, **k))
    monkeypatch.setattr(stacked_store, "compress", lambda policy, layers, budget: stacked.append(len(layers)) or compress(policy, layers, budget))
    _evicting_store_run(tiny_llama, "snapkv+kivi4", stack=True)
    assert looped == [] and len(stacked) > 5 and set(stacked) == {len(tiny_llama.model.layers)}
    stacked.clear()
    _evicting_store_run(tiny_llama, "snapkv+pyramid+kivi4", stack=True)
    assert looped and stacked == []


@pytest.mark.parametrize("name,kw,mode", [
    (name, kw, mode) for name, kw in (("kivi4", {}), ("kivi2", {}), ("think", {}), ("snapkv+kivi4", {"budget": 96}))
    for mode in ("eager", "static") if not (name == "think" and mode == "static")  # ThinK decodes eagerly only
])
def test_scratch_restores_a_store_cache_exactly(tiny_llama, name, kw, mode, monkeypatch):
    """Decoding inside `scratch` with decode-time compression (flushes that encode tail entries,
    evictions) and leaving it gives back exactly the cache from before: body, tail, positions,
    state, bytes. A store that only appends to its body (no eviction) is snapshotted without its
    body, which is taken back as the prefix of the body at the end."""
    from kvbudget.kv.body import BodyPrefix

    taken = []
    real = BodyPrefix.taken_from
    monkeypatch.setattr(BodyPrefix, "taken_from", lambda self, body: taken.append(1) or real(self, body))
    policy = kb.policy(name, decode_interval=4, **kw)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(200), block_size=64)
    before = [(dict(vars(layer.entries), seen=layer.seen), layer.view(), layer.nbytes()) for layer in cache.layers]
    encoded = [(len(layer.entries.body), layer.entries.positions) for layer in cache.layers]
    with torch.inference_mode(), cache.scratch():
        greedy_decode(tiny_llama, cache, policy, logits, 60, eos=set(), mode=mode)
        # The answer's compressions did encode (a longer body) or evict (other positions kept).
        assert any(len(layer.entries.body) != n or not torch.equal(layer.entries.positions[..., : pos.shape[-1]], pos)
                   for layer, (n, pos) in zip(cache.layers, encoded))
    for layer, (attrs, view, nbytes) in zip(cache.layers, before):
        assert layer.seen == attrs["seen"] and layer.nbytes() == nbytes
        assert torch.equal(layer.entries.positions, attrs["positions"])
        now = layer.view()
        assert torch.equal(now.keys, view.keys) and torch.equal(now.values, view.values)
        assert torch.equal(layer.keys, attrs["keys"]) and torch.equal(layer.values, attrs["values"])
        for k, t in attrs["body"].tokens.items():
            assert torch.equal(layer.entries.body.tokens[k], t)
        if attrs["body"].chunk_id is not None:
            assert torch.equal(layer.entries.body.chunk_id, attrs["body"].chunk_id)
            assert layer.entries.body.chunk_id.dtype == attrs["body"].chunk_id.dtype
        for k, c in attrs["body"].chunks.items():
            assert torch.equal(layer.entries.body.chunks[k], c)
    # Without eviction the snapshot kept only each body's length; with it, the body itself.
    assert len(taken) == (0 if policy.evicts else len(cache.layers))


def test_stacked_store_compression_with_a_scorer_that_reads_values(tiny_llama, monkeypatch):
    """A scorer that reads values gets the bodies' decoded values too; the result is the loop's."""
    from kvbudget.methods.scorers.snapkv import SnapKV

    seen = []
    real = SnapKV.score
    monkeypatch.setattr(SnapKV, "reads_values", True)
    monkeypatch.setattr(SnapKV, "score", lambda self, obs: seen.append(obs.values is not None) or real(self, obs))
    loop = _evicting_store_run(tiny_llama, "snapkv+kivi4", stack=False)
    stacked = _evicting_store_run(tiny_llama, "snapkv+kivi4", stack=True)
    assert seen and all(seen)
    for a, b in zip(loop.layers, stacked.layers):
        assert torch.equal(a.entries.positions, b.entries.positions) and a.nbytes() == b.nbytes()
        assert torch.equal(a.view().keys, b.view().keys)


def test_flush_counts_are_known_on_the_host_while_nothing_was_evicted(tiny_llama):
    """A store layer that holds every token it has seen has positions 0 .. seen-1 in order, so
    how many tail entries a flush may encode is known without reading positions from the device
    (no host sync in a KIVI prefill's flushes); after eviction, or with transient tokens counted
    in ``seen`` but not held, it is read from the device. Both give what the positions say."""
    def from_positions(layer) -> int:
        tail = layer.keys.shape[-2]
        return int((layer.entries.positions[..., -tail:] < layer.seen - layer.residual).sum(-1).min())

    for name, kw, on_host in (("kivi4", {}, True), ("snapkv+kivi4", {"budget": 64}, False)):
        policy = kb.policy(name, **kw)
        cache = policy.new_cache(tiny_llama)
        kb.prefill(tiny_llama, cache, policy, random_ids(300), block_size=64, compress_last=False)
        for layer in cache.layers:
            count = layer.older_in_tail()
            assert isinstance(count, int) == on_host, name
            assert int(count) == from_positions(layer) > 0, name
        if name == "kivi4":  # tokens attended but not stored count in `seen`: read from the device
            with torch.inference_mode(), cache.scratch(), cache.transient():
                tiny_llama(input_ids=random_ids(5, seed=1), cache=cache, use_cache=True)
                layer = cache.layers[0]
                assert not isinstance(layer.older_in_tail(), int)
                assert int(layer.older_in_tail()) == from_positions(layer)
