"""Every policy: budget >= context equals full, bytes within budget, peak within budget + block,
shared machinery (window, order, positions), allocators, registry and bad input."""

import pytest
import torch

import kvbudget as kb
from kvbudget.kv.ragged import RaggedEntries
from kvbudget.compress.allocation import pyramid, uniform
from kvbudget.errors import BudgetError, UnknownPolicyError
from kvbudget.compress import PRESETS, SCORERS, batched, engine

from conftest import random_ids

# EpiCache needs a model profile and a tokenizer: tested in test_episodic.py on the real model.
EVICTING = sorted(n for n, cls in SCORERS.items() if cls.evicts and not getattr(cls, "episodic", False)) + sorted(PRESETS)


def _prefill(model, name, budget, ids, block=16):
    policy = kb.policy(name, budget=budget)
    cache = policy.new_cache(model)
    logits, stats = kb.prefill(model, cache, policy, ids, block)
    return policy, cache, logits


def _greedy(model, cache, logits, steps=6):
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            out.append(int(tok))
            logits = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1]
    return out


def test_first_policies_are_registered():
    for name in ["full", "random", "streaming", "snapkv", "pyramidkv", "h2o", "tova", "keydiff", "knorm"]:
        assert kb.policy(name, budget=64).name == name


@pytest.mark.parametrize("name", EVICTING)
def test_budget_at_least_context_equals_full(tiny_llama, name):
    ids = random_ids(70)
    _, full_cache, full_logits = _prefill(tiny_llama, "full", None, ids)
    _, cache, logits = _prefill(tiny_llama, name, 70, ids)
    torch.testing.assert_close(logits, full_logits)
    assert _greedy(tiny_llama, cache, logits) == _greedy(tiny_llama, full_cache, full_logits)


@pytest.mark.parametrize("name", EVICTING)
def test_bytes_and_peak_within_budget(tiny_llama, name):
    budget, block = 24, 16
    policy, cache, _ = _prefill(tiny_llama, name, budget, random_ids(150), block)
    n_layers = len(cache.layers)
    entry = policy.entry_bytes(cache)
    state = sum(4 * 2 * budget for _ in policy.scorer.state_names) * n_layers  # per-entry float state
    lens_tables = sum(8 * layer.n_heads for layer in cache.layers if isinstance(layer.entries, RaggedEntries))
    assert cache.nbytes() <= n_layers * budget * entry + state + lens_tables
    budgets = policy.layer_budgets(cache.tokens, n_layers)
    if policy.allocator == "head-adaptive":
        for layer in cache.layers:  # heads share the layer's budget
            assert int(layer.lengths().sum()) <= budget * layer.n_heads
        return
    extra = 0  # scoring passes (KVzip's repetition) attend without storing: nothing extra
    for layer, b in zip(cache.layers, budgets):
        assert layer.max_entries <= b
        # Nothing is evicted until the context exceeds the average budget, hence max(b, budget).
        assert layer.peak_entries <= max(b, budget) + block + extra
    assert cache.peak_entries() <= max(*budgets, budget) + block + extra
    assert cache.peak_bytes >= cache.nbytes()


@pytest.mark.parametrize("name", EVICTING)
def test_kept_entries_keep_order_positions_and_window(tiny_llama, name):
    policy, cache, logits = _prefill(tiny_llama, name, 24, random_ids(150))
    for layer, b in zip(cache.layers, policy.layer_budgets(cache.tokens, len(cache.layers))):
        view = layer.view()
        recent = set(range(150 - policy.protected(b), 150))  # min(window, layer budget // 2)
        for h, n in enumerate(view.lengths[0].tolist()):
            pos = view.positions[0, h, :n]
            assert torch.all(pos[1:] > pos[:-1]), "kept entries stay in original order"
            assert pos.max() == 149
            assert recent <= set(pos.tolist())
    # Decoding continues from the true position, not from the number of entries kept.
    assert cache.get_seq_length() == 150
    assert len(_greedy(tiny_llama, cache, logits)) == 6


