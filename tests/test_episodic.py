"""EpiCache: windows, deterministic clustering, routing, per-episode caches within budget,
the sensitivity profile and allocator, and the conversation generator."""

import pytest
import torch
from conftest import random_ids

import kvbudget as kb
from kvbudget.runtime.episodic import EpisodicSession, cluster, conversation_windows, embed, medoids, route
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


def test_episodic_session_caches_stay_within_budget(default_model):
    """Two episodes of a short conversation: each cache within its budget, peak entries within
    budget + block during its prefill (the patched prompt is attended, never stored), and a
    question answered from the routed episode's cache only."""
    model, tok = default_model
    task = make_tasks("conversation", tok, n=1, length=500, seed=1)[0]
    policy = kb.policy("epicache", budget=96, episodes=2, medoids=2)
    session = kb.Session(model, tok, policy, block_size=64)
    assert isinstance(session, EpisodicSession) and policy.name == "epicache"
    stats = session.add_context(task.context)
    assert len(session.episodes) == 2 and stats.blocks == 2 * -(-stats.tokens // 64)
    layer_budgets = session.policy.layer_budgets(session.tokens, 30, session.sensitivity)
    for ep in session.episodes:
        for layer, b in zip(ep.cache.layers, layer_budgets):
            assert int(layer.lengths().sum()) <= b * layer.n_heads  # heads share the layer's budget
        assert ep.cache.peak_entries() <= max(layer_budgets) * 3 + 64  # 3 KV heads share it
    assert session.stored_bytes == sum(ep.cache.nbytes() for ep in session.episodes)
    q = task.questions[0]
    turn = session.ask_detailed(q.question, max_new_tokens=8, gold=q.answers[0], history_answer=q.answers[0])
    assert session.routed and turn.answer_logprob is not None
    # The turn went into every episode's cache.
    assert all(ep.cache.get_seq_length() == len(session.input_ids) for ep in session.episodes)


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
