"""A ratio budget is a byte ratio: ``4x`` holds at most a quarter of the full cache's bytes,
whatever the store; a low-bit store keeps correspondingly more entries."""

import pytest

import kvbudget as kb
from kvbudget.errors import BudgetError
from kvbudget.runtime.prefill import prefill

from conftest import random_ids

POLICIES = ["snapkv", "snapkv+kivi4", "snapkv+kivi2", "kvzip+kivi4", "pyramidkv+kivi4", "mikv"]


def _held(model, name: str, budget: str | None, ids) -> tuple[int, int]:
    policy = kb.policy(name, budget=budget)
    cache = policy.new_cache(model)
    cache.tokens = policy.resolve(cache, context_tokens=ids.shape[1], block_size=64) if budget else None
    cache.target_bytes = policy.target_bytes(cache, ids.shape[1]) if budget else None
    prefill(model, cache, policy, ids, block_size=64)
    return cache.nbytes(), cache.tokens


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gemma"])
def test_ratio_budgets_hold_at_most_full_bytes_over_ratio(model_name, request):
    model = request.getfixturevalue(model_name)
    ids = random_ids(600, seed=3)
    full, _ = _held(model, "full", None, ids)
    for ratio in (4, 8):
        kept = {}
        for name in POLICIES:
            if name == "mikv" and ratio > 4:
                continue  # 2-bit entries of 16-channel heads reach about 5x at most (below)
            held, kept[name] = _held(model, name, f"{ratio}x", ids)
            assert held <= full / ratio, (name, ratio, full / held)
            assert held >= full / ratio / 4, (name, ratio, full / held)  # the store's room is used, not wasted
        if ratio == 4:  # at equal bytes a 4-bit store keeps more entries, a 2-bit one more still
            assert kept["snapkv"] < kept["snapkv+kivi4"] <= kept["snapkv+kivi2"], kept


def test_ratio_a_store_cannot_reach_is_a_clear_error(tiny_llama):
    ids = random_ids(300, seed=1)
    with pytest.raises(BudgetError, match="mikv.*16x fewer bytes"):
        _held(tiny_llama, "mikv", "16x", ids)


def test_ratio_budgets_are_bytes_on_the_default_model(default_model):
    model, tok = default_model
    text = " ".join(f"Note {i}: the courier left parcel {i * 37 % 101} at dock {i % 9}." for i in range(12))
    held = {}
    for name in ("snapkv", "snapkv+kivi4"):
        session = kb.Session(model, tok, kb.policy(name, budget="4x"), block_size=128)
        stats = session.add_context(text)
        full = session.policy.full_bytes(session.cache, stats.tokens)  # what the full cache holds (test_cache)
        held[name] = (session.kv_bytes, session.tokens)
        assert full / 4 / 1.5 <= session.kv_bytes <= full / 4, (name, full / session.kv_bytes)
    assert held["snapkv+kivi4"][1] > 2 * held["snapkv"][1]  # 4-bit entries: more than twice the tokens


def test_store_ratio_budgets_fill_their_bytes_on_the_default_model(default_model, monkeypatch):
    """With a store, a ratio budget is fitted at each compression to the cache's own chunk layout
    (`compress.bytefit`): the bytes held never exceed the ratio's, after any compression, and
    reach at least 90% of them once the context does not fit whole."""
    import kvbudget.runtime.prefill as prefill_module

    model, tok = default_model
    text = " ".join(f"Note {i}: the courier left parcel {i * 37 % 101} at dock {i % 9}." for i in range(26))
    compress, held = prefill_module.compress, []

    def counted(cache, policy):
        compress(cache, policy)
        held.append(cache.nbytes())

    monkeypatch.setattr(prefill_module, "compress", counted)
    for name in ("kvzip+kivi4", "snapkv+kivi4", "snapkv+kivi2"):
        for ratio in (4, 8, 16):
            held.clear()
            session = kb.Session(model, tok, kb.policy(name, budget=f"{ratio}x"), block_size=128)
            stats = session.add_context(text)
            goal = session.policy.full_bytes(session.cache, stats.tokens) / ratio
            assert held and max(held) <= goal, (name, ratio, max(held) / goal)
            if session.cache.layers[0].max_entries < stats.tokens:  # the context did not fit whole
                assert session.kv_bytes >= 0.9 * goal, (name, ratio, session.kv_bytes / goal)


def test_byte_budgets_with_a_store_hold_at_most_their_bytes(tiny_llama, monkeypatch):
    """A byte budget resolves to tokens by the average entry's bytes; with a store the engine
    fits it to the layers' layout at each compression, so the cache never holds more bytes
    than asked (scattered survivors keep whole chunks of scales alive) and holds close to them."""
    import kvbudget.runtime.prefill as prefill_module

    compress, held = prefill_module.compress, []
    monkeypatch.setattr(prefill_module, "compress", lambda cache, policy: compress(cache, policy) or
                        held.append(cache.nbytes()))
    for name in ("snapkv+kivi4", "snapkv+kivi2", "h2o+kivi4"):
        for nbytes in (30_000, 100_000):
            held.clear()
            policy = kb.policy(name, budget=f"{nbytes}B")
            cache = policy.new_cache(tiny_llama)
            prefill(tiny_llama, cache, policy, random_ids(600, seed=3), block_size=64)
            assert held and max(held) <= nbytes, (name, nbytes, max(held))
            assert cache.nbytes() >= 0.9 * nbytes, (name, nbytes, cache.nbytes())
