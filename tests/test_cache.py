"""BudgetedCache: correctness of attention over kept entries (dense and ragged), positions, bytes."""

import pytest
import torch
from transformers import DynamicCache

import kvbudget as kb
from kvbudget.kv.ragged import RaggedEntries
from kvbudget.kv.cache import BudgetedCache
from kvbudget.kv.ragged import padded_to_ragged, ragged_to_padded

from conftest import random_ids


def _kept_sets(n_heads: int, total: int, seed: int, ragged: bool) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sets = []
    for h in range(n_heads):
        k = total // 2 - (5 * h if ragged else 0)
        sets.append(torch.randperm(total, generator=gen)[:k].sort().values)
    return sets


def _reference_logits(model, ids, new_ids, kept, hq):
    """Full prefill in a DynamicCache, then the new tokens under a 4-D mask hiding evicted entries."""
    total, q = ids.shape[1], new_ids.shape[1]
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    g = hq // len(kept)
    mask = torch.zeros(1, hq, q, total + q, dtype=torch.bool)
    for j in range(hq):
        mask[0, j, :, kept[j // g]] = True
    mask[0, :, :, total:] = torch.ones(q, q, dtype=torch.bool).tril()
    pos = torch.arange(total, total + q)[None]
    return model(input_ids=new_ids, cache=cache, attention_mask=mask, position_ids=pos).logits


def _budgeted_logits(model, ids, new_ids, kept, ragged):
    cache = BudgetedCache(model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    width = max(len(k) for k in kept)
    index = torch.stack([torch.cat([k, k.new_zeros(width - len(k))]) for k in kept])[None]
    lens = torch.tensor([len(k) for k in kept]) if ragged else None
    for layer in cache.layers:
        layer.keep(index, lens)
    out = model(input_ids=new_ids, cache=cache, use_cache=True).logits
    return out, cache


@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "ragged"])
@pytest.mark.parametrize("q", [1, 5], ids=["decode", "block"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_eager"])
def test_attention_over_kept_entries_matches_masked_reference(request, fixture, ragged, q):
    """Different heads keep different tokens (and, ragged, different numbers of them); the next
    tokens must see exactly the kept entries at their original positions (GQA: 4 q heads / 2 KV)."""
    model = request.getfixturevalue(fixture)
    ids, new_ids = random_ids(60), random_ids(q, seed=1)
    kept = _kept_sets(model.config.num_key_value_heads, 60, seed=2, ragged=ragged)
    with torch.inference_mode():
        ref = _reference_logits(model, ids, new_ids, kept, model.config.num_attention_heads)
        got, cache = _budgeted_logits(model, ids, new_ids, kept, ragged)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    layer = cache.layers[0]
    assert isinstance(layer.entries, RaggedEntries) == ragged
    assert layer.lengths().tolist() == [len(k) + q for k in kept]
    # Original positions are kept: the kept ones, then the new tokens.
    view = layer.view()
    for h, k in enumerate(kept):
        pos = view.positions[0, h, : len(k) + q].tolist()
        assert pos == k.tolist() + list(range(60, 60 + q))


def test_ragged_storage_allocates_fewer_bytes(tiny_llama):
    """Per-head variable lengths are real storage: bytes = sum of lengths, not heads x max."""
    ids = random_ids(80)
    cache = BudgetedCache(tiny_llama.config)
    with torch.inference_mode():
        tiny_llama(input_ids=ids, cache=cache, use_cache=True)
    layer = cache.layers[0]
    d = layer.keys.shape[-1]
    lens = torch.tensor([60, 20])
    index = torch.arange(60).expand(1, 2, 60).contiguous()
    layer.keep(index, lens)
    per_entry = 2 * d * 4 + 4  # K + V float32, int32 position
    assert layer.keys.shape == (80, d)  # 60 + 20 rows, no padding
    assert layer.nbytes() == 80 * per_entry + lens.numel() * 8
    padded_bytes = 2 * 60 * per_entry
    assert layer.nbytes() < 0.7 * padded_bytes
    assert cache.nbytes() == sum(cache.layer_bytes())


def test_ragged_round_trip():
    lens = torch.tensor([3, 0, 2])
    flat = torch.arange(5.0)[:, None].expand(5, 4)
    padded = ragged_to_padded(flat, lens)
    assert padded.shape == (3, 3, 4)
    assert torch.equal(padded_to_ragged(padded, lens), flat)


def test_full_cache_matches_dynamic_cache_in_generate(tiny_llama):
    """BudgetedCache works inside the model's own generate and changes nothing while under budget."""
    ids = random_ids(40)
    ref = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              cache=BudgetedCache(tiny_llama.config))
    assert torch.equal(got, ref)


def test_generate_after_eviction_uses_true_positions(tiny_llama):
    """After eviction, get_seq_length still reports tokens seen, so generate places the next token
    at the right position: its first step equals the masked reference."""
    ids = random_ids(50)
    kept = _kept_sets(2, 50, seed=3, ragged=False)
    with torch.inference_mode():
        cache = BudgetedCache(tiny_llama.config)
        logits = tiny_llama(input_ids=ids, cache=cache, use_cache=True).logits
        first = logits[:, -1].argmax(-1, keepdim=True)
        index = torch.stack(kept)[None]
        for layer in cache.layers:
            layer.keep(index)
        assert cache.get_seq_length() == 50
        ref = _reference_logits(tiny_llama, ids, first, kept, 4)
        out = tiny_llama(input_ids=first, cache=cache, use_cache=True).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_scratch_rolls_back_exactly(tiny_llama):
    policy = kb.policy("snapkv", budget=24)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(70), 16)
    before = [(l.keys.clone(), l.entries.positions.clone(), l.seen) for l in cache.layers]
    with cache.scratch(), torch.inference_mode():
        tiny_llama(input_ids=random_ids(9, seed=5), cache=cache, use_cache=True)
        assert cache.get_seq_length() == 79
    for layer, (k, p, seen) in zip(cache.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.entries.positions, p) and layer.seen == seen


def test_hybrid_model_budget_binds_every_layer(tiny_gemma):
    """Gemma 3: `full` equals the model's own generate (the sliding layers masked by position,
    entries beyond the window dropped); under a budget every layer holds at most its share, a
    sliding layer at most min(share, window - 1)."""
    ids = random_ids(90)
    ref = tiny_gemma.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = tiny_gemma.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              cache=BudgetedCache(tiny_gemma))
    assert torch.equal(got, ref)
    for budget, sliding in ((20, 15), (12, 12)):  # window 16: at most 15 entries per head
        policy = kb.policy("snapkv", budget=budget)
        cache = policy.new_cache(tiny_gemma)
        kb.prefill(tiny_gemma, cache, policy, ids, 16)
        assert [layer.window for layer in cache.layers] == [16, None, 16, None]
        for layer in cache.layers:
            assert layer.keys.shape[-2] == (budget if layer.window is None else sliding)


