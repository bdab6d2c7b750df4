"""The server over the batching engine, on a tiny random-weight model (plain transformers):
concurrent turns decode in one batch and answer what each gives alone, ``--max-batch 1`` serves
one at a time, a turn that does not fit the memory bound waits instead of failing, stop
sequences, seeded sampling and usage behave per request, and a client gone during a long prompt
stops it between two blocks."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_kit import Server, slow_tiny_model

import kvbudget as kb
from kvbudget.runtime.engine import DECODE_PARTS
from kvbudget.serve import ServeConfig, create_app
from kvbudget.serve.schema import ChatRequest

QUESTIONS = ["Tell me about the sea.", "What is a lighthouse?", "Name three birds.", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer, slow): ``slow["sleep"]`` seconds per model call, so that requests overlap."""
    return slow_tiny_model()


@pytest.fixture
def start(tiny, tmp_path):
    model, tok, slow = tiny
    running: list[Server] = []

    def _start(**overrides) -> Server:
        cfg = {"model_name": "tiny", "store": tmp_path / f"store{len(running)}", "policies": ["snapkv"],
               "budget": "48", "block_size": 32, "max_tokens": 32, "default_max_tokens": 8, **overrides}
        server = Server(create_app(model, tok, ServeConfig(**cfg)))
        running.append(server)
        return server

    yield _start
    slow["sleep"] = 0.0
    for server in running:
        if server.thread.is_alive():
            server.stop()


def _concurrently(server: Server, n_tokens: int = 6) -> list[list[str]]:
    ids = [server.new_session() for _ in QUESTIONS]

    def client(i: int) -> list[str]:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            out = []
            for q in (QUESTIONS[i], "And then?"):
                r = http.post("/v1/chat/completions", json={"session_id": ids[i], "max_tokens": n_tokens,
                                                            "messages": [{"role": "user", "content": q}]})
                assert r.status_code == 200, r.text
                out.append(r.json()["choices"][0]["message"]["content"])
            return out

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(client, range(len(QUESTIONS))))


def test_concurrent_turns_decode_together_and_answer_as_alone(start, tiny):
    model, tok, slow = tiny
    alone = []
    for q in QUESTIONS:
        session = kb.Session(model, tok, kb.policy("snapkv", budget="48"), block_size=32)
        alone.append([session.ask(q, 6), session.ask("And then?", 6)])
    slow["sleep"] = 0.01
    batched = start()
    assert _concurrently(batched) == alone
    m = batched.metrics()
    assert m["kvbudget_decode_batch_tokens"] > m["kvbudget_decode_steps"], "turns shared decode steps"
    assert m["kvbudget_queue_length"] == 0 and m["kvbudget_turns_in_flight"] == 0
    assert m["kvbudget_model_weight_bytes"] > 0 and m["kvbudget_device_bytes_peak"] == 0, "the CPU: no GPU memory"
    parts = [m[f"kvbudget_decode_{part}_seconds"] for part in DECODE_PARTS]
    assert m["kvbudget_decode_forward_seconds"] > 0 and sum(parts) <= m["kvbudget_decode_step_seconds"], parts
    serial = start(max_batch=1)
    assert _concurrently(serial) == alone
    m = serial.metrics()
    assert m["kvbudget_decode_batch_tokens"] == m["kvbudget_decode_steps"] > 0, "one turn at a time"


