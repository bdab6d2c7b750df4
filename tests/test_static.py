"""Static-capacity decoding (kvbudget.static): the same tokens, cache and bytes as eager decoding.

CI has no GPU, so these run the static path without the CUDA graph (``decode="static"``): the
buffers, the in-place writes at ``starts + lens``, the length-masked attention, write-back and
reload are the code the graph captures. The graph itself is checked on the GPU by
tests/gpu/test_graph_decode.py."""

import pytest
import torch

import kvbudget as kb
from kvbudget.kernels import reference_varlen_decode_attention
from kvbudget.runtime.answer import greedy_decode
from kvbudget.runtime.decoder import StaticDecoder, supports
from kvbudget.runtime.static import UnsupportedStatic

from conftest import random_ids


def _decode(model, policy_name: str, mode: str, n_new: int = 24, interval: int = 8, context: int = 90, **kw):
    """Prefill ``context`` random tokens, decode ``n_new`` greedily with ``mode``; returns the
    tokens, the cache and the policy."""
    policy = kb.policy(policy_name, decode_interval=interval, **kw)
    cache = policy.new_cache(model)
    logits, _ = kb.prefill(model, cache, policy, random_ids(context), block_size=32)
    with torch.inference_mode():
        ids = greedy_decode(model, cache, policy, logits, n_new, eos=set(), mode=mode)
    return ids, cache, policy


def _same_cache(a, b) -> None:
    for la, lb in zip(a.layers, b.layers):
        assert la.seen == lb.seen
        va, vb = la.view(), lb.view()
        assert torch.equal(va.positions, vb.positions)
        torch.testing.assert_close(va.keys, vb.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va.values, vb.values, rtol=1e-5, atol=1e-5)
        for name in va.state:
            torch.testing.assert_close(va.state[name], vb.state[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("full", {}),
        ("snapkv", {"budget": 40}),  # window queries kept across write-backs
        ("h2o", {"budget": 40}),  # every decoded query + accumulated per-entry state
        ("adakv", {"budget": 40}),  # ragged per-head lengths, laid out again at each reload
        ("streaming", {"budget": 40}),
    ],
)
def test_static_decode_equals_eager(tiny_llama, name, kw):
    eager_ids, eager_cache, _ = _decode(tiny_llama, name, "eager", **kw)
    static_ids, static_cache, _ = _decode(tiny_llama, name, "static", **kw)
    assert static_ids == eager_ids
    assert len(static_ids) == 24
    _same_cache(eager_cache, static_cache)
    assert static_cache.peak_bytes == eager_cache.peak_bytes
    if "budget" in kw:  # decode-time compression happened inside the static run
        assert static_cache.layers[0].max_entries <= 40 + 8 + 32


