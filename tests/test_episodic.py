"""EpiCache: windows, deterministic clustering, routing, per-episode caches within budget, the
shared prefill (union bound, its cost), the sensitivity profile and allocator, and the
conversation generator."""

import pytest
import torch
from conftest import random_ids

import kvbudget as kb
from kvbudget.runtime.episodic import (EpisodicSession, UnionCompressor, cluster, conversation_windows, embed, medoids,
                                      prompt_queries, route)
from kvbudget.runtime.prefill import prefill
from kvbudget.eval.generators import make_tasks
from kvbudget.runtime.profile import block_mask, load_scores, profile
from kvbudget.compress.allocation import sensitivity_budgets as budgets

TOPICS = {
    "pets": ["My dog Biscuit chewed the sofa again.", "The vet said the puppy needs shots.",
             "We bought a new leash and a dog bed.", "The cat sleeps on the windowsill all day."],
    "travel": ["We booked flights to Lisbon for June.", "The train to the coast was delayed.",
               "I packed two suitcases for the trip.", "The hotel near the beach had a pool."],
    "work": ["My manager moved the meeting to Friday.", "The quarterly report is due soon.",
             "I answered emails all morning at the office.", "We hired two new engineers."],
}


def _chat():
    messages = []
    for topic, lines in TOPICS.items():
        for line in lines:
            messages += [{"role": "user", "content": line}, {"role": "assistant", "content": "I see."}]
    return messages


def test_windows_render_utterances_and_paragraphs():
    windows = conversation_windows(_chat(), conv_window=4)
    assert len(windows) == 6 and windows[0].startswith('User said, "My dog Biscuit')
    assert 'Assistant said, "I see."' in windows[0]
    assert conversation_windows("one\n\ntwo\n\n\nthree") == ["one", "two", "three"]


def test_clustering_is_deterministic_and_routing_finds_the_topic():
    windows = conversation_windows(_chat(), conv_window=2)  # one topic per window pair
    vectors = embed(windows)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(len(windows)))
    labels, centroids = cluster(vectors, 3, seed=0)
    again, _ = cluster(vectors, 3, seed=0)
    assert torch.equal(labels, again)
    # Windows of one topic share a cluster.
    assert len(set(labels[0:4].tolist())) == 1 and len(set(labels[4:8].tolist())) == 1
    question = embed(["What is my dog called?"])[0]
    assert route(question, centroids) == int(labels[0])
    assert route(embed(["When is the quarterly report due?"])[0], centroids) == int(labels[8])
    picked = medoids(vectors, labels, centroids, 2)
    assert all(len(p) == 2 and all(int(labels[i]) == c for i in p) for c, p in enumerate(picked))


def test_llm_embedder_needs_the_model():
    with pytest.raises(kb.KVBudgetError, match="needs the model"):
        embed(["x"], "llm")


def test_sensitivity_budgets_follow_the_formula():
    scores = [0.0, 0.01, 0.02, 0.04]
    out = budgets(100, scores, alpha=1.0, floor=16)
    assert sum(out) <= 400 and sum(out) >= 400 - 4
    free = (100 - 16) * 4
    weights = [s / sum(scores) for s in scores]
    assert out == [16 + int(free * w) for w in weights]
    assert budgets(100, scores, alpha=0.0, floor=16) == [100] * 4  # alpha 0: uniform


def test_profile_measures_block_sensitivity(tiny_llama):
    mask = block_mask(8, 4, sinks=1)[0, 0]
    assert bool(mask[5, 0]) and not bool(mask[5, 1]) and bool(mask[5, 2]) and not bool(mask[2, 3])
    data = profile(tiny_llama, random_ids(200), block=32, sinks=4)
    s = data["sensitivity"]
    assert len(s) == 3 and s[0] < 1e-4 < s[1]  # layer 0's keys do not depend on attention


def test_default_model_ships_its_profile(default_model):
    model, _ = default_model
    scores = load_scores(model)
    assert len(scores) == 30 and all(x > 0 for x in scores)