def test_streaming_keeps_sinks_and_recent(tiny_llama):
    _, cache, _ = _prefill(tiny_llama, "streaming", 20, random_ids(100))
    pos = cache.layers[0].view().positions[0, 0].tolist()
    assert pos == [0, 1, 2, 3] + list(range(84, 100))


def test_snapkv_scores_window_attention_pooled(tiny_llama):
    """SnapKV keeps the tokens the window attends to most (computed here directly)."""
    from kvbudget.compress import Observation
    from kvbudget.methods.scorers.snapkv import SnapKV

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 40, 16, generator=gen)
    queries = torch.randn(1, 4, 8, 16, generator=gen)
    obs = Observation(0, 1, keys, keys, torch.arange(40).expand(1, 2, 40), None, queries,
                      torch.arange(32, 40), 0.25, 10, 40, 0)
    scores = SnapKV(window=8).score(obs)
    logits = torch.einsum("bhmd,bhnd->bhmn", queries, keys.repeat_interleave(2, 1)) * 0.25
    causal = torch.arange(40)[None, :] > torch.arange(32, 40)[:, None]
    attn = logits.masked_fill(causal, float("-inf")).softmax(-1).view(1, 2, 2, 8, 40).mean(2).sum(2)
    expected = torch.nn.functional.max_pool1d(attn, 7, 1, 3)
    torch.testing.assert_close(scores, expected)


def test_h2o_state_accumulates_and_moves_with_entries(tiny_llama):
    _, cache, _ = _prefill(tiny_llama, "h2o", 24, random_ids(120))
    layer = cache.layers[0]
    acc = layer.entries.state["h2o"]
    assert acc.shape == layer.entries.positions.shape
    # Older survivors have received attention from more queries than the newest tokens.
    assert acc[0, :, 0].min() > acc[0, :, -1].max()


def test_random_is_seeded(tiny_llama):
    ids = random_ids(100)
    a = _prefill(tiny_llama, "random", 20, ids)[1].layers[0].entries.positions
    b = _prefill(tiny_llama, "random", 20, ids)[1].layers[0].entries.positions
    assert torch.equal(a, b)


def test_allocators_keep_the_total():
    assert uniform(100, 30, 32) == [100] * 30
    p = pyramid(200, 30, 32)
    assert sum(p) <= 200 * 30 and sum(p) >= 200 * 30 - 30
    assert p == sorted(p, reverse=True) and p[0] > 200 > p[-1] >= 32


@pytest.mark.parametrize("bad", [0, -5, "0", "abc", "0.5x", "12 parsecs"])
def test_bad_budgets_are_clear_errors(bad):
    with pytest.raises(BudgetError, match="budget|ratio"):
        kb.policy("snapkv", budget=bad)


def test_budget_forms():
    assert kb.parse_budget("512").tokens == 512
    assert kb.parse_budget("24MiB").nbytes == 24 * 2**20
    assert kb.parse_budget("4x").ratio == 4.0
    with pytest.raises(BudgetError, match="needs a budget"):
        kb.policy("snapkv")


def test_byte_and_ratio_budgets_resolve(tiny_llama):
    policy = kb.policy("knorm", budget="40KiB")
    cache = policy.new_cache(tiny_llama)
    tokens = policy.resolve(cache)
    assert tokens == 40 * 1024 // (policy.entry_bytes(cache) * 3)
    ratio = kb.policy("knorm", budget="4x")
    assert ratio.resolve(ratio.new_cache(tiny_llama), context_tokens=400) == 100


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(UnknownPolicyError, match="unknown policy 'bogus'.*snapkv"):
        kb.policy("bogus", budget=10)
    with pytest.raises(UnknownPolicyError):
        kb.policy("snapkv", budget=10, not_a_parameter=3)


