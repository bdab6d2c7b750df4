"""The batching engine's static batch (`runtime.slots`), forced on the CPU with ``decode="static"``
(the slot logic the CUDA graphs replay; only capture and replay are CUDA's): sessions of mixed
policies, budgets, stores and lengths joining and leaving at any step, growing and shrinking the
bucket, compressing while decoding, answer token for token what each answers alone and what
the eager engine answers; a row a slot cannot take decodes eagerly in the same step."""

import pytest
import torch

import kvbudget as kb
from kvbudget.errors import KVBudgetError
from kvbudget.runtime.models import load_tokenizer
from kvbudget.runtime.slots import SlotBatch

from server_kit import tiny_model
from test_engine import MIXED, QUESTIONS, _pairs, _same_cache, _session


@pytest.fixture(scope="module")
def tiny():
    tok = load_tokenizer()
    return tiny_model(tok), tok


def _watch(engine: kb.Engine, record: list) -> None:
    """Record, after each step, (slots in use, the bucket of the step) of every static batch."""
    step = engine.step

    def watched() -> None:
        step()
        record.append({key[0] is not None: (len(b.live), b.span) for key, b in engine.slots.items()})

    engine.step = watched


def _serve(engine, sessions, specs, questions, record=None):
    """Each question to every session, submitted one step apart; the answers' token ids."""
    if record is not None:
        _watch(engine, record)
    out = [[] for _ in sessions]
    for q in questions:
        turns = []
        for (*_, n), session in zip(specs, sessions):
            turns.append(engine.submit(session, q, n))
            engine.step()
        engine.run()
        for ids, turn in zip(out, turns):
            ids.append(turn.result().token_ids)
    return out


def test_static_slots_equal_eager_engine_and_each_session_alone(tiny):
    """Seven sessions (dense, evicting with decode-time compression, streaming, KIVI, Ada-KV
    ragged, eviction + KIVI, H2O), joining one step apart: the static batch's answers = the eager engine's
    = each session alone, and the caches afterwards are the same."""
    model, tok = tiny
    sessions, direct = _pairs(model, tok, MIXED)
    eager_sessions = [s.fork() for s in sessions]
    alone = [[d.ask_detailed(QUESTIONS[0], n).token_ids] for d, (*_, n) in zip(direct, MIXED)]
    record: list = []
    static = _serve(kb.Engine(model, tok, prefill_tokens=64, decode="static"), sessions, MIXED, QUESTIONS[:1], record)
    eager = _serve(kb.Engine(model, tok, prefill_tokens=64, decode="eager"), eager_sessions, MIXED, QUESTIONS[:1])
    # Dense/ragged rows shared one batch, the KIVI rows another (two KIVI settings: two more).
    assert max(r.get(False, (0, 0))[0] for r in record) >= 3, record
    assert max(r.get(True, (0, 0))[0] for r in record) >= 1, record
    for (name, *_), s, e, lone, session, d in zip(MIXED, static, eager, alone, sessions, direct):
        assert s == lone == e, name
        assert session.messages == d.messages, name
        _same_cache(session.cache, d.cache)
        assert not any(layer.borrowed for layer in session.cache.layers), "the slot was released"


def test_bucket_grows_then_shrinks_and_rows_move_down(tiny):
    """Five evicting sessions joining one step apart fill buckets of 1, 2, 4 and 8 slots (the
    slots re-filled at each growth); as the short answers end, the batch shrinks back by moving
    the rows left into lower slots; every answer = alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 5}, 200 + 60 * i, n)
             for i, n in enumerate((8, 30, 10, 12, 30))]
    sessions, direct = _pairs(model, tok, specs)
    alone = [[d.ask_detailed(QUESTIONS[0], n).token_ids] for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok, prefill_tokens=64, decode="static")
    record: list = []
    assert _serve(engine, sessions, specs, QUESTIONS[:1], record) == alone
    used, buckets = zip(*[r[False] for r in record if r.get(False, (0, 0))[0]])
    assert buckets[:5] == (1, 2, 4, 4, 8) and max(used) == 5, record
    assert used[-1] == 1 and buckets[-1] == 1, "shrunk to the rows left"
    assert 2 in buckets[5:], record
    assert not engine.slots, "the static buffers go once the engine is idle"


def test_a_burst_of_turns_grows_the_slots_once(tiny):
    """Five turns submitted together: the first to join sizes the buffers for the others
    started with it (one allocation of 8 slots, not one per power of two); answers = alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 5}, 200 + 40 * i, 8) for i in range(5)]
    sessions, direct = _pairs(model, tok, specs)
    alone = [d.ask_detailed(QUESTIONS[0], n).token_ids for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok, decode="static")
    turns = [engine.submit(s, QUESTIONS[0], n) for s, (*_, n) in zip(sessions, specs)]
    batches = []
    while engine.busy:
        engine.step()
        batches += [b for b in engine.slots.values() if b not in batches]
    assert [t.result().token_ids for t in turns] == alone
    assert len(batches) == 1 and batches[0].allocations == 1 and len(batches[0].rows) == 8