def test_a_turn_that_does_not_fit_waits_for_the_turns_in_flight(start, tiny):
    """A bound that holds one turn's reserve: concurrent turns all succeed, one after the other,
    idle sessions go to disk, and the peak stays under the bound."""
    model, tok, slow = tiny
    probe = start()
    manager = probe.app.state.manager
    session = kb.Session(model, tok, manager.default_policy)
    needs = []
    for q in QUESTIONS:
        req = ChatRequest([{"role": "user", "content": q}], 6)
        needs.append(manager.footprint.need(session, session.new_tokens(req.messages), req.max_tokens))
    memory = max(needs) + int(0.9 * min(needs))
    assert 2 * min(needs) > memory, "two first turns do not fit together"
    slow["sleep"] = 0.01
    server = start(memory=memory)
    answers = _concurrently(server)
    assert all(len(a) == 2 for a in answers)
    m = server.metrics()
    assert m['kvbudget_requests_total{code="200"}'] == 2 * len(QUESTIONS)
    assert m["kvbudget_decode_batch_tokens"] == m["kvbudget_decode_steps"], "never two turns at once"
    assert 0 < m["kvbudget_kv_bytes_peak"] <= memory
    assert m["kvbudget_evictions_total"] > 0 and m["kvbudget_session_loads_total"] > 0


def test_decode_slots_count_under_the_memory_bound(start, tiny):
    """Static slots (``decode="static"``: CUDA's path, here on the CPU) count under the bound
    beyond their turn's reserve: before they grow, an idle session goes to disk to make room;
    with none to move, the turn decodes eagerly instead. Both answer as alone, the session moved
    out answers its next turn from its file, and the peak (the slots included) stays under the
    bound."""
    model, tok, slow = tiny

    def answer(server, sid, question):
        r = server.chat(sid, question, max_tokens=6)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def watch(server) -> list:
        engine = server.app.state.manager.engine
        asked, make_room = [], engine.make_room
        engine.make_room = lambda nbytes: asked.append((nbytes, make_room(nbytes))) or asked[-1][1]
        return asked

    alone = kb.Session(model, tok, kb.policy("snapkv", budget="48"), block_size=32)
    expected = [alone.ask(QUESTIONS[0], 6), alone.ask(QUESTIONS[1], 6)]
    probe = start(decode="static")
    manager = probe.app.state.manager
    asked = watch(probe)
    first = probe.new_session()
    assert answer(probe, first, QUESTIONS[0]) == expected[0]
    (slots, allowed), = asked
    assert allowed and slots > 0
    held = probe.client.get(f"/v1/sessions/{first}").json()["kv_bytes"]
    empty = kb.Session(model, tok, manager.default_policy)
    need = manager.footprint.need(empty, empty.new_tokens([{"role": "user", "content": QUESTIONS[0]}]), 6)

    memory = held + need + slots - 1  # an idle session's bytes, a turn's reserve and the slots: one too many
    server = start(decode="static", memory=memory)
    asked = watch(server)
    a = server.new_session()
    assert answer(server, a, QUESTIONS[0]) == expected[0]
    b = server.new_session()
    assert answer(server, b, QUESTIONS[0]) == expected[0]
    assert [ok for _, ok in asked] == [True, True]
    assert server.client.get(f"/v1/sessions/{a}").json()["live"] is False, "moved out for the slots"
    m = server.metrics()
    assert m["kvbudget_evictions_total"] == 1 and 0 < m["kvbudget_kv_bytes_peak"] <= memory
    assert answer(server, a, QUESTIONS[1]) == expected[1]
    assert server.metrics()["kvbudget_session_loads_total"] == 1

    tight = start(decode="static", memory=need + slots - 1)  # no idle session to move out
    asked = watch(tight)
    c = tight.new_session()
    assert answer(tight, c, QUESTIONS[0]) == expected[0]
    assert [ok for _, ok in asked] == [False], "decoded eagerly"
    assert 0 < tight.metrics()["kvbudget_kv_bytes_peak"] <= need + slots - 1


