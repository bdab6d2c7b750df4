"""DuoAttention (`duo`): the heads of a layer split on the fly into streaming heads (most attention
on sinks + recent) and retrieval heads, the pattern fixed at the layer's first compression; in a
session on the real default model streaming heads hold exactly sinks + recent, stored ragged (the
bytes drop), across turns, a save/load and the batching engine."""

import pytest
import torch

from conftest import random_ids
from server_kit import tiny_model

import kvbudget as kb
from kvbudget.compress import SCORERS, Observation
from kvbudget.errors import KVBudgetError
from kvbudget.kv.ragged import RaggedEntries
from kvbudget.runtime.models import load_tokenizer

CONTEXT = ("The blue door code is 4821. Mira keeps her bicycle in the green shed behind the bakery. "
           "On Tuesdays the market sells pears, and the ferry leaves at noon from the north pier. ") * 6
MORE = "Later that week the ferry changed its schedule and left at one from the south pier."


def _obs(attention: torch.Tensor, budget: int, state: dict | None = None) -> Observation:
    b, h, m, n = attention.shape
    obs = Observation(layer_idx=0, n_layers=1, keys=torch.zeros(b, h, n, 4), values=None,
                      positions=torch.arange(n).expand(b, h, n), valid=None, queries=None, query_positions=None,
                      scaling=0.5, budget=budget, seen=n, seed=0, state=state or {})
    obs.__dict__["attention"] = attention  # the window's attention, made by hand
    return obs


def test_heads_with_mass_on_sinks_and_recent_stream_and_the_pattern_stays():
    scorer = SCORERS["duo"](window=8)  # 4 heads, share 0.5: 2 stream
    sinks, recent = scorer.sizes(40)
    assert (sinks, recent) == (6, 14)  # 128 + 256 scaled to half the budget (20)
    att = torch.zeros(1, 4, 8, 100)
    att[0, 0, :, 50] = 1.0  # all on the middle: retrieval
    att[0, 1, :, 0], att[0, 1, :, 50] = 0.9, 0.1  # a sink: streams
    att[0, 2, :, 95], att[0, 2, :, 40] = 0.6, 0.4  # mostly recent: streams
    att[0, 3, :, 2], att[0, 3, :, 60] = 0.3, 0.7
    obs = _obs(att, budget=40)
    scores = scorer.score(obs)[0]
    kept = (torch.arange(100) < sinks) | (torch.arange(100) >= 100 - recent)
    for h in (1, 2):  # streaming heads: sinks + recent only
        assert torch.isinf(scores[h]).all() and (scores[h] > 0).eq(kept).all()
    assert torch.isfinite(scores[[0, 3]]).all()  # retrieval heads: SnapKV scores
    torch.testing.assert_close(scores[[0, 3]], SCORERS["snapkv"](window=8).score(_obs(att, 40))[0, [0, 3]])
    assert obs.state["duo"][0, :, 0].tolist() == [-1, 1, 1, -1]
    # Fixed after the first split: other attention does not change it.
    again = _obs(att.flip(1), budget=40, state={"duo": obs.state["duo"]})
    assert torch.isinf(scorer.score(again)[0, [1, 2]]).all()
    assert again.state["duo"][0, :, 0].tolist() == [-1, 1, 1, -1]
    # A layer under its budget is not split yet.
    under = _obs(att, budget=100)
    scorer.score(under)
    assert not under.state["duo"].any()


@pytest.mark.parametrize("share, heads, layers, want", [(0.5, 3, 30, 45), (0.75, 1, 8, 6), (0.5, 4, 5, 10),
                                                        (0.0, 3, 4, 0), (1.0, 2, 3, 6)])
def test_streaming_share_over_the_layers_is_the_target(share, heads, layers, want):
    scorer = SCORERS["duo"](streaming=share)
    quotas = [scorer.quota(i, heads) for i in range(layers)]
    assert sum(quotas) == want and all(0 <= q <= heads for q in quotas)
    assert max(quotas) - min(quotas) <= 1


def test_bad_options_are_clear_errors():
    with pytest.raises(KVBudgetError, match="streaming"):
        kb.policy("duo", budget=64, streaming=1.5)
    with pytest.raises(KVBudgetError, match="different numbers of entries"):
        kb.policy("duo+kivi4", budget=64)