@pytest.mark.parametrize(
    "name,kw,context",
    [
        ("kivi4", {}, 150),  # no body at first: the first flush during decoding creates it
        ("kivi2", {}, 300),  # a body from the prefill, grown by the flushes
        ("snapkv+kivi4", {"budget": 64}, 300),  # eviction rebuilds the body at each compression
        ("h2o+kivi2", {"budget": 64}, 200),  # + every decoded query and accumulated state
    ],
)
def test_static_store_decode_equals_eager(tiny_llama, name, kw, context):
    """KIVI layers: the encoded body in static buffers, the tail appended in place; the tokens,
    the cache (body decoded, positions, state) and the peak bytes are those of eager decoding."""
    from kvbudget.runtime import static_store

    built = []
    real = static_store.StaticStoreLayer.build.__func__

    def spy(cls, layer, capacity):
        built.append(real(cls, layer, capacity))
        return built[-1]

    eager_ids, eager_cache, _ = _decode(tiny_llama, name, "eager", n_new=40, context=context, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(static_store.StaticStoreLayer, "build", classmethod(spy))
        static_ids, static_cache, _ = _decode(tiny_llama, name, "static", n_new=40, context=context, **kw)
    assert len(built) == 3  # every layer decoded from static buffers
    assert static_ids == eager_ids and len(static_ids) == 40
    _same_cache(eager_cache, static_cache)
    for a, b in zip(eager_cache.layers, static_cache.layers):
        assert len(a.entries.body) == len(b.entries.body) > 0 and a.keys.shape == b.keys.shape
        assert a.entries.body.nbytes() == b.entries.body.nbytes()
    assert static_cache.peak_bytes == eager_cache.peak_bytes


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_static_store_flushes_in_place_and_copies_a_body_only_when_it_changed(tiny_llama):
    """While the decoder lends its buffers, a flush writes the newly encoded chunk into them after
    the body (no second body is built: with every layer flushed before the reload, those copies
    were a whole second cache at once), and reload copies no body. A compression that encodes
    nothing copies nothing either."""
    policy = kb.policy("kivi4", decode_interval=4)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(200), block_size=64)
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=64, graph=False)
    layer, static = cache.layers[0], dec.layers[0]
    assert int(static.body_lens[0, 0]) == len(layer.entries.body) == 64 and int(static.tail_lens[0, 0]) == 136
    buffers = {_storage(t) for t in (*static.body.tokens.values(), static.body.chunk_id, *static.body.chunks.values())}
    written: list[int] = []  # bytes copied into the body buffers
    real_copy = torch.Tensor.copy_

    def spy(t, src, *a, **k):
        if _storage(t) in buffers:
            written.append(t.nbytes)
        return real_copy(t, src, *a, **k)

    tok = logits.argmax(-1)
    grown = []
    for step in range(40):
        tok = dec.step(tok).argmax(-1)
        if (step + 1) % 4 == 0:
            dec.write_back(cache)
            before = len(layer.entries.body)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.Tensor, "copy_", spy)
                kb.compress(cache, policy)
                flushed = sum(written)
                written.clear()
                dec.reload(cache)
            assert not written  # reload: the body is already in place
            grew = len(layer.entries.body) - before
            grown.append(grew)
            if grew:  # exactly the new chunk's codes, scales and chunk ids went into the buffers
                body = layer.entries.body
                per_entry = (sum(t.nbytes for t in body.tokens.values()) + body.chunk_id.nbytes) // len(body)
                per_chunk = sum(c.nbytes for c in body.chunks.values()) // next(iter(body.chunks.values())).shape[2]
                assert flushed == per_entry * grew + per_chunk * (grew // policy.store.chunk)
            else:
                assert flushed == 0
            # The layer holds views of the decoder's buffers, not a second copy.
            for name, t in layer.entries.body.tokens.items():
                assert t.data_ptr() == static.body.tokens[name].data_ptr()
            assert layer.entries.body.chunk_id.data_ptr() == static.body.chunk_id.data_ptr()
            assert layer.keys.data_ptr() == static.keys.data_ptr()
            assert int(static.body_lens[0, 0]) == len(layer.entries.body)
            assert int(static.tail_lens[0, 0]) == layer.keys.shape[2]
    assert len(layer.entries.body) == 64 + 32  # one chunk encoded after 32 decoded tokens
    assert grown.count(32) == 1 and grown.count(0) == 9


def test_static_store_copies_an_evicted_body(tiny_llama):
    """Eviction builds a new body (entries leave it): reload copies it into the buffers, and the
    layer holds views of them again."""
    policy = kb.policy("snapkv+kivi4", budget=64, decode_interval=8)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(300), block_size=64)
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=16, graph=False)
    layer, static = cache.layers[0], dec.layers[0]
    tok = logits.argmax(-1)
    for _ in range(8):
        tok = dec.step(tok).argmax(-1)
    dec.write_back(cache)
    kb.compress(cache, policy)
    assert _storage(layer.entries.body.tokens["k"]) != _storage(static.body.tokens["k"])  # rebuilt, owned
    dec.reload(cache)
    assert layer.entries.body.tokens["k"].data_ptr() == static.body.tokens["k"].data_ptr()
    assert int(static.body_lens[0, 0]) == len(layer.entries.body)