def test_idle_decode_slots_stay_a_while_and_give_way_first(start, tiny, monkeypatch):
    """After a turn the decode slots stay (the session's next turn decodes in the same buffers:
    no new allocation) until `SLOTS_IDLE_S` passes without a step. Under the memory bound they
    are the first to go: a turn that needs their bytes drops them and leaves the idle session
    in memory."""
    from kvbudget.serve import worker

    model, tok, slow = tiny
    monkeypatch.setattr(worker, "SLOTS_IDLE_S", 1.0)
    server = start(decode="static")
    engine = server.app.state.manager.engine
    a = server.new_session()
    assert server.chat(a, QUESTIONS[0], max_tokens=6).status_code == 200
    (batch,) = engine.slots.values()
    slots = batch.nbytes
    assert server.metrics()["kvbudget_slot_bytes"] == slots > 0
    assert server.chat(a, QUESTIONS[1], max_tokens=6).status_code == 200
    assert list(engine.slots.values()) == [batch] and batch.allocations == 1, "the same slots"
    deadline = time.monotonic() + 30
    while server.metrics()["kvbudget_slot_bytes"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metrics()["kvbudget_slot_bytes"] == 0 and not engine.slots, "gone after an idle while"

    tight = start(decode="static")
    manager = tight.app.state.manager  # the bytes of a second session's one-token turn
    empty = kb.Session(model, tok, manager.default_policy)
    need = manager.footprint.need(empty, empty.new_tokens([{"role": "user", "content": QUESTIONS[2]}]), 1)
    a = tight.new_session()
    assert tight.chat(a, QUESTIONS[0], max_tokens=6).status_code == 200
    held = tight.client.get(f"/v1/sessions/{a}").json()["kv_bytes"]
    memory = manager.config.memory = held + need + slots - 1  # (read at each use)
    assert tight.metrics()["kvbudget_slot_bytes"] == slots, "idle slots kept"
    b = tight.new_session()
    assert tight.chat(b, QUESTIONS[2], max_tokens=1).status_code == 200  # one token: no slot
    m = tight.metrics()
    assert m["kvbudget_slot_bytes"] == 0 and m["kvbudget_evictions_total"] == 0
    assert tight.client.get(f"/v1/sessions/{a}").json()["live"] is True, "the slots went, not the session"
    assert 0 < m["kvbudget_kv_bytes_peak"] <= memory


def test_the_bound_covers_every_slot_and_every_snapshot(start, tiny):
    """Static slots: at every step, the bytes under the bound (idle sessions, the turns'
    reservations, the slots beyond the entries their sessions hold there) cover what is held: the
    slots' buffers whole (a slot not in use too), each turn's own entries and the snapshot its
    compressing answer takes. Here one long answer compresses alone in a batch of four slots,
    after three short ones left: its reservation covers its own slot and its snapshot, not the
    slots left empty."""
    model, tok, slow = tiny
    server = start(decode="static", budget="300", max_tokens=96)
    manager = server.app.state.manager
    live, engine = manager.live, manager.engine
    steps = []  # after each step: (committed, held, the case above)
    track = live.track_peak

    def checked() -> None:
        track()
        held = engine.slot_bytes + sum(live.held.values())
        for key, session, _, _ in live.reserved.values():
            if session is None:
                continue
            held -= live.held.get(key, 0)  # its cache, counted below as it is now
            lent = sum(l.keys.nbytes + l.values.nbytes for l in session.cache.layers if l.borrowed)
            held += session.cache.nbytes() - lent + session.cache._snapshot_bytes
        alone = [len(b.live) == 1 and len(b.rows) == 4 for b in engine.slots.values()]
        snapshots = sum(s.cache._snapshot_bytes for _, s, _, _ in live.reserved.values() if s is not None)
        steps.append((live.committed(), held, any(alone) and snapshots > 0))

    live.track_peak = checked
    manager.executor.after_step = checked
    ids = [server.new_session() for _ in range(4)]
    words = " ".join(["harbour lighthouse ferry market net tide gull anchor"] * 60)
    with ThreadPoolExecutor(4) as pool:  # each session: a long context, a short answer
        assert all(r.status_code == 200 for r in pool.map(lambda i: server.chat(i, words, max_tokens=2), ids))
    slow["sleep"] = 0.002
    with ThreadPoolExecutor(4) as pool:
        lengths = [80, 4, 4, 4]
        replies = list(pool.map(lambda a: server.chat(a[0], QUESTIONS[0], max_tokens=a[1]), zip(ids, lengths)))
    assert [r.json()["usage"]["completion_tokens"] for r in replies] == lengths
    assert any(case for *_, case in steps), "the long answer compressed alone in four slots"
    assert all(committed >= held for committed, held, _ in steps), [x for x in steps if x[0] < x[1]][:3]


def test_stop_sequences_seeded_sampling_and_usage(start):
    server = start()
    plain = server.chat(None, "Say something long.", max_tokens=16).json()
    text = plain["choices"][0]["message"]["content"]
    assert plain["usage"]["completion_tokens"] == 16 and plain["usage"]["prompt_tokens"] > 0
    stop = text.split()[3]
    cut = server.chat(None, "Say something long.", max_tokens=16, stop=[stop, "\u00e9\u00e9\u00e9"]).json()
    assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)].strip()
    assert cut["choices"][0]["finish_reason"] == "stop" and cut["usage"]["completion_tokens"] < 16
    # Streamed: the deltas never show the stop sequence and add up to the answer.
    r = server.chat(None, "Say something long.", max_tokens=16, stop=stop, stream=True)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == cut["choices"][0]["message"]["content"] and events[-1]["usage"]["completion_tokens"] > 0
    # Sampling: the same seed, the same answer; greedy stays the default.
    sampled = [server.chat(None, "Say something long.", max_tokens=16, temperature=1.0, top_p=0.95, seed=s).json()
               for s in (3, 3, 4)]
    texts = [s["choices"][0]["message"]["content"] for s in sampled]
    assert texts[0] == texts[1] and texts[0] != texts[2] and texts[0] != text
    bad = server.chat(None, "hi", stop=["a", "b", "c", "d", "e"])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stop"


