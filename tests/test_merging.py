"""Merging policies (``+merge``: merge-on-evict, ``+cam``: CaM) and budgets that are a fraction of
the tokens seen (``0.25seen``): the merge rules on hand-made entries, the engine folding exactly
what it evicts, bytes held, sessions on the real default model, and the decode-time fraction in
a decode loop, a Session and the batching engine."""

import pytest
import torch

from conftest import random_ids, use_batched

import kvbudget as kb
from kvbudget.compress import Observation, batched
from kvbudget.compress.budget import Budget, parse_budget
from kvbudget.compress.merger import MERGERS
from kvbudget.errors import KVBudgetError
from kvbudget.runtime.answer import greedy_decode


def _obs(keys, values, state=None, queries=None):
    b, h, n, d = keys.shape
    return Observation(layer_idx=0, n_layers=1, keys=keys, values=values, positions=torch.arange(n).expand(b, h, n),
                       valid=None, queries=queries, query_positions=None, scaling=d**-0.5, budget=2, seen=n, seed=0,
                       state=state or {})


def _mask(*bits):
    return torch.tensor(bits, dtype=torch.bool)[None, None]


# --- the rules on hand-made entries ---------------------------------------------------------------


def test_merge_on_evict_averages_into_the_most_similar_kept_entry_by_size():
    """Entry 1 is closest to kept entry 0 (which already absorbed 2: size 3), entry 3 (itself a
    merge of 2: size 2) to kept entry 2; entry 4 points away from both kept keys (cosine < 0) and
    is dropped. Kept keys and values become size-weighted means; counts add up."""
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.3, 1.0], [-1.0, -1.0]])[None, None]
    values = torch.tensor([[1.0, 2.0], [5.0, -2.0], [3.0, 3.0], [-1.0, 7.0], [9.0, 9.0]])[None, None]
    merged = torch.tensor([[[2.0, 0.0, 0.0, 1.0, 0.0]]])
    kept, evicted = _mask(1, 0, 1, 0, 0), _mask(0, 1, 0, 1, 1)
    obs = _obs(keys, values, {"merged": merged.clone()})
    new_keys, new_values = MERGERS["merge"]().merge(obs, kept, evicted)
    k, v = keys[0, 0], values[0, 0]
    torch.testing.assert_close(new_keys[0, 0, 0], (3 * k[0] + k[1]) / 4)
    torch.testing.assert_close(new_values[0, 0, 0], (3 * v[0] + v[1]) / 4)
    torch.testing.assert_close(new_keys[0, 0, 2], (k[2] + 2 * k[3]) / 3)
    torch.testing.assert_close(new_values[0, 0, 2], (v[2] + 2 * v[3]) / 3)
    assert obs.state["merged"][0, 0, 0] == 3 and obs.state["merged"][0, 0, 2] == 2  # absorbed: 2 + 1, 0 + 2
    assert torch.equal(keys, obs.keys) and torch.equal(values, obs.values)  # inputs untouched (a layer's storage)


def test_merge_on_evict_leaves_entries_nothing_merged_into_bit_for_bit():
    keys = torch.randn(1, 2, 6, 4, dtype=torch.bfloat16)
    values = torch.randn(1, 2, 6, 4, dtype=torch.bfloat16)
    kept = _mask(1, 1, 1, 1, 1, 1).expand(1, 2, 6)
    new_keys, new_values = MERGERS["merge"]().merge(_obs(keys, values), kept, ~kept)
    assert torch.equal(new_keys, keys) and torch.equal(new_values, values) and new_keys.dtype == torch.bfloat16


def test_cam_adds_each_evicted_value_to_the_next_kept_ones_by_relative_attention():
    """span 2: evicted 0 goes to kept 1 and 3 with p = A0 / mean(A1, A3) (below 1); evicted 2 to
    kept 3 and 4 with p clamped to 1; evicted 5 has no kept entry after it and is dropped. Keys
    are unchanged."""
    n, d = 6, 3
    keys, values = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    attention = torch.tensor([[[0.1, 0.4, 0.9, 0.2, 0.3, 0.5]]])
    obs = _obs(keys, values, queries=torch.zeros(1, 1, 1, d))
    obs.attention_sum = lambda: attention  # the attention the observed queries give each entry
    kept, evicted = _mask(0, 1, 0, 1, 1, 0), _mask(1, 0, 1, 0, 0, 1)
    new_keys, new_values = MERGERS["cam"](span=2).merge(obs, kept, evicted)
    v = values[0, 0]
    p0 = 0.1 / ((0.4 + 0.2) / 2)
    want = v.clone()
    want[1] += p0 * v[0] / 2
    want[3] += p0 * v[0] / 2 + v[2] / 2
    want[4] += v[2] / 2
    assert torch.equal(new_keys, keys)
    torch.testing.assert_close(new_values[0, 0, [1, 3, 4]], want[[1, 3, 4]])