def test_episodic_session_caches_stay_within_budget(default_model, monkeypatch):
    """Two episodes of a short conversation, one prefill shared by them: each cache within its
    budget, the shared cache within E x budget after every block (the patched prompts are
    attended, never stored), and a question answered from the routed episode's cache only."""
    model, tok = default_model
    task = make_tasks("conversation", tok, n=1, length=500, seed=1)[0]
    policy = kb.policy("epicache", budget=96, episodes=2, medoids=2)
    session = kb.Session(model, tok, policy, block_size=64)
    assert isinstance(session, EpisodicSession) and policy.name == "epicache"
    held = []  # after each block: entries per layer of the shared cache
    call = UnionCompressor.__call__

    def recording(self, union, policy):
        call(self, union, policy)
        held.append([layer.total_entries() for layer in union.layers])

    monkeypatch.setattr(UnionCompressor, "__call__", recording)
    stats = session.add_context(task.context)
    assert len(session.episodes) == 2 and stats.blocks == -(-stats.tokens // 64) == len(held)  # one prefill
    layer_budgets = session.policy.layer_budgets(session.tokens, 30, session.sensitivity)
    for ep in session.episodes:
        for layer, b in zip(ep.cache.layers, layer_budgets):
            assert int(layer.lengths().sum()) <= b * layer.n_heads  # heads share the layer's budget
        assert ep.cache.get_seq_length() == stats.tokens and ep.cache.layers[0].device.type == "cpu"
    # The union bound: at most E x budget per layer before the next block, and it binds (the
    # episodes chose differently, and the union holds more than one episode's choice).
    assert all(n <= 2 * b * 3 for step in held for n, b in zip(step, layer_budgets))
    assert any(n > b * 3 for n, b in zip(held[-1], layer_budgets))
    assert session.stored_bytes == sum(ep.cache.nbytes() for ep in session.episodes) > session.kv_bytes
    q = task.questions[0]
    turn = session.ask_detailed(q.question, max_new_tokens=8, gold=q.answers[0], history_answer=q.answers[0])
    assert session.routed and turn.answer_logprob is not None
    # The turn went into every episode's cache.
    assert all(ep.cache.get_seq_length() == len(session.input_ids) for ep in session.episodes)


def test_shared_prefill_costs_at_most_twice_one_prefill(default_model):
    """EpiCache's prefill runs the model over at most 1.5x the tokens of a plain SnapKV block-wise
    prefill of the same context at the same budget (counted, not timed): one pass over the
    context plus the patched prompts, cut to a quarter of it. E prefills would be 4x or more."""
    model, tok = default_model
    task = make_tasks("conversation", tok, n=1, length=400, seed=2)[0]
    fed = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(kwargs["input_ids"].numel()),
                                           with_kwargs=True)
    try:
        counts = {}
        for name in ("snapkv", "epicache"):
            fed.clear()
            session = kb.Session(model, tok, kb.policy(name, budget="4x"), block_size=128)
            stats = session.add_context(task.context)
            counts[name] = sum(fed)
    finally:
        hook.remove()
    assert counts["snapkv"] == stats.tokens
    assert len(session.episodes) == 4 and counts["epicache"] <= 1.5 * counts["snapkv"]
    assert sum(ep.prompt_ids.shape[1] for ep in session.episodes) <= 0.25 * stats.tokens + 4


def test_union_compressor_bounds_the_shared_cache(tiny_llama):
    """A tiny random model: three episodes, each scored by its own prompt's queries, choose from
    one shared cache; after every block it holds at most 3 x budget entries per head, and each
    episode ends with its own choice (within the budget, different from the others')."""
    policy = kb.policy("epicache", budget=16, allocator="uniform", heads="uniform")
    ids = random_ids(160)
    caches = [policy.new_cache(tiny_llama) for _ in range(3)]
    queries = [prompt_queries(tiny_llama, policy.new_cache(tiny_llama), random_ids(12, seed=s), at=160) for s in (1, 2, 3)]
    compressor = UnionCompressor(caches, queries, 160)
    union = policy.new_cache(tiny_llama)
    for layer in union.layers:
        layer.observed.keep = 0
    held = []
    original = compressor.__class__.__call__

    def step(cache, pol):
        original(compressor, cache, pol)
        held.append(max(layer.max_entries for layer in cache.layers))

    prefill(tiny_llama, union, policy, ids, block_size=32, compressor=step)
    compressor.finish(union)
    assert len(held) == 5 and max(held) <= 3 * 16 and held[-1] > 16
    kept = [tuple(c.layers[1].view().positions[0, 0].tolist()) for c in caches]
    assert all(len(k) == 16 for k in kept) and len(set(kept)) > 1
    assert all(c.get_seq_length() == 160 for c in caches)


def test_prompt_share_must_be_a_share():
    with pytest.raises(kb.KVBudgetError, match="prompt_share"):
        kb.policy("epicache", budget=32, prompt_share=0)


def test_conversation_generator_is_seeded_sized_and_answerable(default_model):
    _, tok = default_model
    a = make_tasks("conversation", tok, n=2, length=600, seed=3)
    b = make_tasks("conversation", tok, n=2, length=600, seed=3)
    assert [t.context for t in a] == [t.context for t in b]
    from kvbudget.eval.runner import context_tokens

    for task in a:
        assert abs(context_tokens(tok, task) - 600) <= 30
        text = " ".join(m["content"] for m in task.context)
        cats = {q.category for q in task.questions}
        assert cats == {"single-hop", "update", "two-hop", "temporal"}
        for q in task.questions:
            answer = q.answers[0]
            if q.category == "temporal":
                assert f"[Session {answer.split()[-1]} -" in text
            else:
                assert answer in text