def test_a_client_gone_during_a_long_prompt_stops_it_between_blocks(start, tiny):
    """A streamed turn whose client hangs up while its long message is fed stops before the next
    block: the rest of the prompt is not fed, nothing is decoded, the session is as saved, and
    the server goes on."""
    model, tok, slow = tiny
    server = start()
    sid = server.new_session()
    message = " ".join(["the harbour keeps its lighthouse lit"] * 100)
    probe = kb.Session(model, tok, kb.policy("snapkv", budget="48"), block_size=32)
    blocks = -(-probe.new_tokens([{"role": "user", "content": message}]) // 32)
    assert blocks >= 15
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    slow["sleep"] = 0.2
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            body = {"session_id": sid, "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": message}]}
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if '"role"' in line:
                        break  # the turn has started: hang up
        deadline = time.monotonic() + 30
        while True:  # until the request is counted gone and its turn ended
            m = server.metrics()
            if m.get('kvbudget_requests_total{code="499"}') == 1 and m["kvbudget_turns_in_flight"] == 0:
                break
            assert time.monotonic() < deadline, "the turn went on after its client left"
            time.sleep(0.05)
    finally:
        slow["sleep"] = 0.0
        hook.remove()
    assert len(calls) <= blocks // 4, f"{len(calls)} of the prompt's {blocks} blocks fed after the client left"
    assert m["kvbudget_generated_tokens_total"] == 0
    info = server.client.get(f"/v1/sessions/{sid}").json()
    assert info["turns"] == 0 and info["tokens_seen"] == 0
    assert server.chat(sid, "Hello?", max_tokens=4).status_code == 200


class _Gate:
    """Holds `SessionStore` reads or writes of one session id until `open` (the rest pass)."""

    def __init__(self, monkeypatch, method: str, session_id: str) -> None:
        from kvbudget.serve.sessionstore import SessionStore

        self.event, self.entered = threading.Event(), threading.Event()
        real = getattr(SessionStore, method)

        def held(store, owner, sid, *args):
            if sid == session_id:
                self.entered.set()
                assert self.event.wait(120), "the gate was never opened"
            return real(store, owner, sid, *args)

        monkeypatch.setattr(SessionStore, method, held)

    def open(self) -> None:
        self.event.set()