def test_adakv_heads_keep_different_lengths_and_really_store_them(tiny_llama):
    """Ada-KV: one top-k over the heads of a layer; ragged storage holds exactly that many entries."""
    policy, cache, logits = _prefill(tiny_llama, "adakv", 24, random_ids(200, seed=4))
    lengths = [layer.lengths() for layer in cache.layers]
    assert any(int(l.min()) != int(l.max()) for l in lengths), lengths
    for layer, lens in zip(cache.layers, lengths):
        assert int(lens.sum()) == 24 * 2
        assert int(lens.min()) >= int(0.2 * 24)
        if isinstance(layer.entries, RaggedEntries):
            assert layer.keys.shape[0] == int(lens.sum())  # no padding stored
    assert len(_greedy(tiny_llama, cache, logits)) == 6


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova"])
def test_observation_queries_same_under_sdpa_and_eager(tiny_llama, tiny_llama_eager, name):
    """The hook exposes the same post-RoPE queries with either attention implementation, so
    attention-based policies keep the same entries."""
    tiny_llama_eager.load_state_dict(tiny_llama.state_dict())
    ids = random_ids(120, seed=7)
    a = _prefill(tiny_llama, name, 24, ids)[1]
    b = _prefill(tiny_llama_eager, name, 24, ids)[1]
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.entries.positions, lb.entries.positions)
        if la.observed.queries is not None:
            torch.testing.assert_close(la.observed.queries, lb.observed.queries)


def _observation(n=6, seen=30, budget=3, state=None):
    from kvbudget.compress import Observation

    keys = torch.zeros(1, 1, n, 4)
    obs = Observation(0, 1, keys, keys, torch.arange(n).expand(1, 1, n), None, torch.zeros(1, 1, 4, 4),
                      torch.tensor([10, 15, 20, 25]), 1.0, budget, seen, 0, state=state or {})
    return obs


def test_lazy_tracks_recurrence_intervals():
    """Entry 0 is important at queries 10 and 20 (interval 10, last 20): at seen=30 it is on
    schedule and outranks entry 1 (important once at 10, overdue by 10) and entry 2 (never
    important: overdue by its age)."""
    from kvbudget.methods.scorers.lazy import LazyEviction

    obs = _observation()
    attn = torch.full((1, 1, 4, 6), 0.01)
    attn[0, 0, 0, 0] = attn[0, 0, 2, 0] = 0.9  # queries at 10 and 20 -> entry 0
    attn[0, 0, 0, 1] = 0.9  # query at 10 -> entry 1
    obs.__dict__["attention"] = attn
    scores = LazyEviction().score(obs)
    assert obs.state["lazy_gap"][0, 0, :3].tolist() == [10.0, 9.0, 0.0]  # entry 1: since its write at 1
    assert obs.state["lazy_last"][0, 0, :3].tolist() == [20.0, 10.0, 2.0]
    assert scores[0, 0, 0] > scores[0, 0, 1] > scores[0, 0, 2]
    assert kb.policy("lazy", budget=64).decode_interval == 64  # lagged: evicts every `lag` steps


def test_kvzip_scores_by_reconstruction(default_model):
    """The scoring pass repeats the fed tokens after the reconstruction prompt in the chat template,
    and an entry keeps the largest attention it has received."""
    from kvbudget.methods.scorers.kvzip import repeat_prompt

    model, tok = default_model
    policy = kb.policy("kvzip", budget=32)
    prompt = tok.decode(repeat_prompt(tok)[0])
    assert "Repeat the previous context exactly." in prompt and "assistant" in prompt
    fed = torch.tensor([[5, 6, 7]])
    ids = policy.scorer.reconstruction_ids(fed, tok)
    assert ids[0, -3:].tolist() == [5, 6, 7] and ids.shape[1] == repeat_prompt(tok).shape[1] + 3
    assert policy.scorer.reconstruction_ids(fed, None).tolist() == fed.tolist()  # a bare prefill
    obs = _observation(state={"kvzip": torch.tensor([[[0.5, 0, 0, 0, 0, 0]]])})
    obs.queries = torch.randn(1, 1, 4, 4)
    scores = policy.scorer.score(obs)
    assert float(scores[0, 0, 0]) >= 0.5 and torch.equal(scores, obs.state["kvzip"])