# --- the engine: what it evicts is what it merges -----------------------------------------------


def _full_keys(model, ids):
    cache = kb.policy("full").new_cache(model)
    kb.prefill(model, cache, kb.policy("full"), ids, block_size=ids.shape[1])
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def test_engine_merges_every_evicted_entry_into_its_most_similar_kept_one(tiny_llama):
    """One compression (StreamingLLM picks by position only): every kept entry equals, from the
    full cache, the mean of itself and the evicted entries whose best cosine it is (those at
    cosine >= 0), and the counts say how many it absorbed."""
    ids = random_ids(40)
    full = _full_keys(tiny_llama, ids)
    policy = kb.policy("streaming+merge", budget=24)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, ids, block_size=40)
    absorbed = 0
    for layer, (keys, values) in zip(cache.layers, full):
        kept = layer.entries.positions[0]  # [H, 24]
        for h in range(keys.shape[1]):
            k, v = keys[0, h], values[0, h]
            out = [p for p in range(40) if p not in set(kept[h].tolist())]
            unit = torch.nn.functional.normalize(k, dim=-1)
            sums_k, sums_v, count = k[kept[h]].clone(), v[kept[h]].clone(), torch.ones(24)
            for p in out:
                sim = unit[kept[h]] @ unit[p]
                if sim.max() >= 0:
                    t = int(sim.argmax())
                    sums_k[t] += k[p]
                    sums_v[t] += v[p]
                    count[t] += 1
            torch.testing.assert_close(layer.keys[0, h], sums_k / count[:, None])
            torch.testing.assert_close(layer.values[0, h], sums_v / count[:, None])
            assert torch.equal(layer.entries.state["merged"][0, h], count - 1)
            absorbed += int(count.sum() - 24)
    assert absorbed > 0


@pytest.mark.parametrize("name", ["snapkv+merge", "adakv+cam", "h2o+merge", "snapkv+pyramid+cam", "knorm+cam"])
def test_merging_holds_the_budget_and_bytes(tiny_llama, name):
    budget, block = 24, 16
    policy = kb.policy(name, budget=budget)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(150), block)
    budgets = policy.layer_budgets(cache.tokens, len(cache.layers))
    for layer, b in zip(cache.layers, budgets):
        if policy.head_adaptive:  # heads share the layer's budget
            assert int(layer.lengths().sum()) <= b * layer.n_heads
        else:
            assert layer.max_entries <= b and layer.peak_entries <= max(b, budget) + block
    assert cache.nbytes() <= policy.held_bytes(cache, budget, 150) + 8 * 2 * len(cache.layers)  # + ragged tables
    plain = kb.policy(name.rsplit("+", 1)[0], budget=budget)
    plain_cache = plain.new_cache(tiny_llama)
    kb.prefill(tiny_llama, plain_cache, plain, random_ids(150), block)
    # The count is per-entry state: 4 bytes per entry and head, nothing else is added.
    extra = 4 * sum(int(layer.lengths().sum()) for layer in cache.layers) if "+merge" in name else 0
    assert cache.nbytes() - extra <= plain_cache.nbytes() + 8 * 2 * len(cache.layers)


def test_merge_state_is_counted_in_ratio_budgets(tiny_llama):
    cache = kb.policy("snapkv", budget=64).new_cache(tiny_llama)
    plain, merged = kb.policy("snapkv", budget="4x"), kb.policy("snapkv+merge", budget="4x")
    assert merged.held_bytes(cache, 100, 400) == plain.held_bytes(cache, 100, 400) + 4 * 100 * 2 * 3
    assert merged.resolve(cache, 400) < plain.resolve(cache, 400)


@pytest.mark.parametrize("name", ["snapkv+merge", "adakv+cam"])
def test_batched_engine_routes_merging_to_the_reference_path(tiny_llama, monkeypatch, name):
    """The batched engine does not merge: it declines merging policies (the reference path runs),
    so both settings keep the same entries."""
    calls = []
    real = batched.compress
    monkeypatch.setattr(batched, "compress", lambda *a: calls.append(real(*a)) or calls[-1])
    caches = []
    for stacked in (True, False):
        use_batched(stacked)
        policy = kb.policy(name, budget=24)
        cache = policy.new_cache(tiny_llama)
        kb.prefill(tiny_llama, cache, policy, random_ids(100), block_size=16)
        caches.append(cache)
    assert calls and not any(calls)
    for a, b in zip(caches[0].layers, caches[1].layers):
        a, b = a.view(), b.view()
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_merging_is_named_composed_and_refused_where_it_cannot_work():
    assert kb.policy("snapkv+pyramid+merge", budget=64).name == "snapkv+pyramid+merge"
    assert kb.policy("adakv+cam", budget=64).merger.queries == 32
    assert kb.policy("knorm+cam", budget=64, window=16, span=8).merger.span == 8
    with pytest.raises(KVBudgetError, match="evicts none"):
        kb.policy("full+merge")
    with pytest.raises(KVBudgetError, match="full precision"):
        kb.policy("snapkv+kivi4+merge", budget=64)
    with pytest.raises(KVBudgetError, match="two mergers"):
        kb.policy("snapkv+merge+cam", budget=64)