def _answers_alone(tiny, questions: list[str]) -> list[str]:
    model, tok, _ = tiny
    session = kb.Session(model, tok, kb.policy("snapkv", budget="48"), block_size=32)
    return [session.ask(q, 6) for q in questions]


def _content(r) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_session_files_are_written_off_the_model_thread(start, tiny, monkeypatch):
    """While one session's file is being written (held here), other sessions' turns run and are
    answered; the turn being written is answered only once its file is complete, and the next
    turn of that session waits for it and continues from it, as the session alone would."""
    alone_a = _answers_alone(tiny, QUESTIONS[:3])
    alone_b = _answers_alone(tiny, QUESTIONS[3:])
    server = start()
    a, b = server.new_session(), server.new_session()
    assert _content(server.chat(a, QUESTIONS[0], max_tokens=6)) == alone_a[0]
    gate = _Gate(monkeypatch, "write", a)
    with ThreadPoolExecutor(2) as pool:
        second = pool.submit(server.chat, a, QUESTIONS[1], max_tokens=6)
        assert gate.entered.wait(120)
        third = pool.submit(server.chat, a, QUESTIONS[2], max_tokens=6)
        assert _content(server.chat(b, QUESTIONS[3], max_tokens=6)) == alone_b[0]  # meanwhile
        deadline = time.monotonic() + 60
        while (m := server.metrics())["kvbudget_queue_length"] < 1:  # the third waits for the second's file
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert m["kvbudget_saves_in_flight"] == 1 and m["kvbudget_queue_length"] == 1
        assert not second.done() and not third.done()
        assert server.client.get(f"/v1/sessions/{a}").json()["turns"] == 2  # live: the answered turn
        gate.open()
        assert [_content(second.result()), _content(third.result())] == alone_a[1:]
    assert server.client.get(f"/v1/sessions/{a}").json()["turns"] == 3
    assert server.metrics()["kvbudget_saves_in_flight"] == 0


def test_session_files_are_read_off_the_model_thread(start, tiny, tmp_path, monkeypatch):
    """A session read back from its file (held here) does not hold up the turns of sessions in
    memory or of those after it; it continues from its file once read."""
    alone = _answers_alone(tiny, QUESTIONS[:2])
    first = start(store=tmp_path / "shared")
    a, b = first.new_session(), first.new_session()
    assert _content(first.chat(a, QUESTIONS[0], max_tokens=6)) == alone[0]
    first.stop()
    server = start(store=tmp_path / "shared")  # nothing in memory: both are read from their files
    gate = _Gate(monkeypatch, "read", a)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(server.chat, a, QUESTIONS[1], max_tokens=6)
        assert gate.entered.wait(120)
        assert server.chat(b, QUESTIONS[3], max_tokens=6).status_code == 200  # arrived later, answered first
        assert not held.done()
        gate.open()
        assert _content(held.result()) == alone[1]
    assert server.metrics()["kvbudget_session_loads_total"] == 2


def test_a_session_deleted_while_its_file_is_written_is_gone(start, tiny, monkeypatch):
    """DELETE during a turn's write: the file lands, then goes with the session; the turn answers
    404 and nothing of the session is left in the directory or its index."""
    server = start()
    a = server.new_session()
    path = server.app.state.manager.store.path("", a)
    gate = _Gate(monkeypatch, "write", a)
    with ThreadPoolExecutor(2) as pool:
        turn = pool.submit(server.chat, a, QUESTIONS[0], max_tokens=6)
        assert gate.entered.wait(120)
        deleting = pool.submit(server.client.delete, f"/v1/sessions/{a}")
        time.sleep(0.2)
        gate.open()
        assert deleting.result().status_code == 200
        assert turn.result().status_code == 404
    assert not path.exists() and server.app.state.manager.store.info("", a) is None
    assert server.client.get(f"/v1/sessions/{a}").status_code == 404