@pytest.mark.parametrize("name", ["snapkv", "h2o", "tova", "keydiff", "knorm", "streaming", "a2sf", "scissorhands", "lazy"])
def test_stacked_compression_equals_layer_by_layer(tiny_llama, name):
    """Scoring all layers at once (stacked along the batch) keeps exactly what the per-layer loop
    keeps: same entries, positions and per-entry state, through several compressions."""
    results = []
    for stacked, group_bytes in ((True, None), (True, 1), (False, None)):  # all / one layer per group / loop
        with pytest.MonkeyPatch.context() as m:
            m.setattr(engine, "BATCHED", stacked)
            if group_bytes:
                m.setattr(batched, "GROUP_BYTES", group_bytes)
            policy = kb.policy(name, budget=40)
            cache = policy.new_cache(tiny_llama)
            kb.prefill(tiny_llama, cache, policy, random_ids(150), block_size=32)
        results.append(cache)
    for other in results[:2]:
        _assert_same_entries(other, results[2])


@pytest.mark.parametrize("name", ["h2o", "a2sf", "lazy", "h2o+kivi4", "a2sf+pyramid"])
def test_state_updates_while_the_context_fits_are_stacked(tiny_llama, monkeypatch, name):
    """While the context fits the budget, a scorer with state still scores every block: stacked
    too (no per-layer scoring), with the same state, entries and store bodies as the loop."""
    calls = []
    original = engine._score_and_keep
    monkeypatch.setattr(engine, "_score_and_keep", lambda *a, **k: calls.append(1) or original(*a, **k))
    results = []
    for stacked in (True, False):
        monkeypatch.setattr(engine, "BATCHED", stacked)
        policy = kb.policy(name, budget=80)
        cache = policy.new_cache(tiny_llama)
        kb.prefill(tiny_llama, cache, policy, random_ids(64), block_size=32, compress_last=True)
        assert all(layer.entries.state for layer in cache.layers)  # the scorer's state was kept
        if stacked:
            assert calls == []  # the first block (32 <= 80) and the second (64 <= 80) fit
        kb.prefill(tiny_llama, cache, policy, random_ids(86, seed=1), block_size=32)
        results.append(cache)
    _assert_same_entries(*results)
    for la, lb in zip(*(r.layers for r in results)):
        body_a, body_b = getattr(la.entries, "body", None), getattr(lb.entries, "body", None)
        assert (body_a is None) == (body_b is None) and la.nbytes() == lb.nbytes()
        if body_a is not None:
            assert all(torch.equal(body_a.tokens[k], body_b.tokens[k]) for k in body_a.tokens)


def _assert_same_entries(a, b) -> None:
    """Two caches keep the same entries (positions, keys, values bit for bit) and scorer state."""
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.entries.positions, lb.entries.positions)
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        assert la.entries.state.keys() == lb.entries.state.keys()
        for k in la.entries.state:
            # Sums over the queries may round differently by row length (last bit, on CPU).
            torch.testing.assert_close(la.entries.state[k], lb.entries.state[k])


def test_stacked_compression_is_used(tiny_llama, monkeypatch):
    """The stacked path really runs for a uniform dense policy (and not for random, whose seed is
    per layer)."""
    calls = []
    original = engine._score_and_keep
    monkeypatch.setattr(engine, "_score_and_keep", lambda *a, **k: calls.append(1) or original(*a, **k))
    policy = kb.policy("snapkv", budget=40)
    kb.prefill(tiny_llama, policy.new_cache(tiny_llama), policy, random_ids(150), block_size=32)
    assert calls == []
    policy = kb.policy("random", budget=40)
    kb.prefill(tiny_llama, policy.new_cache(tiny_llama), policy, random_ids(150), block_size=32)
    assert calls