@pytest.mark.parametrize("name", ["h2o", "snapkv+kivi4"])
def test_snapshot_held_on_the_host_restores_the_cache(tiny_llama, monkeypatch, name):
    """An answer with decode-time compression is rolled back to a snapshot. On a GPU the snapshot's
    keys, values and body wait in host memory (`BudgetedCache.host_snapshots`): the snapshot owns
    copies (no view of the layer's tensors) and the rollback gives back exactly the cache from
    before the answer (here on the CPU, with the host copy forced)."""
    from kvbudget.kv.cache import BudgetedCache

    def run(host: bool):
        monkeypatch.setattr(BudgetedCache, "_snapshot_on_host", lambda self: host)
        policy = kb.policy(name, budget=48, decode_interval=5)
        cache = policy.new_cache(tiny_llama)
        logits, _ = kb.prefill(tiny_llama, cache, policy, random_ids(160), block_size=32)
        before = [(layer.view(), getattr(layer.entries, "body", None)) for layer in cache.layers]
        snaps = []
        original = BudgetedCache.before_compress

        def spy(self, appends_only=False):
            original(self, appends_only)
            if self._scratch and self._scratch[-1] is not None and not snaps:
                snaps.append([snap.attrs["entries"].keys.untyped_storage().data_ptr() == layer.keys.untyped_storage().data_ptr()
                              for layer, snap in self._scratch[-1][-1]])

        monkeypatch.setattr(BudgetedCache, "before_compress", spy)
        with torch.inference_mode(), cache.scratch():
            for step in range(12):
                logits = tiny_llama(input_ids=logits.argmax(-1, keepdim=True), cache=cache,
                                    use_cache=True).logits[:, -1]
                if (step + 1) % 5 == 0:
                    kb.compress(cache, policy)
        monkeypatch.setattr(BudgetedCache, "before_compress", original)
        assert snaps and all(shares != host for shares in snaps[0])  # copies exactly when held on the host
        return cache, before

    for host in (False, True):
        cache, before = run(host)
        for layer, (view, body) in zip(cache.layers, before):
            now = layer.view()
            assert torch.equal(now.keys, view.keys) and torch.equal(now.values, view.values)
            assert torch.equal(now.positions, view.positions)
            if body is not None:
                for k in body.tokens:
                    assert torch.equal(layer.entries.body.tokens[k], body.tokens[k])