def test_the_slots_outlast_an_idle_moment_until_released(tiny):
    """Turns that come after the engine went idle decode in the slots it kept (no new allocation:
    on CUDA its graphs stay with them); `release_slots` drops idle slots and returns their
    bytes, and `run` releases them at its end. Answers = alone, round after round."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 5}, 200 + 40 * i, 8) for i in range(3)]
    sessions, direct = _pairs(model, tok, specs)
    alone = [[d.ask_detailed(q, n).token_ids for q in QUESTIONS[:2]] for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok, decode="static")
    got, kept = [[] for _ in sessions], []
    for q in QUESTIONS[:2]:
        turns = [engine.submit(s, q, n) for s, (*_, n) in zip(sessions, specs)]
        while engine.busy:
            engine.step()
        for ids, turn in zip(got, turns):
            ids.append(turn.result().token_ids)
        (batch,) = engine.slots.values()
        assert not batch.live and engine.slot_bytes == batch.nbytes > 0, "idle: the slots stay"
        kept.append(batch)
    assert got == alone
    assert kept[0] is kept[1] and kept[1].allocations == 1, "the second round reused the first's slots"
    assert engine.release_slots() == kept[1].nbytes and not engine.slots and engine.slot_bytes == 0
    assert engine.release_slots() == 0
    engine.submit(sessions[0], "And the green door?", 4)
    engine.run()
    assert not engine.slots, "run releases them at its end"


def test_unsupported_row_decodes_eagerly_beside_the_slots(tiny):
    """A MiKV row (a store the static buffers do not hold) decodes eagerly in the same step as
    the slots' rows; both answer as alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 4}, 300, 8), ("mikv", {"budget": 48}, 300, 8),
             ("full", {}, 200, 8)]
    sessions, direct = _pairs(model, tok, specs)
    alone = [[d.ask_detailed(QUESTIONS[1], n).token_ids] for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok, decode="static")
    turns = [engine.submit(s, QUESTIONS[1], n) for s, (*_, n) in zip(sessions, specs)]
    while not all(t.phase == "decode" for t in turns):
        engine.step()
    engine.step()
    assert [t.row is not None for t in turns] == [True, False, True]
    assert engine.last_batch == 3
    engine.run()
    assert [[t.result().token_ids] for t in turns] == alone