def _prefill_and_decode(model, name: str, budget: int, block: int, stack: bool, group_bytes: int | None = None,
                        window: int = 32, **kwargs):
    """Prefill 150 tokens block-wise, then decode 12 greedily, compressing every 5 new tokens
    (decode-time compression); returns the cache. ``stack``: the batched engine (else the
    per-layer reference path); ``kwargs`` go to the policy."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "BATCHED", stack)
        if group_bytes:
            m.setattr(batched, "GROUP_BYTES", group_bytes)
        policy = kb.policy(name, budget=budget, decode_interval=5, window=window, **kwargs)
        cache = policy.new_cache(model)
        logits, _ = kb.prefill(model, cache, policy, random_ids(150), block_size=block)
        with torch.inference_mode():
            for step in range(12):
                token = logits.argmax(-1, keepdim=True)
                logits = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
                if (step + 1) % policy.decode_interval == 0:
                    kb.compress(cache, policy)
    return cache


@pytest.mark.parametrize("name,budget,block,window", [
    ("pyramidkv", 40, 32, 32), ("pyramidkv", 24, 16, 32), ("pyramidkv", 64, 24, 32),
    ("pyramidkv", 40, 32, 2),  # a window short enough that pooling next to padding is not protected
    ("tova+pyramid", 40, 32, 32), ("a2sf+pyramid", 40, 32, 32), ("lazy+pyramid", 40, 32, 32),
])
def test_stacked_compression_with_layer_budgets_equals_the_loop(tiny_llama, name, budget, block, window):
    """Layers of different budgets, which hold different numbers of entries after their first
    compression, stacked padded to the longest (all layers, or groups) keep exactly what
    the per-layer loop keeps, through a block-wise prefill and decode-time compressions."""
    loop = _prefill_and_decode(tiny_llama, name, budget, block, stack=False, window=window)
    lengths = [layer.keys.shape[2] for layer in loop.layers]
    assert len(set(lengths)) == len(lengths)  # really different budgets
    first = loop.layers[0]
    entry = (first.keys.nbytes + first.values.nbytes) // first.keys.shape[2]
    for group_bytes in (None, 2 * (max(lengths) + block) * entry):  # all layers / about two per group
        _assert_same_entries(_prefill_and_decode(tiny_llama, name, budget, block, True, group_bytes, window), loop)


def test_layer_budgets_are_stacked(tiny_llama, monkeypatch):
    """PyramidKV scores once per compression, not once per layer; scorers that read their
    layer's budget (H2O) or average over entries (KeyDiff) stay on the loop."""
    from kvbudget.methods.scorers.snapkv import SnapKV

    scored, looped = [], []
    score, compress_layer = SnapKV.score, engine._score_and_keep
    monkeypatch.setattr(SnapKV, "score", lambda self, obs: scored.append(obs.keys.shape[0]) or score(self, obs))
    monkeypatch.setattr(engine, "_score_and_keep", lambda *a, **k: looped.append(1) or compress_layer(*a, **k))
    policy = kb.policy("pyramidkv", budget=40)
    kb.prefill(tiny_llama, policy.new_cache(tiny_llama), policy, random_ids(150), block_size=32)
    n_layers = len(tiny_llama.model.layers)
    assert looped == [] and scored == [n_layers] * 4  # 4 compressions over budget, all layers each
    for name in ("h2o+pyramid", "keydiff+pyramid"):
        policy = kb.policy(name, budget=40)
        kb.prefill(tiny_llama, policy.new_cache(tiny_llama), policy, random_ids(150), block_size=32)
        assert looped
        looped.clear()



def test_prefill_times_its_compressions(tiny_llama):
    """`PrefillStats.compress_seconds` sums the compressions' time (wall clock on CPU, stream
    events on CUDA): positive for a policy that compresses, within the prefill's total."""
    policy = kb.policy("snapkv", budget=40)
    _, stats = kb.prefill(tiny_llama, policy.new_cache(tiny_llama), policy, random_ids(150), block_size=32)
    assert 0 < stats.compress_seconds < stats.seconds and stats.blocks == 5


# Ada-KV and other head-adaptive policies: ragged layers (each head its own length) stacked.
ADAPTIVE = [("adakv", {}), ("lazy", {"heads": "adaptive"}), ("snapkv", {"heads": "adaptive", "window": 4})]


