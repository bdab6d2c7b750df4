"""The batching engine (`kb.Engine`): sessions decoded together give, token for token, the answers
they give alone, with mixed policies, budgets, stores and lengths; they join and leave the batch
at any step; long prompts are fed in blocks between decode steps; sampling, stop sequences and
cancellation behave per turn, and a turn told to stop stops between two blocks of its prompt."""

from contextlib import contextmanager

import pytest
import torch

import kvbudget as kb
from kvbudget.runtime.models import load_tokenizer
from kvbudget.runtime.turnsteps import TurnCancelled

from server_kit import tiny_model

TEXT = (
    "The harbour town of Vell keeps its lighthouse keeper's logbook in the library. In spring the "
    "fishing fleet returns with cod and herring, and the market opens at dawn. Mara, the keeper, "
    "writes that the blue door of the north tower is locked with the code 4817. Her brother Tomas "
    "repairs nets and sings in the tavern on Fridays. The ferry to the islands leaves at nine. "
) * 4

# (policy, its options, context characters, answer tokens): dense, evicting, streaming, a KIVI
# store, per-head lengths (Ada-KV), eviction + store, accumulated scores, key re-rotation (with
# uniform and per-head lengths); every evicting policy compresses while decoding (interval 4).
MIXED = [
    ("full", {}, 150, 6),
    ("snapkv", {"budget": 40, "decode_interval": 4}, 450, 9),
    ("streaming", {"budget": 32, "decode_interval": 4}, 300, 7),
    ("kivi4", {}, 350, 5),
    ("adakv", {"budget": 48, "decode_interval": 4}, 550, 8),
    ("snapkv+kivi2", {"budget": 48, "decode_interval": 4}, 400, 6),
    ("h2o", {"budget": 40, "decode_interval": 4}, 250, 9),
    ("streaming+rerotate", {"budget": 32, "decode_interval": 4}, 300, 7),
    ("adakv+rerotate", {"budget": 48, "decode_interval": 4}, 550, 8),
]
QUESTIONS = ["What is the code of the blue door?", "Who sings in the tavern?"]


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama over the default tokenizer, built with plain transformers."""
    tok = load_tokenizer()
    return tiny_model(tok), tok


def _session(model, tok, name, options, chars, block_size=32):
    session = kb.Session(model, tok, kb.policy(name, **options), block_size=block_size, decode="eager")
    session.add_context(TEXT[:chars])
    return session


def _pairs(model, tok, specs, block_size=32):
    """For each spec, a session with its context fed and an exact copy of it (one prefill)."""
    sessions = [_session(model, tok, name, options, chars, block_size) for name, options, chars, _ in specs]
    return sessions, [s.fork() for s in sessions]


def _same_cache(a, b) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    assert a.nbytes() == b.nbytes()
    assert a.peak_bytes == b.peak_bytes
    assert [layer.peak_entries for layer in a.layers] == [layer.peak_entries for layer in b.layers]
    for la, lb in zip(a.layers, b.layers):
        va, vb = la.view(), lb.view()
        assert torch.equal(va.positions, vb.positions)
        torch.testing.assert_close(va.keys, vb.keys, rtol=1e-4, atol=1e-4)


def test_batched_answers_equal_each_session_alone_tiny_model(tiny):
    """Seven sessions of different policies, budgets, stores and lengths: two turns each, decoded
    together (joining at different steps, leaving at different lengths) = each alone."""
    model, tok = tiny
    sessions, direct = _pairs(model, tok, MIXED)
    alone = [[d.ask_detailed(q, n).token_ids for q in QUESTIONS] for d, (*_, n) in zip(direct, MIXED)]
    engine = kb.Engine(model, tok, prefill_tokens=64)
    batched, batches = [[] for _ in MIXED], []
    for q in QUESTIONS:
        turns = []
        for (*_, n), session in zip(MIXED, sessions):
            turns.append(engine.submit(session, q, n))
            engine.step()  # the next one joins a batch already running
            batches.append(engine.last_batch)
        engine.run()
        for ids, turn in zip(batched, turns):
            ids.append(turn.result().token_ids)
    assert max(batches) >= 3, "sessions decoded together"
    for (name, *_), ids, lone, session, d in zip(MIXED, batched, alone, sessions, direct):
        assert ids == lone, name  # the batched turns are the lone turns, token for token
        assert session.messages == d.messages, name
        _same_cache(session.cache, d.cache)
    assert engine.decoded_tokens > engine.decode_steps  # more than one token per forward on average


def test_blocks_of_several_turns_go_through_one_forward(tiny, monkeypatch):
    """Every turn submitted at once: their questions' and answers' blocks (of different lengths)
    are fed together, right-padded in one forward, each compressed into its own cache = alone."""
    from kvbudget.runtime import engine as engine_module

    model, tok = tiny
    sessions, direct = _pairs(model, tok, MIXED, block_size=16)
    alone = [[d.ask_detailed(q, n).token_ids for q in QUESTIONS] for d, (*_, n) in zip(direct, MIXED)]
    widths = []
    real = engine_module.batch_forward

    def spy(model_, caches, tokens):
        widths.append([t.shape[-1] for t in tokens if isinstance(t, torch.Tensor)])
        return real(model_, caches, tokens)

    monkeypatch.setattr(engine_module, "batch_forward", spy)
    engine = kb.Engine(model, tok, prefill_tokens=1024)
    batched = [[] for _ in MIXED]
    for q in QUESTIONS:
        turns = [engine.submit(s, q, n) for (*_, n), s in zip(MIXED, sessions)]
        engine.run()
        for ids, turn in zip(batched, turns):
            ids.append(turn.result().token_ids)
    assert batched == alone
    for session, d in zip(sessions, direct):
        assert session.messages == d.messages
        _same_cache(session.cache, d.cache)
    fed = [w for w in widths if w]
    assert max(len(w) for w in fed) == len(MIXED), "every turn's block in one forward"
    assert any(len(set(w)) > 1 for w in fed), "blocks of different lengths padded together"


def test_batched_answers_equal_alone_default_model(default_model):
    """The real default model: an evicting session compressing while decoding and a KIVI one,
    decoded together = alone."""
    model, tok = default_model
    specs = [("snapkv", {"budget": 40, "decode_interval": 3}, 250, 6), ("kivi4", {}, 150, 4)]
    question = "What is the code of the blue door?"
    sessions, direct = _pairs(model, tok, specs, block_size=64)
    alone = [d.ask_detailed(question, n).token_ids for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok)
    turns = [engine.submit(s, question, n) for s, (*_, n) in zip(sessions, specs)]
    engine.run()
    assert [t.result().token_ids for t in turns] == alone
    assert [s.messages for s in sessions] == [d.messages for d in direct]
    assert engine.decode_steps < sum(n for *_, n in specs), "decoded in a shared batch"


def test_long_prompts_are_fed_in_blocks_between_decode_steps(tiny):
    """With a budget of one block per iteration, a long question holds the others up for one
    block at a time: they decode at every iteration while it is fed."""
    model, tok = tiny
    engine = kb.Engine(model, tok, prefill_tokens=32)
    short = [_session(model, tok, "snapkv", {"budget": 48}, 200) for _ in range(2)]
    turns = [engine.submit(s, "Hi?", 30) for s in short]
    while any(t.phase != "decode" for t in turns):
        engine.step()
    long_session = _session(model, tok, "full", {}, 100)
    long_turn = engine.submit(long_session, "Tell me again: " + TEXT[:800], 4)
    fed = []
    while long_turn.phase == "question":
        before = [len(t.tokens) for t in turns]
        engine.step()
        fed.append([len(t.tokens) - b for t, b in zip(turns, before)])
    assert len(fed) >= 5, "the long question took several iterations"
    assert all(step == [1, 1] for step in fed), fed
    assert engine.last_batch == 3, "the long turn joined the batch once its question was fed"
    engine.run()
    assert long_turn.result().token_ids


def test_sampling_with_a_seed_repeats_and_stop_sequences_cut(tiny):
    model, tok = tiny
    engine = kb.Engine(model, tok)
    base = _session(model, tok, "full", {}, 200)
    answers = []
    for seed in (7, 7, 8):
        turn = engine.submit(base.fork(), "Say something.", 12, temperature=1.0, top_p=0.9, seed=seed)
        engine.run()
        answers.append(turn.result().token_ids)
    assert answers[0] == answers[1] and answers[0] != answers[2]
    # A stop sequence: the answer is cut before it and the turn ends there.
    session = base
    greedy = engine.submit(session.fork(), "Say something.", 12)
    engine.run()
    text = greedy.result().text
    stop = text.split()[2]
    cut = engine.submit(session, "Say something.", 12, stop=[stop])
    engine.run()
    assert cut.result().text == text[: text.find(stop)].strip() and cut.finish_reason == "stop"
    assert len(cut.result().token_ids) < len(greedy.result().token_ids)
    assert session.messages[-1] == {"role": "assistant", "content": cut.result().text}


def test_a_cancelled_turn_ends_and_the_others_go_on(tiny):
    model, tok = tiny
    engine = kb.Engine(model, tok)
    sessions = [_session(model, tok, "snapkv", {"budget": 48}, 300) for _ in range(2)]
    alone = sessions[1].fork()
    expected = alone.ask_detailed("Hi?", 10).token_ids
    turns = [engine.submit(s, "Hi?", 10) for s in sessions]
    engine.step()
    engine.step()
    turns[0].cancel()
    engine.run()
    with pytest.raises(TurnCancelled):
        turns[0].result()
    assert turns[1].result().token_ids == expected
    with pytest.raises(kb.KVBudgetError, match="in flight"):
        engine.submit(sessions[1], "a", 2)
        engine.submit(sessions[1], "b", 2)


def test_a_turn_whose_rollback_fails_ends_with_its_own_error(tiny):
    """A turn stopped while decoding whose rollback fails too (the device out of memory while a
    snapshot is put back) ends with its own error; the engine goes on: the turn beside it answers
    as alone, and an engine step that raises outside any turn (`abort`) ends the turns in flight
    with that error and leaves the engine ready for new turns."""
    model, tok = tiny
    engine = kb.Engine(model, tok)
    broken, other = (_session(model, tok, "snapkv", {"budget": 48}, 300) for _ in range(2))
    expected = other.fork().ask_detailed("Hi?", 8).token_ids
    scratch = broken.cache.scratch

    @contextmanager
    def failing_rollback(*args, **kwargs):
        with scratch(*args, **kwargs):
            yield
        raise torch.OutOfMemoryError("no room to put the snapshot back")

    broken.cache.scratch = failing_rollback
    chosen = []

    def check() -> None:
        if len(chosen) >= 3:
            raise TurnCancelled("the client went away")

    bad = engine.submit(broken, "Hi?", 8, on_token=chosen.append, check=check)
    good = engine.submit(other, "Hi?", 8)
    engine.run()
    with pytest.raises(TurnCancelled, match="went away"):
        bad.result()
    assert good.result().token_ids == expected
    # A step that failed outside any turn: every turn waiting or in flight ends with its error.
    fresh = _session(model, tok, "snapkv", {"budget": 48}, 300)
    turns = [engine.submit(s, "Hi?", 8) for s in (fresh, _session(model, tok, "snapkv", {"budget": 48}, 300))]
    engine.step()
    engine.abort(RuntimeError("the step failed"))
    assert not engine.busy and not engine.slots
    for turn in turns:
        with pytest.raises(RuntimeError, match="the step failed"):
            turn.result()
    again = engine.submit(other.fork(), "Hi?", 4)
    engine.run()
    assert len(again.result().token_ids) == 4


def test_a_turn_stops_between_the_blocks_of_its_prompt(tiny):
    """A turn whose ``check`` raises (a server's client gone) stops before its next prompt
    block: the rest of a long question is never fed and no token is chosen; the turn decoding
    beside it answers as alone."""
    model, tok = tiny
    engine = kb.Engine(model, tok, prefill_tokens=32)
    other, long_session = (_session(model, tok, "snapkv", {"budget": 48}, 300) for _ in range(2))
    expected = other.fork().ask_detailed("Hi?", 8).token_ids
    start = long_session.tokens_seen

    class Gone(Exception):
        pass

    def check() -> None:
        if long_session.tokens_seen >= start + 64:
            raise Gone("the client went away")

    stopped = engine.submit(long_session, "Tell me again: " + TEXT[:800], 8, check=check)
    answered = engine.submit(other, "Hi?", 8)
    engine.run()
    with pytest.raises(Gone):
        stopped.result()
    assert long_session.tokens_seen == start + 64, "two blocks of the ~190-token question, not all of it"
    assert stopped.tokens == []
    assert answered.result().token_ids == expected