def test_slots_ask_make_room_before_they_grow_and_a_refused_turn_waits_for_a_slot(tiny):
    """``make_room`` is asked, before each growth, with the bytes every slot batch then holds
    (what is allocated: the dense and the KIVI layouts' batches); once it refuses, the joining
    session waits for a slot an ending answer frees (asked again at each step meanwhile), and
    none decodes eagerly; every answer = alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 4}, 300, 10), ("kivi4", {}, 200, 10),
             ("h2o", {"budget": 40}, 250, 10), ("full", {}, 220, 10), ("streaming", {"budget": 40}, 260, 10)]
    sessions, direct = _pairs(model, tok, specs)
    alone = [[d.ask_detailed(QUESTIONS[0], n).token_ids] for d, (*_, n) in zip(direct, specs)]
    asked: list[int] = []
    engine = kb.Engine(model, tok, decode="static", make_room=lambda nbytes: asked.append(nbytes) or len(asked) <= 3)
    grown: list[int] = []
    step = engine.step

    def watched() -> None:
        before = len(asked)
        step()
        if len(asked) > before and len(asked) <= 3:
            grown.append(engine.slot_bytes)

    engine.step = watched
    turns = []
    for session, (*_, n) in zip(sessions, specs):
        turns.append(engine.submit(session, QUESTIONS[0], n))
        for _ in range(3):
            engine.step()
    engine.run()
    assert [[t.result().token_ids] for t in turns] == alone
    assert asked[:3] == grown and asked[0] < asked[1] < asked[2], (asked, grown)
    assert len(asked) > 4 and len(set(asked[3:])) == 1, "the waiting turn asked again at each step"
    assert not any(t.eager for t in turns)


def test_a_refused_growth_halves_then_the_others_wait_for_a_slot(tiny):
    """Five turns submitted together, the first with the longest answer (the buffers' sizes hold
    the others): the slots ask for 8, then 4, then 2 (taken); the three others wait, their first
    token not chosen, and take the slots the first answers free. At
    no step are more than 2 sessions decoding, none eagerly; every answer = alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 5}, 200 + 40 * i, n) for i, n in enumerate((9, 6, 8, 7, 5))]
    sessions, direct = _pairs(model, tok, specs)
    alone = [d.ask_detailed(QUESTIONS[0], n).token_ids for d, (*_, n) in zip(direct, specs)]
    asked: list[int] = []

    def room(nbytes: int) -> bool:  # refuses twice, then takes what it is asked at most
        asked.append(nbytes)
        return len(asked) > 2 and nbytes <= asked[2]

    engine = kb.Engine(model, tok, decode="static", make_room=room)
    turns = [engine.submit(s, QUESTIONS[0], n) for s, (*_, n) in zip(sessions, specs)]
    batches, waited, chosen = [], 0, []
    while engine.busy:
        engine.step()
        batches += [b for b in engine.slots.values() if b not in batches]
        assert engine.last_batch <= 2
        waited += any(t.phase == "decode" and t.row is None for t in turns)
        chosen.append([len(t.tokens) for t in turns])
    assert [t.result().token_ids for t in turns] == alone
    assert asked[0] > asked[1] > asked[2], asked
    assert len(batches) == 1 and batches[0].allocations == 1 and len(batches[0].rows) == 2
    assert waited and not any(t.eager for t in turns)
    assert engine.slot_waits >= waited and engine.eager_tokens == 0
    assert any(0 in c[2:] and c[0] > 1 for c in chosen), "a waiting turn chose no token"