@pytest.mark.parametrize("name", ["snapkv", "streaming"])
def test_static_eviction_keeps_entries_in_the_lent_buffers(tiny_llama, name):
    """A decode-time eviction while the decoder lends its dense buffers writes the kept entries
    into them (no second copy of the kept cache until the reload), and the reload copies
    nothing; the tokens equal eager decoding (`test_static_decode_equals_eager`)."""
    policy = kb.policy(name, budget=40, decode_interval=4)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(200), block_size=64)
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=16, graph=False)
    tok = logits.argmax(-1)
    for _ in range(3):
        for _ in range(4):
            tok = dec.step(tok).argmax(-1)
        dec.write_back(cache)
        kb.compress(cache, policy)
        for layer, static in zip(cache.layers, dec.layers):
            assert layer.keys.shape[2] == 40
            assert layer.keys.data_ptr() == static.keys.data_ptr() and layer.values.data_ptr() == static.values.data_ptr()
        copies = []
        real = torch.Tensor.index_copy_
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "index_copy_", lambda t, *a, **k: copies.append(1) or real(t, *a, **k))
            dec.reload(cache)
        assert not copies
        assert all(int(static.lens.min()) == int(static.lens.max()) == 40 for static in dec.layers)


@pytest.mark.parametrize("name,kw", [("snapkv", {"budget": 40}), ("kivi4", {})])
def test_static_decoder_lends_its_buffers_then_gives_copies_back(tiny_llama, name, kw):
    """While decoding, the cache's layers hold views of the decoder's buffers (the entries are
    not held twice); `release` hands them copies that own their memory and retires the decoder."""
    policy = kb.policy(name, decode_interval=4, **kw)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(200), block_size=64)
    before = [layer.view() for layer in cache.layers]
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=8, graph=False)

    def lent(layer, static) -> bool:
        shared = layer.keys.untyped_storage().data_ptr() == static.keys.untyped_storage().data_ptr()
        if getattr(layer.entries, "body", None) is not None:
            shared = shared and layer.entries.body.tokens["k"].untyped_storage().data_ptr() == (
                static.body.tokens["k"].untyped_storage().data_ptr())
        return shared and layer.borrowed

    for layer, static, view in zip(cache.layers, dec.layers, before):
        assert lent(layer, static)
        torch.testing.assert_close(layer.view().keys, view.keys, rtol=0, atol=0)
    tok = logits.argmax(-1)
    for _ in range(3):
        tok = dec.step(tok).argmax(-1)
    dec.write_back(cache)
    assert all(lent(layer, static) for layer, static in zip(cache.layers, dec.layers))
    held = [layer.view() for layer in cache.layers]
    dec.release(cache)
    for layer, view in zip(cache.layers, held):
        assert not layer.borrowed
        tensors = [layer.keys, layer.values] + (list(layer.entries.body.tokens.values()) if getattr(layer.entries, "body", None) is not None else [])
        assert all(t.untyped_storage().nbytes() == t.nbytes for t in tensors)  # owns exactly itself
        torch.testing.assert_close(layer.view().keys, view.keys, rtol=0, atol=0)
        assert layer.seen == 203
    with pytest.raises(RuntimeError, match="released"):
        dec.step(tok)


@pytest.mark.parametrize("name", ["full", "h2o", "streaming"])
def test_padded_sdpa_backend_equals_eager(tiny_llama, monkeypatch, name):
    """The padded-SDPA backend (dense layers) reads every slot up to the capacity, masked: the
    unused slots must hold finite values (a NaN there poisons the masked softmax)."""
    from kvbudget.runtime import static as kstatic

    monkeypatch.setattr(kstatic, "ATTENTION", "sdpa")
    kw = {} if name == "full" else {"budget": 40}
    for context in (90, 200):
        eager_ids, _, _ = _decode(tiny_llama, name, "eager", context=context, **kw)
        static_ids, _, _ = _decode(tiny_llama, name, "static", context=context, **kw)
        assert static_ids == eager_ids
    policy = kb.policy("full")
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(50), block_size=32)
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=8, graph=False)
    assert all(torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all() for layer in dec.layers)


def test_ragged_layout_has_no_padding(tiny_llama):
    """Ada-KV heads keep different counts; the static buffer holds their sum (+ decode room),
    not heads x longest head."""
    policy = kb.policy("adakv", budget=40)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(120), block_size=32)
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=4, graph=False)
    for static, layer in zip(dec.layers, cache.layers):
        lens = layer.lengths()
        assert static.keys.shape[0] == int(lens.sum()) + lens.numel() * 4
        assert torch.equal(static.lens.long().cpu(), lens)