# --- sessions on the real default model --------------------------------------------------------

CONTEXT = ("The blue door code is 4821. Mira keeps her bicycle in the green shed behind the bakery. "
           "On Tuesdays the market sells pears, and the ferry leaves at noon from the north pier. ") * 3


@pytest.mark.parametrize("name", ["snapkv+merge", "snapkv+cam"])
def test_merging_session_holds_its_budget_answers_and_round_trips(default_model, tmp_path, name):
    model, tok = default_model
    session = kb.Session(model, tok, kb.policy(name, budget=48), block_size=32)
    session.add_context(CONTEXT)
    cache = session.cache
    assert all(layer.max_entries <= 48 for layer in cache.layers)
    assert cache.nbytes() < cache.get_seq_length() * len(cache.layers) * kb.Policy.entry_bytes(cache) / 2
    if name.endswith("+merge"):  # evicted entries were merged, and the counts are held
        assert all(float(layer.entries.state["merged"].sum()) > 0 for layer in cache.layers)
    path = tmp_path / "s.kvb"
    session.save(path)
    loaded = kb.Session.load(path, model, tok)
    assert loaded.policy.name == name
    for a, b in zip(cache.layers, loaded.cache.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.entries.state.keys() == b.entries.state.keys()
        assert all(torch.equal(a.entries.state[k], b.entries.state[k]) for k in a.entries.state)
    assert loaded.ask("What is the blue door code?", max_new_tokens=4)


# --- a budget that is a fraction of the tokens seen ----------------------------------------------


def test_seen_budgets_parse_and_refuse_bad_fractions():
    assert parse_budget("0.25seen") == Budget(seen=0.25) and str(parse_budget(".5 seen")) == "0.5seen"
    for bad in ("0seen", "1.5seen", "seen"):
        with pytest.raises(KVBudgetError):
            parse_budget(bad)


def test_decode_keeps_a_fraction_of_every_token_seen(tiny_llama):
    """Prefill 100 tokens at 0.25seen: 25 entries; 16 decoded tokens compressed every 8: at the
    last compression 116 tokens were seen, so 29 entries remain."""
    policy = kb.policy("snapkv", budget="0.25seen", decode_interval=8)
    cache = policy.new_cache(tiny_llama)
    logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(100), block_size=32)
    assert [layer.max_entries for layer in cache.layers] == [25] * 3
    with torch.inference_mode():
        greedy_decode(tiny_llama, cache, policy, logits, max_new_tokens=17, eos=set())
    assert cache.get_seq_length() == 116 and [layer.max_entries for layer in cache.layers] == [29] * 3


def test_seen_fraction_is_of_bytes_like_a_ratio(tiny_llama):
    """With a 4-bit store a fraction keeps more entries than at full precision, in the bytes of
    that fraction of the full cache (as ``4x``)."""
    policy = kb.policy("snapkv+kivi4", budget="0.25seen")
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(160), block_size=32)
    assert cache.tokens > 40
    assert cache.nbytes() <= 0.25 * kb.Policy.full_bytes(cache, 160)


def test_seen_fraction_grows_in_a_session_and_the_batching_engine(default_model):
    model, tok = default_model
    fractions = []
    for use_engine in (False, True):
        session = kb.Session(model, tok, kb.policy("snapkv", budget="0.25seen", decode_interval=4), block_size=32)
        session.add_context(CONTEXT)
        entries = []

        def on_token(_):
            entries.append((session.cache.get_seq_length(), session.cache.layers[0].max_entries))

        if use_engine:
            engine = kb.Engine(model, tok)
            engine.submit(session, "Where does Mira keep her bicycle?", max_new_tokens=9, on_token=on_token)
            engine.run()
        else:
            session.ask_detailed("Where does Mira keep her bicycle?", max_new_tokens=9, on_token=on_token)
        # The token chosen after the 4th and 8th fed ones sees the cache compressed to a quarter.
        seen, held = entries[4]
        assert held == seen // 4
        assert entries[8][1] == entries[8][0] // 4 > held
        fractions.append(entries)
        cache = session.cache  # after the turn, fed back and compressed: a quarter of all seen
        assert all(layer.max_entries == cache.get_seq_length() // 4 for layer in cache.layers)
    assert fractions[0] == fractions[1]
