"""The server facing users it does not trust, on a tiny random-weight model (plain transformers):
API keys guard every route but /healthz, a session belongs to the key that created it (another
key gets 404, no raw key reaches the disk), a server without keys stays on loopback, every limit
answers a 4xx naming it and counts in /metrics, and every limit is checked before the model
thread does any work."""

import hashlib
import sqlite3
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from server_kit import Server, slow_tiny_model

from kvbudget.serve import Limits, ServeConfig, create_app
from kvbudget.serve.keys import check_bind

KEY_A, KEY_B = "key-a-" + "a" * 26, "key-b-" + "b" * 26
A, B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
POSITIONS = 512


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): a 2-layer random Llama over the default model's tokenizer; a forward
    pre-hook sleeps ``tiny[2]["sleep"]`` seconds per model call (a slow model on demand)."""
    return slow_tiny_model(POSITIONS)


@pytest.fixture
def start(tiny, tmp_path):
    """start(headers=A, **config) -> a running Server (tiny model, keys A and B); stopped at the end."""
    model, tok, slow = tiny
    running: list[Server] = []

    def _start(headers=A, limits=None, **overrides) -> Server:
        cfg = {"model_name": "tiny", "store": tmp_path / f"store{len(running)}", "policies": ["snapkv", "full"],
               "budget": "64", "block_size": 64, "max_tokens": 32, "default_max_tokens": 4,
               "api_keys": [KEY_A, KEY_B], "limits": limits or Limits(), **overrides}
        server = Server(create_app(model, tok, ServeConfig(**cfg)), headers=headers)
        running.append(server)
        return server

    yield _start
    slow["sleep"] = 0.0
    for server in running:
        if server.thread.is_alive():
            server.stop()


def _expect(response, status: int, code: str, words: str = "") -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and words.lower() in error["message"].lower(), error
    return error


def _block(server) -> threading.Event:
    """Occupy the model thread until the returned event is set."""
    release = threading.Event()
    server.app.state.manager.executor.submit(release.wait, 60)
    return release


def test_every_route_but_healthz_needs_a_valid_key(start):
    server = start(headers=None)
    routes = [(m, r.path.replace("{session_id}", "some-id")) for r in server.app.routes
              for m in getattr(r, "methods", ()) if m != "HEAD" and r.path not in ("/", "/healthz")]
    assert {p for _, p in routes} >= {"/v1/chat/completions", "/v1/sessions", "/v1/sessions/some-id", "/v1/models",
                                      "/metrics", "/openapi.json"}
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key-wrong"}, {"Authorization": f"Basic {KEY_A}"},
                        {"Authorization": KEY_A}, {"Authorization": f"Bearer {KEY_A}x"}):
            r = server.client.request(method, path, headers=headers, json={})
            error = _expect(r, 401, "invalid_api_key", "Authorization: Bearer")
            assert error["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"
    assert server.client.get("/healthz").status_code == 200
    assert server.client.get("/").status_code == 200  # the static chat page, which asks for the key
    for headers in (A, B, {"Authorization": f"bearer   {KEY_B}"}):
        assert server.client.get("/v1/models", headers=headers).status_code == 200
    text = server.client.get("/metrics", headers=A).text
    assert f"kvbudget_auth_failures_total {len(routes) * 5}\n" in text


def test_a_session_belongs_to_the_key_that_created_it(start):
    server = start()
    a = server.client.post("/v1/sessions", json={}).json()
    b = server.client.post("/v1/sessions", json={}).json()
    assert len(a["id"]) == 22 and a["id"] != b["id"]  # secrets.token_urlsafe(16): 128 random bits
    assert server.chat(a["id"], "My password is hunter2.", max_tokens=4).status_code == 200
    unknown = server.client.get("/v1/sessions/never-made", headers=B).json()["error"]
    for method, path, body in (("GET", f"/v1/sessions/{a['id']}", None), ("DELETE", f"/v1/sessions/{a['id']}", None),
                               ("POST", "/v1/chat/completions",
                                {"session_id": a["id"], "messages": [{"role": "user", "content": "What is my password?"}]})):
        r = server.client.request(method, path, headers=B, json=body)
        error = _expect(r, 404, "session_not_found", "unknown session")  # as if it did not exist
        assert error["message"].replace(a["id"], "X") == unknown["message"].replace("never-made", "X")
        assert "hunter2" not in r.text
    assert server.client.get(f"/v1/sessions/{a['id']}").json()["turns"] == 1  # untouched, still A's
    # The same id chosen by two keys: two sessions that never meet.
    for headers in (A, B):
        assert server.client.post("/v1/sessions", headers=headers, json={"id": "notes"}).status_code == 200
    _expect(server.client.post("/v1/sessions", headers=B, json={"id": "notes"}), 409, "session_exists")
    assert server.chat("notes", "Only A says this.", max_tokens=2).status_code == 200
    assert server.client.get("/v1/sessions/notes", headers=B).json()["turns"] == 0
    assert server.client.delete("/v1/sessions/notes", headers=B).status_code == 200
    assert server.client.get("/v1/sessions/notes").json()["turns"] == 1
    # On disk: the owner is the key's hash; no file holds a raw key.
    root = server.app.state.manager.store.root
    server.stop()
    owners = {row[0] for row in sqlite3.connect(root / "index.sqlite").execute("SELECT owner FROM sessions")}
    assert owners == {hashlib.sha256(KEY_A.encode()).hexdigest()}
    files = [p for p in root.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for p in files:
        data = p.read_bytes()
        assert KEY_A.encode() not in data and KEY_B.encode() not in data, p


def test_without_keys_the_server_stays_on_loopback(tmp_path, capsys):
    from kvbudget.cli import main

    for argv, words in ((["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without an API key"),
                        (["--host", "::"], "refusing to listen on ::"),
                        (["--api-key", "short"], "at least 16"),
                        (["--api-key-file", str(tmp_path / "missing")], "cannot read API key file"),
                        (["--request-timeout", "soon"], "cannot read duration"),
                        (["--max-body-bytes", "0"], "cannot read memory")):
        assert main(["serve", *argv]) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvbudget") and words in lines[0], (argv, lines)
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    assert main(["serve", "--api-key-file", str(empty)]) == 2
    assert "holds no key" in capsys.readouterr().err
    assert "loopback" in check_bind("127.0.0.1", [], insecure=False)
    assert "loopback" in check_bind("::1", [], insecure=False)
    assert "WARNING" in check_bind("0.0.0.0", [], insecure=True)
    assert "1 API key" in check_bind("0.0.0.0", [KEY_A], insecure=False)


def test_every_limit_is_a_4xx_naming_it_and_counted(start):
    limits = Limits(max_body_bytes=4096, max_message_chars=500, max_request_tokens=300, max_json_depth=8,
                    max_sessions_per_key=2)
    server = start(limits=limits)
    post = server.client.post
    user = {"role": "user", "content": "hi"}
    _expect(post("/v1/chat/completions", content=b" " * 5000), 413, "max_body_bytes", "max_body_bytes=4096")

    def chunked():  # no Content-Length: counted while read
        for _ in range(10):
            yield b" " * 1000

    _expect(post("/v1/chat/completions", content=chunked()), 413, "max_body_bytes")
    _expect(server.chat(None, "a" * 501), 400, "max_message_chars", "501 characters")
    nested = {"messages": [user], "metadata": {"a": [[[[[[[["deep"]]]]]]]]}}
    _expect(post("/v1/chat/completions", json=nested), 400, "max_json_depth", "max_json_depth=8")
    # Tokens are counted off the model thread: refused while the model thread is busy.
    busy = _block(server)
    try:
        _expect(server.chat(None, "\U0001f600" * 120), 400, "max_request_tokens", "max_request_tokens=300")
    finally:
        busy.set()
    assert server.metrics()["kvbudget_prompt_tokens_total"] == 0, "no limit let work reach the model"
    server.new_session()
    second = server.new_session()
    _expect(post("/v1/sessions", json={}), 429, "max_sessions_per_key", "max_sessions_per_key=2")
    assert post("/v1/sessions", headers=B, json={}).status_code == 200  # another key has its own count
    assert server.client.delete(f"/v1/sessions/{second}").status_code == 200
    assert post("/v1/sessions", json={}).status_code == 200  # a deleted session frees its place
    m = server.metrics()
    for name, n in (("max_body_bytes", 2), ("max_message_chars", 1), ("max_json_depth", 1),
                    ("max_request_tokens", 1), ("max_sessions_per_key", 1)):
        assert m[f'kvbudget_limit_hits_total{{limit="{name}"}}'] == n, name


def test_stored_bytes_per_key_and_in_total(start):
    server = start(limits=Limits(max_stored_bytes_per_key=1))  # one session file is over it
    sid = server.new_session()
    _expect(server.client.post("/v1/sessions", json={}), 429, "max_stored_bytes_per_key")
    _expect(server.chat(sid, "hello"), 429, "max_stored_bytes_per_key", "delete some")
    assert server.client.post("/v1/sessions", headers=B, json={}).status_code == 200
    assert server.client.delete(f"/v1/sessions/{sid}").status_code == 200  # deleting frees the key's quota
    assert server.client.post("/v1/sessions", json={}).status_code == 200
    total = start(limits=Limits(max_stored_bytes=1))
    total.new_session()
    _expect(total.client.post("/v1/sessions", headers=B, json={}), 429, "max_stored_bytes", "session directory")
    assert total.metrics()['kvbudget_limit_hits_total{limit="max_stored_bytes"}'] == 1


def test_idle_sessions_expire_with_their_file(start):
    server = start(limits=Limits(session_ttl_s=1.0))
    sid = server.new_session()
    path = server.app.state.manager.store.path(hashlib.sha256(KEY_A.encode()).hexdigest(), sid)
    assert server.chat(sid, "hello", max_tokens=2).status_code == 200 and path.exists()
    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not path.exists(), "the sweeper deletes an idle session's file"
    _expect(server.client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert server.metrics()["kvbudget_sessions_expired_total"] == 1


def test_a_full_queue_answers_429_with_retry_after(start):
    server = start(limits=Limits(max_queue=1))
    sid = server.new_session()
    busy = _block(server)
    answers = []
    waiting = threading.Thread(target=lambda: answers.append(server.chat(sid, "first", max_tokens=2)))
    try:
        waiting.start()
        deadline = time.monotonic() + 30
        while server.app.state.admission.admitted < 1:
            assert time.monotonic() < deadline, "the first request was not admitted"
            time.sleep(0.02)
        r = server.chat(sid, "second", max_tokens=2)
        error = _expect(r, 429, "max_queue", "max_queue=1")
        assert int(r.headers["retry-after"]) >= 1 and "retry after" in error["message"]
        _expect(server.client.get(f"/v1/sessions/{sid}"), 429, "max_queue")  # every model-thread call queues
    finally:
        busy.set()
    waiting.join(60)
    assert answers[0].status_code == 200
    assert server.client.get(f"/v1/sessions/{sid}").json()["turns"] == 1
    assert server.metrics()['kvbudget_limit_hits_total{limit="max_queue"}'] == 2


def test_a_request_past_its_timeout_is_408_and_leaves_the_session_as_saved(start, tiny):
    server = start(limits=Limits(request_timeout_s=3.0))
    sid = server.new_session()
    assert server.chat(sid, "first turn", max_tokens=2).status_code == 200
    before = server.client.get(f"/v1/sessions/{sid}").json()
    # Waiting in the queue counts.
    busy = _block(server)
    try:
        _expect(server.chat(sid, "queued too long", max_tokens=2), 408, "request_timeout", "request_timeout=3")
    finally:
        busy.set()
    # So does decoding: the turn stops at its next token, unsaved.
    tiny[2]["sleep"] = 0.5
    start_s = time.monotonic()
    _expect(server.chat(sid, "decoded too long", max_tokens=32), 408, "request_timeout")
    streamed = server.chat(sid, "streamed too long", max_tokens=32, stream=True)
    assert streamed.status_code == 200 and '"code":"request_timeout"' in streamed.text.replace(" ", "")
    tiny[2]["sleep"] = 0.0
    assert time.monotonic() - start_s < 30
    after = server.client.get(f"/v1/sessions/{sid}").json()
    assert after["messages"] == before["messages"] and after["turns"] == 1
    assert server.chat(sid, "in time", max_tokens=2).status_code == 200
    assert server.metrics()['kvbudget_limit_hits_total{limit="request_timeout"}'] == 3


def test_positions_left_in_every_answer_and_the_error_that_counts_them(start):
    server = start()
    sid = server.new_session()
    assert server.client.get(f"/v1/sessions/{sid}").json()["positions_left"] == POSITIONS
    r = server.chat(sid, "hello there", max_tokens=4)
    stats = r.json()["kvbudget"]
    assert stats["positions_left"] == POSITIONS - stats["tokens_seen"] > 0
    streamed = server.chat(sid, "and again", max_tokens=4, stream=True)
    assert f'"positions_left": {POSITIONS - server.client.get(f"/v1/sessions/{sid}").json()["tokens_seen"]}' in streamed.text
    left = server.client.get(f"/v1/sessions/{sid}").json()["positions_left"]
    error = _expect(server.chat(sid, "word " * (left - 8), max_tokens=16), 400, "context_length_exceeded")
    assert f"has {left} of the model's {POSITIONS} positions left" in error["message"]
    assert server.client.get(f"/v1/sessions/{sid}").json()["positions_left"] == left  # nothing was fed


def test_a_rerotating_policy_serves_turns_past_the_models_positions(start):
    server = start(policies=["snapkv", "snapkv+rerotate"])
    long = "word " * (POSITIONS + 100)
    plain = server.new_session(policy="snapkv")
    _expect(server.chat(plain, long, max_tokens=4), 400, "context_length_exceeded")
    sid = server.new_session(policy="snapkv+rerotate")
    assert server.client.get(f"/v1/sessions/{sid}").json()["positions_left"] is None
    for _ in range(2):
        r = server.chat(sid, long, max_tokens=4)
        assert r.status_code == 200, r.text
        assert r.json()["kvbudget"]["positions_left"] is None
    info = server.client.get(f"/v1/sessions/{sid}").json()
    assert info["tokens_seen"] > 2 * POSITIONS and info["positions_left"] is None
    live = server.app.state.manager.live  # out of memory, described from its file: the same
    assert live.drop(next(key for key in live.sessions if key[1] == sid))
    assert server.client.get(f"/v1/sessions/{sid}").json() == {**info, "live": False}
    assert server.chat(sid, "and after reloading?", max_tokens=4).status_code == 200


@pytest.mark.parametrize("body, code, param", [
    (b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', "invalid_utf8", None),
    (b'{"messages": [{"role": "user", "content": "a\\udc80"}]}', "invalid_unicode", "messages[0].content"),
    (b'{"messages": [{"role": "user", "content": "hi", "name": "\\ud83d"}]}', "invalid_unicode", "messages[0].name"),
    (b'{"\\ud800": 1, "messages": []}', "invalid_unicode", None),
    (b'{"messages": [{"\\ud800": 1}]}', "invalid_unicode", "messages[0]"),
    (b"[" * 100_000 + b"]" * 100_000, "max_json_depth", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 5000 + b"}", "invalid_json", None),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "invalid_request", "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}', "invalid_request", "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}]', "invalid_json", None),
    (b"null", "invalid_json", None),
])
def test_bytes_no_tokenizer_can_take_are_400(start, body, code, param):
    server = start()
    r = server.client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    error = _expect(r, 400, code)
    assert error["param"] == param
    r = server.client.post("/v1/chat/completions", headers={"X-Session-Id": b"\xff\xfe"},
                           json={"messages": [{"role": "user", "content": "hi"}]})
    assert _expect(r, 400, "invalid_request", "X-Session-Id")["param"] == "X-Session-Id"
    assert server.metrics()["kvbudget_internal_errors_total"] == 0


def test_an_index_without_owners_opens_with_its_sessions_unowned(tmp_path):
    """A session directory written before sessions had owners: its rows get the empty owner (a
    server without keys serves them as before; no key reaches them)."""
    from kvbudget.serve.sessionstore import SessionStore

    db = sqlite3.connect(tmp_path / "index.sqlite", isolation_level=None)
    db.execute("CREATE TABLE sessions (id TEXT PRIMARY KEY, policy TEXT NOT NULL, created REAL NOT NULL, "
               "updated REAL NOT NULL, turns INTEGER NOT NULL, tokens INTEGER NOT NULL, kv_bytes INTEGER NOT NULL, "
               "file_bytes INTEGER NOT NULL)")
    db.execute("INSERT INTO sessions VALUES ('old', 'snapkv', 1.0, 2.0, 3, 40, 500, 600)")
    db.close()
    store = SessionStore(tmp_path)
    try:
        assert store.info("", "old")["turns"] == 3 and store.path("", "old") == tmp_path / "old.kvb"
        assert store.info(hashlib.sha256(KEY_A.encode()).hexdigest(), "old") is None
        assert store.usage() == (1, 600) and store.usage("") == (1, 600)
    finally:
        store.close()


def test_a_client_that_hangs_up_mid_stream_stops_its_turn(start, tiny):
    """The turn stops at its next token, unsaved: the model thread is free again, the session
    is as it was saved."""
    server = start()
    sid = server.new_session()
    tiny[2]["sleep"] = 0.3
    with httpx.Client(base_url=server.url, headers=A, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "session_id": sid, "max_tokens": 32, "stream": True,
                "messages": [{"role": "user", "content": "a long answer, please"}]}) as r:
            for line in r.iter_lines():
                if '"content": "' in line and '"role"' not in line:
                    break  # the first text: hang up
    start_s = time.monotonic()
    info = server.client.get(f"/v1/sessions/{sid}").json()  # queued behind the turn: it must end first
    tiny[2]["sleep"] = 0.0
    assert time.monotonic() - start_s < 0.3 * 16, "the turn went on after the client left"
    assert info["turns"] == 0 and info["messages"] == []
    m = server.metrics()
    assert m['kvbudget_requests_total{code="499"}'] == 1
    assert m["kvbudget_generated_tokens_total"] == 0  # counted only for finished turns