def test_reference_varlen_with_a_length_bound_matches_attention():
    torch.manual_seed(1)
    b, h, g, d = 2, 3, 2, 16
    lens = torch.tensor([5, 0, 9, 1, 7, 3])
    starts = torch.cumsum(lens + 2, 0) - (lens + 2)
    keys, values = torch.randn(int((lens + 2).sum()), d), torch.randn(int((lens + 2).sum()), d)
    q = torch.randn(b, h * g, d)
    out = reference_varlen_decode_attention(q, keys, values, starts, lens, 0.25, max_len=11)  # no host sync
    for i in range(b * h):
        k = keys[starts[i] : starts[i] + lens[i]].double()
        v = values[starts[i] : starts[i] + lens[i]].double()
        for j in range(g):
            qi = q.view(b * h, g, d)[i, j].double()
            ref = torch.zeros(d, dtype=torch.double) if lens[i] == 0 else (qi @ k.T * 0.25).softmax(-1) @ v
            torch.testing.assert_close(out.view(b * h, g, d)[i, j].double(), ref, rtol=1e-5, atol=1e-6)


def test_unsupported_caches_say_why(tiny_llama):
    policy = kb.policy("mikv", budget=64)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(300), block_size=64)
    assert "plain KIVI" in supports(cache)


def test_unknown_attention_backend_is_a_clear_error(tiny_llama, monkeypatch):
    from kvbudget.runtime import static as kstatic

    policy = kb.policy("snapkv", budget=40)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(60), block_size=32)
    monkeypatch.setattr(kstatic, "ATTENTION", "flash")
    with pytest.raises(ValueError, match="KVBUDGET_DECODE_ATTENTION must be one of"):
        StaticDecoder.from_cache(tiny_llama, cache, capacity=2, graph=False)


def test_capacity_is_enforced(tiny_llama):
    policy = kb.policy("snapkv", budget=40)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(60), block_size=32)
    dec = StaticDecoder.from_cache(tiny_llama, cache, capacity=2, graph=False)
    tok = logits.argmax(-1)
    dec.step(tok)
    dec.step(tok)
    with pytest.raises(RuntimeError, match="full"):
        dec.step(tok)


def test_session_decode_modes(default_model):
    """On the real model: the session's answer is the same with static buffers as eagerly, and
    a bad mode or the graph on CPU is a clear error."""
    model, tok = default_model
    doc = "The secret code of the blue door is 4711. " * 3 + "The weather is mild."
    answers, sessions = [], []
    for mode in ("eager", "static"):
        s = kb.Session(model, tok, kb.policy("h2o", budget=48, decode_interval=8), decode=mode, block_size=32)
        s.add_context(doc)
        # Decode-time compression inside the answer's scratch block: the cache is snapshotted at
        # the first one and restored after the answer (while the static decoder lent it views).
        answers.append(s.ask_detailed("What is the secret code of the blue door?", max_new_tokens=20))
        answers.append(s.ask_detailed("And the weather?", max_new_tokens=12))
        sessions.append(s)
    assert answers[0].token_ids == answers[2].token_ids and answers[1].token_ids == answers[3].token_ids
    assert answers[0].peak_bytes == answers[2].peak_bytes
    _same_cache(sessions[0].cache, sessions[1].cache)
    with pytest.raises(kb.KVBudgetError, match="unknown decode mode"):
        kb.Session(model, tok, kb.policy("full"), decode="fast")
    s = kb.Session(model, tok, kb.policy("full"), decode="graph")
    s.add_context(doc)
    with pytest.raises(kb.KVBudgetError, match="CUDA"):
        s.ask("What is the code?", max_new_tokens=4)


def test_session_static_kivi_on_the_real_model(default_model):
    """The real model with a KIVI-4 body (context longer than the 128-token residual): static
    decoding gives the eager answer and peak bytes."""
    model, tok = default_model
    doc = " ".join(f"Room {i} has a {c} door." for i, c in enumerate(["red", "blue", "green", "white"] * 12))
    answers = []
    for mode in ("eager", "static"):
        s = kb.Session(model, tok, kb.policy("kivi4", decode_interval=8), decode=mode)
        s.add_context(doc)
        assert s.cache.layers[0].entries.body is not None
        answers.append(s.ask_detailed("What color is the door of room 5?", max_new_tokens=16))
    assert answers[0].token_ids == answers[1].token_ids
    assert answers[0].peak_bytes == answers[1].peak_bytes