def _adaptive_run(model, name: str, kwargs: dict, budget: int, block: int, stack: bool,
                  group_bytes: int | None = None):
    """`_prefill_and_decode` with a head-adaptive policy's keyword arguments."""
    return _prefill_and_decode(model, name, budget, block, stack, group_bytes, **kwargs)


def _assert_same_ragged(a, b) -> None:
    """Two caches hold exactly the same entries: keys, values, positions, per-entry state bit for
    bit, the same per-head lengths (device and host) and layout."""
    for la, lb in zip(a.layers, b.layers):
        ea, eb = la.entries, lb.entries
        assert type(ea) is type(eb)
        for name in ("keys", "values", "positions", "head_lens"):
            x, y = getattr(ea, name, None), getattr(eb, name, None)
            assert (x is None) == (y is None), name
            if x is not None:
                assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
        if isinstance(ea, RaggedEntries):
            assert ea.sizes == eb.sizes == tuple(ea.head_lens.tolist())
        assert ea.state.keys() == eb.state.keys()
        for k in ea.state:
            assert torch.equal(ea.state[k], eb.state[k]), k
        assert (la.seen, la.max_entries, la.total_entries()) == (lb.seen, lb.max_entries, lb.total_entries())


def _layer_bytes(cache) -> int:
    """Bytes of one entry of every head of a layer (what `stacking.groups` counts per entry)."""
    first = cache.layers[0]
    return first.n_heads * (first.keys.shape[-1] * first.keys.element_size() + first.values.shape[-1] * first.values.element_size())


@pytest.mark.parametrize("budget,block", [(24, 16), (40, 32), (64, 24)])
@pytest.mark.parametrize("name,kwargs", ADAPTIVE)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_eager"])
def test_stacked_adakv_keeps_what_the_loop_keeps(request, fixture, name, kwargs, budget, block):
    """Ada-KV's layers compressed together (all at once, one per group, about two per group) keep
    exactly what the per-layer loop keeps, through a block-wise prefill (dense, then ragged
    layers) and decode-time compressions; and the layers really end up ragged."""
    model = request.getfixturevalue(fixture)
    loop = _adaptive_run(model, name, kwargs, budget, block, stack=False)
    assert any(isinstance(layer.entries, RaggedEntries) for layer in loop.layers)
    widest = max(layer.max_entries for layer in loop.layers)
    for group_bytes in (None, 1, 2 * (widest + block) * _layer_bytes(loop)):
        _assert_same_ragged(_adaptive_run(model, name, kwargs, budget, block, True, group_bytes), loop)


def test_stacked_adakv_with_entries_scoring_nan_keeps_what_the_loop_keeps(tiny_llama, monkeypatch):
    """Where valid entries score NaN (never kept: fewer kept in all when too few others remain)
    or -inf, the stacked path keeps what the loop keeps; every choice (`_choose`) keeps
    min(budget * heads, entries ranked above -inf) per layer, none at -inf."""
    from kvbudget.compress import select
    from kvbudget.methods.scorers.snapkv import SnapKV

    score, choose = SnapKV.score, select.choose

    def holes(self, obs):
        s = score(self, obs)
        s = s.masked_fill(obs.positions % 2 == 1, float("nan"))
        return s.masked_fill(obs.positions % 13 == 4, float("-inf"))

    short = []  # per choice: whether some layer kept fewer than budget * heads

    def checked(scores, guaranteed, budget):
        chosen = choose(scores, guaranteed, budget)
        above = scores > float("-inf")
        assert not (chosen & ~above).any()
        want = above.flatten(1).sum(-1).clamp(max=budget * scores.shape[1])
        assert torch.equal(chosen.flatten(1).sum(-1), want)
        short.append(bool((want < budget * scores.shape[1]).any()))
        return chosen

    monkeypatch.setattr(SnapKV, "score", holes)
    monkeypatch.setattr(select, "choose", checked)  # the reference path's
    monkeypatch.setattr(batched, "choose", checked)  # the batched engine's
    loop = _adaptive_run(tiny_llama, "adakv", {}, 24, 16, stack=False)
    assert any(short)
    for group_bytes in (None, 1):
        short.clear()
        _assert_same_ragged(_adaptive_run(tiny_llama, "adakv", {}, 24, 16, True, group_bytes), loop)
        assert any(short)