def test_a_refused_growth_with_no_session_in_a_slot_decodes_eagerly(tiny):
    """Where ``make_room`` refuses the first slots (no answer in the batch would free one), the
    turns decode eagerly, and answer as alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 5}, 200 + 40 * i, 8) for i in range(3)]
    sessions, direct = _pairs(model, tok, specs)
    alone = [d.ask_detailed(QUESTIONS[0], n).token_ids for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok, decode="static", make_room=lambda nbytes: False)
    turns = [engine.submit(s, QUESTIONS[0], n) for s, (*_, n) in zip(sessions, specs)]
    engine.run()
    assert [t.result().token_ids for t in turns] == alone
    assert all(t.eager for t in turns) and engine.last_batch == 3 and not engine.slot_bytes
    assert engine.eager_tokens == engine.decoded_tokens > 0 and engine.slot_waits == 0


def test_cancelled_row_frees_its_slot_and_the_others_go_on(tiny):
    model, tok = tiny
    specs = [("snapkv", {"budget": 40, "decode_interval": 4}, 300, 12), ("h2o", {"budget": 40}, 250, 12)]
    sessions, direct = _pairs(model, tok, specs)
    alone = direct[1].ask_detailed(QUESTIONS[0], 12).token_ids
    engine = kb.Engine(model, tok, decode="static")
    turns = [engine.submit(s, QUESTIONS[0], n) for s, (*_, n) in zip(sessions, specs)]
    while turns[0].phase != "decode":
        engine.step()
    asked = sessions[0].cache.get_seq_length()  # the question fed
    while len(turns[0].tokens) < 6:  # past a compression (interval 4): decoded entries written back
        engine.step()
    assert sessions[0].cache.get_seq_length() > asked
    turns[0].cancel()
    engine.run()
    with pytest.raises(Exception, match="cancelled"):
        turns[0].result()
    assert turns[1].result().token_ids == alone
    assert not any(layer.borrowed for layer in sessions[0].cache.layers)
    assert sessions[0].cache.get_seq_length() == asked, "the decoded entries were rolled back"


def test_default_model_static_batch_equals_alone(default_model):
    """The real default model: an evicting session compressing while decoding and a KIVI one in
    the static batch (two layouts) = alone."""
    model, tok = default_model
    specs = [("snapkv", {"budget": 40, "decode_interval": 3}, 250, 6), ("kivi4", {}, 150, 4)]
    question = "What is the code of the blue door?"
    sessions, direct = _pairs(model, tok, specs, block_size=64)
    alone = [d.ask_detailed(question, n).token_ids for d, (*_, n) in zip(direct, specs)]
    engine = kb.Engine(model, tok, decode="static")
    turns = [engine.submit(s, question, n) for s, (*_, n) in zip(sessions, specs)]
    engine.run()
    assert [t.result().token_ids for t in turns] == alone
    assert [s.messages for s in sessions] == [d.messages for d in direct]


def test_decode_modes_are_checked(tiny):
    model, tok = tiny
    with pytest.raises(KVBudgetError, match="unknown decode mode"):
        kb.Engine(model, tok, decode="fast")
    with pytest.raises(KVBudgetError, match="needs a CUDA device"):
        kb.Engine(model, tok, decode="graph")
    assert not kb.Engine(model, tok).static, "eager by default on the CPU"


def test_slot_batch_rejects_a_step_missing_a_row(tiny):
    model, tok = tiny
    sessions, _ = _pairs(model, tok, MIXED[1:2] * 2)
    batch = SlotBatch(model, graph=False)
    rows = [batch.join(s.cache, 8) for s in sessions]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="every session in a slot"):
        batch.step(rows[:1], [1])
    for row in rows:
        row.release()
    assert not batch.live


def test_slots_that_cannot_grow_fail_their_turns_and_start_afresh(tiny, monkeypatch):
    """Out of device memory while the slots grow (left half re-allocated): the joining turn and
    the turns in those slots fail with that error (a server answers 503 and reloads their
    sessions' files); the next turns get fresh slots and answer as alone."""
    model, tok = tiny
    specs = [("snapkv", {"budget": 40}, 300, 6)] * 3
    sessions, direct = _pairs(model, tok, specs)
    alone = [d.fork().ask_detailed(QUESTIONS[1], 6).token_ids for d in direct]
    engine = kb.Engine(model, tok, decode="static")
    real = SlotBatch._regrow

    def regrow(batch, sample, slots, dims, query_slots):
        if slots > 1 and not regrow.failed:
            regrow.failed = True
            batch.buffers = batch.buffers[:1]  # as an allocation failing half-way leaves them
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, sample, slots, dims, query_slots)

    regrow.failed = False
    monkeypatch.setattr(SlotBatch, "_regrow", regrow)
    first = [engine.submit(sessions[0], QUESTIONS[0], 6)]
    while first[0].row is None:  # in its slot, alone
        engine.step()
    first += [engine.submit(s, QUESTIONS[0], 6) for s in sessions[1:]]  # the next growth fails
    engine.run()
    errors = [t.error for t in first]
    assert [isinstance(e, torch.OutOfMemoryError) for e in errors] == [True, True, False], errors
    second = [engine.submit(d.fork(), QUESTIONS[1], 6) for d in direct]
    engine.run()
    assert [t.result().token_ids for t in second] == alone


