"""The methods kvpress ships, here with memory really freed: each scorer's result on hand-made
inputs where its paper defines it, and each method holding its budget (entries and bytes) in a
Session on the real default model, alone and with an allocator and a store."""

import math

import pytest
import torch

from conftest import random_ids, use_batched

import kvbudget as kb
from kvbudget.compress import SCORERS, Observation
from kvbudget.compress.allocation import get_allocator
from kvbudget.errors import KVBudgetError
from kvbudget.methods.scorers.compactor import leverage
from kvbudget.methods.scorers.criticalkv import projected_norms
from kvbudget.runtime.modelcall import run

METHODS = ["expected-attention", "criticalkv", "chunkkv", "chunkkv-entropy", "compactor", "curdkv", "lagkv",
           "finch", "simlayerkv", "capkv"]


def _obs(keys, values=None, queries=None, positions=None, budget=4, seen=None, valid=None, state=None,
         query_positions=None, scaling=None):
    b, h, n, d = keys.shape
    positions = torch.arange(n).expand(b, h, n) if positions is None else positions
    seen = int(positions.max()) + 1 if seen is None else seen
    if queries is not None and query_positions is None:
        query_positions = torch.arange(seen - queries.shape[2], seen)
    return Observation(layer_idx=0, n_layers=1, keys=keys, values=values, positions=positions, valid=valid,
                       queries=queries, query_positions=query_positions, scaling=scaling or d**-0.5,
                       budget=budget, seen=seen, seed=0, state=state or {})


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- scoring on hand-made inputs -----------------------------------------------------------------


def test_expected_attention_is_the_gaussian_expectation():
    """exp(s mu.k + s^2 k^T Sigma k / 2) is E[exp(s q.k)] for q ~ N(mu, Sigma): the scores equal a
    Monte-Carlo estimate over queries drawn from the Gaussian fitted to the observed ones."""
    d, n = 8, 12
    keys, values = _rand(1, 1, n, d, seed=1), _rand(1, 1, n, d, seed=2)
    queries = 0.5 * _rand(1, 1, 400, d, seed=3) + 0.3
    obs = _obs(keys, values, queries, budget=6, seen=500, positions=torch.arange(n).expand(1, 1, n) + 100)
    got = SCORERS["expected-attention"]().score(obs)[0, 0]
    q = queries[0, 0]
    mu, cov = q.mean(0), torch.cov(q.T, correction=0)
    samples = torch.distributions.MultivariateNormal(mu, cov + 1e-6 * torch.eye(d)).sample((200_000,))
    expected = torch.exp(samples @ keys[0, 0].T * d**-0.5).mean(0)
    want = expected / expected.sum() * values[0, 0].norm(dim=-1)
    torch.testing.assert_close(got, want, rtol=0.03, atol=1e-4)
    # The first positions (sinks) are always kept.
    sinks = SCORERS["expected-attention"]().score(_obs(keys, values, queries, seen=500))[0, 0]
    assert torch.isinf(sinks[:4]).all() and torch.isfinite(sinks[4:]).all()


def test_criticalkv_two_stages_and_output_projection():
    torch.manual_seed(0)
    keys, values = _rand(1, 2, 40, 4, seed=1), _rand(1, 2, 40, 4, seed=2)
    queries = _rand(1, 4, 8, 4, seed=3)
    scorer = kb.policy("criticalkv", budget=20, window=8).scorer
    obs = _obs(keys, values, queries, budget=20)
    base = SCORERS["snapkv"](window=8).score(_obs(keys, values, queries, budget=20))
    got = scorer.score(obs)
    first = int(0.5 * (20 - 8))  # half the budget beyond the protected window
    outside = base.masked_fill(torch.arange(40) >= 32, float("-inf"))
    stage1 = outside.topk(first, dim=-1).indices
    assert torch.isinf(got.gather(-1, stage1)).all()
    rest = ~torch.isinf(got)
    torch.testing.assert_close(got[rest], ((base + 1e-4) * values.abs().sum(-1))[rest])
    # ||W_o^h v||_1 per query head, averaged over each KV head's group (nn.Linear layout).
    w = _rand(6, 4 * 4, seed=4)  # hidden 6, 4 query heads of dim 4
    want = torch.stack([torch.stack([(values[0, kv] @ w[:, qh * 4 : qh * 4 + 4].T).abs().sum(-1)
                                     for qh in (2 * kv, 2 * kv + 1)]).mean(0) for kv in range(2)])
    torch.testing.assert_close(projected_norms(values, w)[0], want)