def test_stacked_adakv_with_tied_scores_keeps_what_the_loop_keeps(tiny_llama, monkeypatch):
    """Scores with many exact ties (SnapKV's, rounded to integers): layers of different widths
    and per-head lengths chosen together (all at once, one per group, about two per group) keep
    what the loop keeps, ties included."""
    from kvbudget.methods.scorers.snapkv import SnapKV

    score, choose = SnapKV.score, batched._choose
    distinct, widths = [], []

    def rounded(self, obs):
        s = (score(self, obs) * 4).round()
        distinct.append(s.unique().numel() / s.numel())
        return s

    monkeypatch.setattr(SnapKV, "score", rounded)
    monkeypatch.setattr(batched, "_choose", lambda policy, layers, *a: widths.append(
        {layer.max_entries for layer in layers}) or choose(policy, layers, *a))
    loop = _adaptive_run(tiny_llama, "adakv", {}, 24, 16, stack=False)
    assert max(distinct) < 0.25  # many ties
    widest = max(layer.max_entries for layer in loop.layers)
    for group_bytes in (None, 1, 2 * (widest + 16) * _layer_bytes(loop)):
        widths.clear()
        _assert_same_ragged(_adaptive_run(tiny_llama, "adakv", {}, 24, 16, True, group_bytes), loop)
        if group_bytes is None:  # layers of different widths chosen together
            assert any(len(w) > 1 for w in widths)


def test_stacked_adakv_frees_every_groups_stacked_keys_before_keeping(tiny_llama, monkeypatch):
    """Ada-KV's groups are all chosen before the one sync, but only their small results stay
    alive until they are kept: each group's stacked keys are freed when its choice is made, so
    the stacked copies never pile up beyond one group (the point of `Policy._groups`)."""
    import weakref

    stacked, alive, keep = [], [], batched._keep_chosen
    observe = batched.stacked_observation

    def observed(*a, **k):
        obs = observe(*a, **k)
        stacked.append(weakref.ref(obs.keys))
        return obs

    def kept(*a, **k):
        alive.append(sum(ref() is not None for ref in stacked))
        return keep(*a, **k)

    monkeypatch.setattr(batched, "stacked_observation", observed)
    monkeypatch.setattr(batched, "_keep_chosen", kept)
    _adaptive_run(tiny_llama, "adakv", {}, 24, 16, stack=True, group_bytes=1)
    assert len(stacked) > len(tiny_llama.model.layers) and alive and set(alive) == {0}


def test_stacked_adakv_is_used_and_falls_back(tiny_llama, monkeypatch):
    """Ada-KV compresses its layers together (no per-layer compression, one stacked call per
    compression, every layer in it); layers of different budgets (pyramid allocator with
    adaptive heads) and the reference path (`engine.BATCHED = False`) go through the loop."""
    looped, stacked = [], []
    compress_layer, compress_adaptive = engine._score_and_keep, batched._adaptive
    monkeypatch.setattr(engine, "_score_and_keep", lambda *a, **k: looped.append(1) or compress_layer(*a, **k))

    def adaptive(policy, layers, *a):
        done = compress_adaptive(policy, layers, *a)
        if done:
            stacked.append(len(layers))
        return done

    monkeypatch.setattr(batched, "_adaptive", adaptive)
    _adaptive_run(tiny_llama, "adakv", {}, 24, 16, stack=True)
    n_layers = len(tiny_llama.model.layers)
    assert looped == [] and len(stacked) > 2 and set(stacked) == {n_layers}
    stacked.clear()
    _adaptive_run(tiny_llama, "snapkv+pyramid", {"heads": "adaptive"}, 24, 16, stack=True)
    assert looped and stacked == []
    looped.clear()
    _adaptive_run(tiny_llama, "adakv", {}, 24, 16, stack=False)
    assert looped and stacked == []