def test_a_slot_whose_release_fails_is_freed_and_the_others_decode_on(tiny, monkeypatch):
    """Out of device memory while a leaving answer's layers take their own copies of the slot:
    that turn fails with the error, its slot is freed all the same, and the turns still decoding
    beside it answer as alone (a slot left taken would fail every later step of its batch)."""
    from kvbudget.runtime.static import StaticLayer

    model, tok = tiny
    specs = [("snapkv", {"budget": 40}, 300, n) for n in (3, 9, 9)]
    sessions, direct = _pairs(model, tok, specs)
    alone = [d.ask_detailed(QUESTIONS[0], n).token_ids for d, (*_, n) in zip(direct, specs)]
    victim = sessions[0].cache.layers
    real = StaticLayer.release

    def release(static, layer):
        if release.armed and any(layer is v for v in victim):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(static, layer)

    release.armed = False  # armed once every turn is in its slot: the victim's leave fails
    monkeypatch.setattr(StaticLayer, "release", release)
    engine = kb.Engine(model, tok, decode="static")
    turns = [engine.submit(s, QUESTIONS[0], n) for s, (*_, n) in zip(sessions, specs)]
    while engine.busy:
        engine.step()
        release.armed = release.armed or all(t.row is not None for t in turns)
        for batch in engine.slots.values():
            assert len(batch.live) == sum(t.row is not None and t.row.batch is batch for t in turns)
    assert isinstance(turns[0].error, torch.OutOfMemoryError)
    assert [t.result().token_ids for t in turns[1:]] == alone[1:]


@pytest.mark.parametrize("name, options, chars, n", [
    ("snapkv", {"budget": 40, "decode_interval": 4}, 450, 9),  # evicting while decoding: written back, reloaded
    ("h2o", {"budget": 40, "decode_interval": 4}, 250, 9),  # with per-entry state
    ("streaming", {"budget": 32, "decode_interval": 4}, 300, 7),
    ("full", {}, 150, 6),
])
def test_a_dense_session_in_a_slot_reads_nothing_back_but_its_first_token(tiny, name, options, chars, n):
    """Joining a slot, decoding, compressing while decoding (write-back, compression, reload) and
    leaving read nothing back from the device for a dense session: its sizes are known on the
    host. The one read per turn is its first token, chosen from the prompt's logits (then one
    read per step gives every row's token). On CUDA each read waits for the queued work."""
    model, tok = tiny
    session = _session(model, tok, name, options, chars)
    engine = kb.Engine(model, tok, prefill_tokens=64, decode="static")
    decode, reads = engine._decode, []

    def watched() -> bool:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            decoded = decode()
        reads.extend(e.name for e in prof.events() if e.name in ("aten::_local_scalar_dense", "aten::nonzero"))
        return decoded

    engine._decode = watched
    for question in QUESTIONS:
        turn = engine.submit(session, question, n)
        engine.run()
        assert not turn.eager and len(turn.result().token_ids) == n  # it decoded in a slot
    assert reads == ["aten::_local_scalar_dense"] * len(QUESTIONS), reads


@pytest.mark.parametrize("seed", [0, 6])  # seeds where turns both wait and go eagerly
def test_slots_under_a_bound_that_refuses_at_random_answer_as_alone(tiny, seed):
    """The mixed sessions of `test_engine.MIXED`, submitted at random steps, under a ``make_room``
    that refuses half its asks at random: turns wait, go eagerly or take slots as it falls, and
    every answer and cache is the one the session gives alone; the engine ends idle, no slot left
    taken."""
    model, tok = tiny
    sessions, direct = _pairs(model, tok, MIXED)
    alone = [d.ask_detailed(QUESTIONS[0], n).token_ids for d, (*_, n) in zip(direct, MIXED)]
    rng = torch.Generator().manual_seed(seed)
    engine = kb.Engine(model, tok, decode="static",
                       make_room=lambda nbytes: bool(torch.rand(1, generator=rng) < 0.5))
    turns, pending = [], list(zip(sessions, MIXED))
    for _ in range(400):
        if pending and torch.rand(1, generator=rng) < 0.7:
            session, (*_, n) = pending.pop(0)
            turns.append(engine.submit(session, QUESTIONS[0], n))
        if not pending and not engine.busy:
            break
        engine.step()
        for batch in engine.slots.values():
            assert len(batch.live) <= len(batch.rows)
    assert not pending and not engine.busy, "every turn ended"
    assert [t.result().token_ids for t in turns] == alone
    for session, d in zip(sessions, direct):
        _same_cache(session.cache, d.cache)
    assert all(not b.live for b in engine.slots.values())
    assert engine.slot_waits > 0 and 0 < engine.eager_tokens < engine.decoded_tokens