@pytest.fixture(scope="module")
def session(default_model):
    model, tok = default_model
    s = kb.Session(model, tok, kb.policy("duo", budget=128), block_size=64)
    s.add_context(CONTEXT)
    return s


def _pattern(cache) -> list[list[bool]]:
    return [(layer.view().state["duo"][0].amax(-1) > 0).tolist() for layer in cache.layers]


def _check_held(cache, scorer, budget: int) -> None:
    """Streaming heads hold exactly sinks + recent, the layer within its budget, stored ragged."""
    sinks, recent = scorer.sizes(budget)
    seen = cache.get_seq_length()
    want = list(range(sinks)) + list(range(seen - recent, seen))
    for i, layer in enumerate(cache.layers):
        view, lens = layer.view(), layer.lengths()
        streams = view.state["duo"][0].amax(-1) > 0
        assert int(streams.sum()) == scorer.quota(i, layer.n_heads)
        for h in streams.nonzero().flatten().tolist():
            assert view.positions[0, h, : lens[h]].tolist() == want
        assert int(lens.sum()) <= budget * layer.n_heads
        assert isinstance(layer.entries, RaggedEntries) and layer.entries.keys.shape[0] == int(lens.sum())


def test_streaming_heads_hold_sinks_and_recent_and_the_bytes_drop(session):
    cache, scorer = session.cache, session.policy.scorer
    assert cache.get_seq_length() > 280 and cache.tokens == 128
    _check_held(cache, scorer, 128)
    # Bytes are the entries held; a uniform policy giving every head what the retrieval heads
    # keep would hold far more (masking would hold the whole context).
    per_entry = kb.Policy.entry_bytes(cache) // cache.config.num_key_value_heads + 4  # + the verdict state
    held = sum(int(layer.lengths().sum()) for layer in cache.layers) * per_entry
    uniform = sum(int(layer.lengths().max()) * layer.n_heads for layer in cache.layers) * per_entry
    assert held <= cache.nbytes() <= held + 8 * 3 * len(cache.layers)  # + the length tables
    assert cache.nbytes() < 0.7 * uniform
    assert all(int(layer.lengths().max()) > scorer.sizes(128)[0] + scorer.sizes(128)[1] for layer in cache.layers)


def test_the_pattern_survives_save_load_and_a_next_turn(session, tmp_path):
    before = _pattern(session.cache)
    path = tmp_path / "duo.kvb"
    session.save(path)
    loaded = kb.Session.load(path, session.model, session.tok)
    for a, b in zip(session.cache.layers, loaded.cache.layers):
        assert torch.equal(a.view().positions, b.view().positions)
        assert torch.equal(a.view().state["duo"], b.view().state["duo"])
    # The next turn (more context block-wise, a question, its answer) compresses again: the
    # pattern stays, streaming heads still hold only sinks + recent.
    loaded.add_context(MORE)
    loaded.ask("When does the ferry leave?", max_new_tokens=2)
    loaded.add_context(MORE)
    assert _pattern(loaded.cache) == before
    _check_held(loaded.cache, loaded.policy.scorer, 128)


def test_batched_with_other_sessions_equals_alone():
    tok = load_tokenizer()
    model = tiny_model(tok)
    text = CONTEXT[:450]
    sessions = [kb.Session(model, tok, kb.policy(n, budget=40, decode_interval=4), block_size=32, decode="eager")
                for n in ("duo", "snapkv")]
    for s in sessions:
        s.add_context(text)
    alone = [s.fork().ask_detailed("What is the door code?", 8).token_ids for s in sessions]
    engine = kb.Engine(model, tok)
    turns = [engine.submit(s, "What is the door code?", 8) for s in sessions]
    engine.run()
    assert [t.result().token_ids for t in turns] == alone
    assert isinstance(sessions[0].cache.layers[0].entries, RaggedEntries)


def test_sliding_window_layers_and_layer_allocators(tiny_gemma, tiny_llama):
    for model, name in ((tiny_gemma, "duo"), (tiny_llama, "duo+pyramid")):
        policy = kb.policy(name, budget=24)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, random_ids(150), block_size=16)
        for layer, b in zip(cache.layers, policy.layer_budgets(cache.tokens, len(cache.layers))):
            b = b if layer.window is None else min(b, layer.window - 1)
            assert int(layer.lengths().sum()) <= b * layer.n_heads