def _chunk_reference(token: list[float], chunk: int, budget: int, low: int | None) -> set[int]:
    """ChunkKV's choice written as the papers describe it (a greedy loop over chunks, best first;
    the entropy gate keeps only the best ``low`` tokens of an important, spiky chunk, then the
    budget left goes to the best remaining tokens)."""
    n = len(token)
    chunks = [list(range(s, min(s + chunk, n))) for s in range(0, n, chunk)]
    means = [sum(token[i] for i in c) / len(c) for c in chunks]

    def entropy(c):
        t = [token[i] for i in c]
        shift = min(min(t), 0)
        t = [x - shift for x in t]
        total = sum(t) + 1e-8
        p = [x / total for x in t]
        return 0.0 if len(c) == 1 else min(1.0, max(0.0, -sum(x * math.log(x + 1e-8) for x in p) / math.log(len(c))))

    lower_median = lambda xs: sorted(xs)[(len(xs) - 1) // 2]  # noqa: E731
    ent = [entropy(c) for c in chunks]
    kept: set[int] = set()
    left = budget
    for ci in sorted(range(len(chunks)), key=lambda i: -means[i]):
        if left <= 0:
            break
        best = sorted(chunks[ci], key=lambda i: -token[i])
        take = min(len(best), left)
        if low is not None and means[ci] >= lower_median(means) and ent[ci] < lower_median(ent):
            take = min(take, low)
        kept |= set(best[:take])
        left -= take
    if left > 0:
        kept |= set(sorted(set(range(n)) - kept, key=lambda i: -token[i])[:left])
    return kept


@pytest.mark.parametrize("name,low", [("chunkkv", None), ("chunkkv-entropy", 4)])
def test_chunkkv_keeps_whole_chunks_as_the_greedy_choice(name, low):
    scorer = SCORERS[name]()
    for seed in range(4):
        token = _rand(1, 95, seed=seed).abs() ** 3  # spiky and flat chunks alike
        token[0, 40:50] = 0.3  # a flat chunk
        priority = scorer.priority(token, torch.ones_like(token, dtype=torch.bool))[0]
        for budget in (7, 20, 33, 60):
            got = set(priority.topk(budget).indices.tolist())
            assert got == _chunk_reference(token[0].tolist(), scorer.chunk, budget, low), (seed, budget)


def test_chunkkv_scores_are_shared_by_heads_and_chunks():
    """Every head gets the same scores; a chunk's positions rank together, whole chunks first."""
    keys, queries = _rand(1, 2, 60, 4, seed=1), _rand(1, 4, 32, 4, seed=2)
    scores = SCORERS["chunkkv"]().score(_obs(keys, None, queries, budget=30))
    assert torch.equal(scores[0, 0], scores[0, 1])
    for k in (20, 40):
        assert len({i // 20 for i in scores[0, 0].topk(k).indices.tolist()}) == k // 20


def test_compactor_leverage_is_the_hat_matrix_diagonal():
    keys = _rand(1, 1, 30, 6, seed=1)
    valid = torch.ones(1, 1, 30, dtype=torch.bool)
    got = leverage(keys, valid, torch.eye(6), ridge=0.0)[0, 0]
    x = keys[0, 0] - keys[0, 0].mean(0)
    want = torch.diagonal(x @ torch.linalg.pinv(x))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert abs(float(got.sum()) - 6) < 1e-3  # leverages sum to the rank


def test_compactor_attention_is_non_causal_within_chunks_and_kept_as_state():
    """Each new entry's score: the attention it gets from every query of its chunk (later ones
    too), summed, times its value norm, smoothed over 3 neighbours; older entries keep theirs."""
    n, m, d = 20, 8, 4
    keys, values = _rand(1, 1, n, d, seed=1), _rand(1, 1, n, d, seed=2)
    queries = _rand(1, 1, m, d, seed=3)
    old = torch.full((1, 1, n), 7.0)
    scorer = SCORERS["compactor"](chunk=4)
    obs = _obs(keys, values, queries, budget=10, state={"compactor": old.clone()})
    got = scorer.attention(obs)[0, 0]
    raw = torch.zeros(m)
    for c in range(0, m, 4):
        logits = queries[0, 0, c : c + 4] @ keys[0, 0, n - m + c : n - m + c + 4].T * d**-0.5
        raw[c : c + 4] = logits.softmax(-1).sum(0)
    raw = raw * values[0, 0, n - m :].norm(dim=-1)
    smooth = torch.nn.functional.avg_pool1d(raw[None, None], 3, stride=1, padding=1)[0, 0]
    torch.testing.assert_close(got[n - m :], smooth)
    assert torch.equal(got[: n - m], old[0, 0, : n - m]) and torch.equal(obs.state["compactor"][0, 0], got)


def test_curdkv_leverage_product_with_local_windows():
    keys, values = _rand(1, 2, 48, 8, seed=1), _rand(1, 2, 48, 8, seed=2)
    scorer = SCORERS["curdkv"]()
    obs = _obs(keys, values, budget=16)
    scores = scorer.score(obs)
    assert torch.isinf(scores[..., :4]).all()
    g = torch.randn(8, 20, generator=torch.Generator().manual_seed(0)) / 20**0.5
    k2, v2 = (keys @ g).square().sum(-1), (values @ g).square().sum(-1)
    local = lambda x: x / x.view(1, 2, 3, 16).sum(-1, keepdim=True).expand(1, 2, 3, 16).reshape(1, 2, 48)  # noqa: E731
    want = local(k2) * local(v2)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(scores[..., 4:], want[..., 4:])


def test_lagkv_scores_by_the_next_partition():
    lag, sinks, n, d = 4, 2, 2 + 4 * 4 + 3, 3  # 4 full partitions and 3 entries after them
    keys, values = _rand(1, 1, n, d, seed=1), _rand(1, 1, n, d, seed=2)
    got = SCORERS["lagkv"](lag=lag, sinks=sinks).score(_obs(keys, values, budget=8))[0, 0]
    want = torch.ones(n)
    for p in range(3):  # the 4th partition is only a reference: kept with the tail
        cur, ref = slice(sinks + p * lag, sinks + (p + 1) * lag), slice(sinks + (p + 1) * lag, sinks + (p + 2) * lag)
        parts = []
        for x in (keys[0, 0], values[0, 0]):
            lo, hi = x[ref].min(0).values, x[ref].max(0).values
            parts.append(((x[cur] - lo) / (hi - lo)).std(-1).softmax(-1))
        want[cur] = ((parts[0] + parts[1]) / 2).argsort().argsort().float() / lag
    torch.testing.assert_close(got, want)
    # Too short to compare two partitions: recency after the sinks.
    short = SCORERS["lagkv"](lag=lag, sinks=sinks).score(_obs(keys[:, :, :9], values[:, :, :9], budget=4))[0, 0]
    assert torch.equal(short[:2], torch.ones(2)) and torch.all(short[3:] > short[2:-1])


def test_finch_scales_each_query_row_by_the_keys_it_sees():
    keys, queries = _rand(1, 1, 10, 4, seed=1), _rand(1, 1, 5, 4, seed=2)
    obs = _obs(keys, None, queries, budget=5)  # queries at positions 5..9 see 6..10 keys
    got = SCORERS["finch"]().score(obs)[0, 0]
    attn = _obs(keys, None, queries, budget=5).attention[0, 0]  # [5, 10], causal
    want = (attn * torch.arange(6, 11)[:, None]).mean(0)
    torch.testing.assert_close(got, want)
    # The question's queries (after the cache) see every entry: mean attention, unpooled.
    late = _obs(keys, None, queries, budget=5, seen=12, query_positions=torch.arange(12, 17))
    torch.testing.assert_close(SCORERS["finch"]().score(late)[0, 0], 10 * late.attention[0, 0].mean(0))


def test_simlayerkv_lazy_layers_keep_sinks_and_recent():
    n, d = 40, 4
    keys = torch.zeros(2, 1, n, d)
    keys[0, :, :4, 0] = 20.0  # layer 0: every query looks at the sinks (lazy)
    keys[1, :, 10:14, 0] = 20.0  # layer 1: at positions 10-13 (far from sinks and recent)
    queries = torch.zeros(2, 1, 32, d)
    queries[..., 0] = 1.0
    scorer = SCORERS["simlayerkv"](window=8)
    obs = _obs(keys, None, queries, budget=12, scaling=1.0)
    assert scorer.lazy(obs).tolist() == [True, False]
    scores = scorer.score(_obs(keys, None, queries, budget=12, scaling=1.0))
    kept = scores[0, 0].topk(12).indices.sort().values.tolist()
    assert kept == [0, 1, 2, 3] + list(range(32, 40))  # sinks + recent
    snap = SCORERS["snapkv"](window=32).score(_obs(keys[1:], None, queries[1:], budget=12, scaling=1.0))
    torch.testing.assert_close(scores[1:], snap)


def test_capkv_is_the_capacity_formula():
    keys, values = _rand(1, 1, 16, 4, seed=1), _rand(1, 1, 16, 4, seed=2)
    queries = _rand(1, 2, 6, 4, seed=3)  # 2 query heads over 1 KV head
    obs = _obs(keys, values, queries, budget=8, seen=30, positions=torch.arange(16).expand(1, 1, 16) + 10)
    got = SCORERS["capkv"]().score(obs)[0, 0]
    per_head = []
    for qh in range(2):
        mu = queries[0, qh].mean(0)
        w = torch.exp(5 * torch.nn.functional.cosine_similarity(keys[0, 0], mu[None], dim=-1))
        v = values[0, 0]
        a = torch.eye(4) + sum(w[i] * torch.outer(v[i], v[i]) for i in range(16))
        per_head.append(torch.stack([w[i] * v[i] @ torch.linalg.solve(a, v[i]) for i in range(16)]))
    torch.testing.assert_close(got, torch.stack(per_head).mean(0), rtol=1e-4, atol=1e-6)


def test_per_layer_allocator_gives_each_layer_its_share():
    allocate = get_allocator("per-layer:2/1/1")
    assert allocate(60, 3, 8) == [90, 45, 45] and sum(allocate(61, 3, 8)) <= 61 * 3
    for bad in ("per-layer:2/x", "per-layer:1/0/1", "per-layer:"):
        with pytest.raises(KVBudgetError):
            get_allocator(bad)
    with pytest.raises(KVBudgetError, match="2 shares given for 3"):
        get_allocator("per-layer:1/1")(60, 3, 8)


# --- budgets held: on the real default model, and composed with allocators and stores -----------


CONTEXT = ("The blue door code is 4821. Mira keeps her bicycle in the green shed behind the bakery. "
           "On Tuesdays the market sells pears, and the ferry leaves at noon from the north pier. ") * 6


def _assert_within_budget(policy, cache, block: int) -> None:
    """Entries per layer (per head, or per layer for heads sharing it) and bytes held within the
    budget, peak within budget + one block, and far below the full cache's bytes."""
    n_layers = len(cache.layers)
    budgets = policy.layer_budgets(cache.tokens, n_layers)
    heads = cache.config.num_key_value_heads
    for layer, b in zip(cache.layers, budgets):
        if policy.head_adaptive:  # heads share the layer's budget, stored ragged
            assert int(layer.lengths().sum()) <= b * heads
            continue
        assert layer.max_entries <= b
        assert layer.peak_entries <= max(b, cache.tokens) + block
    state = sum(4 * heads * b for b in budgets) * len(policy.scorer.state_names)  # float32 per entry
    assert cache.nbytes() <= sum(budgets) * kb.Policy.entry_bytes(cache) + state + 8 * heads * n_layers
    assert cache.nbytes() < cache.get_seq_length() * n_layers * kb.Policy.entry_bytes(cache) / 2


@pytest.mark.parametrize("name", METHODS)
def test_methods_hold_their_budget_in_a_session(default_model, name):
    model, tok = default_model
    session = kb.Session(model, tok, kb.policy(name, budget=64), block_size=64)
    session.add_context(CONTEXT)
    assert len(session.input_ids) > 280
    _assert_within_budget(session.policy, session.cache, 64)
    if name == "compactor":  # and decoding goes on from the compressed cache
        assert session.ask("What is the blue door code?", max_new_tokens=4)


@pytest.mark.parametrize("name", ["chunkkv+pyramid", "lagkv+kivi4", "compactor+kivi4", "criticaladakv",
                                  "expected-attention+head-adaptive", "curdkv+pyramid", "snapkv+per-layer:2/1/1"])
def test_methods_compose_with_allocators_and_stores(tiny_llama, name):
    policy = kb.policy(name, budget=24, **({"lag": 4} if name.startswith("lagkv") else {}))
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(150), block_size=16)
    _assert_within_budget(policy, cache, 16)
    if "+kivi4" in name:
        assert all(layer.entries.body is not None for layer in cache.layers)  # really held at 4 bits
    if "per-layer" in name:
        assert [layer.max_entries for layer in cache.layers] == [36, 18, 18]


# --- the stacked (all layers at once) path keeps what the per-layer loop keeps -------------------


def _prefill_decode(model, name: str, stack: bool, budget: int = 40):
    extra = {"lag": 8} if name.startswith("lagkv") else {}
    policy = kb.policy(name, budget=budget, decode_interval=5, **extra)
    use_batched(stack)
    cache = policy.new_cache(model)
    logits, _ = kb.prefill(model, cache, policy, random_ids(150), block_size=32)
    with torch.inference_mode():
        for step in range(10):
            logits = run(model, cache, logits.argmax(-1, keepdim=True)).logits[:, -1]
            if (step + 1) % 5 == 0:
                kb.compress(cache, policy)
    return cache


@pytest.mark.parametrize("name", METHODS + ["chunkkv+pyramid", "lagkv+pyramid", "finch+pyramid"])
def test_stacked_scoring_keeps_what_the_loop_keeps(tiny_llama, name):
    stacked, loop = _prefill_decode(tiny_llama, name, True), _prefill_decode(tiny_llama, name, False)
    for a, b in zip(stacked.layers, loop.layers):
        a, b = a.view(), b.view()
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert a.state.keys() == b.state.keys()
        for k in a.state:
            torch.testing.assert_close(a.state[k], b.state[k])
