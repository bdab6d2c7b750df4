"""The HTTP server on the real default model, through a real uvicorn server on 127.0.0.1:
answers equal the same `Session` used directly (also across restarts), concurrent clients stay
under the memory bound, a failed save loses nothing that was saved, every bad input is a 4xx
JSON error, and the chat page works in headless Chromium. (Keys, limits, fuzzing, the soak and
the injected faults: tests/test_server_*.py, on a tiny model.)"""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import half_then_fail
from server_kit import Server

import kvbudget as kb
from kvbudget.runtime import sessionfile
from kvbudget.serve import ServeConfig, create_app

POLICY, BUDGET, BLOCK = "snapkv", "64", 32
MAX_TOKENS = 12
QUESTIONS = [
    "My name is Ada and I keep bees in my garden. What do I keep?",
    "What is my name?",
    "Say a short greeting to me.",
]


@pytest.fixture
def start(default_model, tmp_path):
    """start(store=None, **config) -> a running Server; every one is stopped at the end."""
    model, tok = default_model
    running: list[Server] = []

    def _start(store: Path | None = None, **overrides) -> Server:
        cfg = {"model_name": "smollm2-135m", "store": store or tmp_path / "store", "policies": [POLICY, "full"],
               "budget": BUDGET, "memory": 2**30, "block_size": BLOCK, "max_tokens": 64,
               "default_max_tokens": MAX_TOKENS, **overrides}
        server = Server(create_app(model, tok, ServeConfig(**cfg)))
        running.append(server)
        return server

    yield _start
    for server in running:
        if server.thread.is_alive():
            server.stop()


def _direct(model, tok, questions, max_tokens=MAX_TOKENS) -> tuple[list[str], kb.Session]:
    session = kb.Session(model, tok, kb.policy(POLICY, budget=BUDGET), block_size=BLOCK)
    return [session.ask(q, max_tokens) for q in questions], session


@pytest.fixture(scope="module")
def reference(default_model):
    """The three answers of the same Session used directly."""
    return _direct(*default_model, QUESTIONS)


def _answer(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _streamed(response) -> tuple[str, dict]:
    """Text and final event of a streamed reply."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return text, chunks[-1]


def test_three_turns_equal_the_same_session_used_directly(start, reference):
    answers, direct = reference
    server = start()
    sid = server.new_session()
    first = server.chat(sid, QUESTIONS[0])
    assert _answer(first) == answers[0]
    body = first.json()
    assert body["object"] == "chat.completion" and body["session_id"] == sid and first.headers["x-session-id"] == sid
    assert body["usage"]["completion_tokens"] <= MAX_TOKENS
    # Turn 2 streams, and names its session through the header instead of the body.
    streamed = server.client.post("/v1/chat/completions", headers={"X-Session-Id": sid},
                                  json={"messages": [{"role": "user", "content": QUESTIONS[1]}],
                                        "max_tokens": MAX_TOKENS, "stream": True})
    text, last = _streamed(streamed)
    assert text == answers[1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["kvbudget"]["kv_bytes"] > 0
    third = server.chat(sid, QUESTIONS[2])
    assert _answer(third) == answers[2]
    stats = third.json()["kvbudget"]
    assert stats["kv_bytes"] == direct.kv_bytes and stats["tokens_seen"] == direct.tokens_seen
    assert stats["compression"] > 1.0, "the conversation outgrew the budget: the cache must be compressed"
    info = server.client.get(f"/v1/sessions/{sid}").json()
    assert info["messages"] == direct.messages and info["turns"] == 3 and info["live"] is True
    assert info["policy"] == POLICY and info["budget"] == BUDGET


def test_without_a_session_the_whole_list_is_the_conversation(start, default_model, reference):
    answers, _ = reference
    model, tok = default_model
    server = start()
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": answers[0]},
               {"role": "user", "content": QUESTIONS[1]}]
    direct = kb.Session(model, tok, kb.policy(POLICY, budget=BUDGET), block_size=BLOCK)
    direct.add_context(history[:2])
    expected = direct.ask(QUESTIONS[1], MAX_TOKENS)
    response = server.chat(messages=history)
    assert _answer(response) == expected and response.json()["session_id"] is None
    assert server.metrics()["kvbudget_sessions_stored"] == 0, "a request without a session leaves nothing behind"


def test_restart_between_turns_continues_from_disk(start, reference, tmp_path):
    answers, direct = reference
    store = tmp_path / "restarts"
    server = start(store)
    sid = server.new_session()
    server.stop()
    for i, question in enumerate(QUESTIONS):
        server = start(store)  # a new app: nothing in memory, the session comes from the store
        response = server.chat(sid, question, stream=i == 1)
        got = _streamed(response)[0] if i == 1 else _answer(response)
        assert got == answers[i], f"turn {i + 1} after a restart"
        metrics = server.metrics()
        assert metrics["kvbudget_session_loads_total"] == 1 and metrics["kvbudget_session_load_seconds_total"] > 0
        assert metrics["kvbudget_session_saves_total"] == 1 and metrics["kvbudget_session_save_seconds_total"] > 0
        server.stop()
    server = start(store)
    info = server.client.get(f"/v1/sessions/{sid}").json()
    assert info["live"] is False and info["turns"] == 3 and info["kv_bytes"] == direct.kv_bytes


SCRIPTS = [
    ["Hello! I am Bo.", "What is two plus two?", "Name a fruit.", "What is my name?", "Thanks, bye."],
    ["Tell me a colour.", "Name an animal.", "Is the sky blue?", "Count to three.", "Good night."],
]


def test_concurrent_clients_stay_under_the_memory_bound(start, default_model):
    """8 clients x 5 requests at once on a bound that holds about three sessions: every answer
    equals the same conversation run alone, sessions go to disk and come back, and the KV bytes
    held never exceed the bound."""
    model, tok = default_model
    max_tokens = 8
    expected = [_direct(model, tok, script, max_tokens)[0] for script in SCRIPTS]
    memory = 14_000_000
    server = start(memory=memory)
    ids = [server.new_session() for _ in range(8)]
    held, stop = [], threading.Event()

    def monitor():
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                for line in client.get("/metrics").text.splitlines():
                    if line.startswith("kvbudget_kv_bytes_held "):
                        held.append(float(line.split()[1]))
                time.sleep(0.1)

    def client(i: int) -> list[str]:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            out = []
            for question in SCRIPTS[i % 2]:
                r = http.post("/v1/chat/completions", json={"session_id": ids[i], "max_tokens": max_tokens,
                                                            "messages": [{"role": "user", "content": question}]})
                out.append(_answer(r))
            return out

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    stop.set()
    watcher.join(10)
    for i, answers in enumerate(results):
        assert answers == expected[i % 2], f"client {i}"
    m = server.metrics()
    assert m['kvbudget_requests_total{code="200"}'] == 40
    assert m["kvbudget_kv_bytes_peak"] <= memory, "the peak during requests went over --memory"
    assert held and max(held) <= memory
    assert m["kvbudget_evictions_total"] > 0 and m["kvbudget_session_loads_total"] > 0
    assert m["kvbudget_sessions_live"] < 8 and m["kvbudget_sessions_stored"] == 8
    assert m["kvbudget_generated_tokens_total"] > 0 and m["kvbudget_tokens_per_second"] > 0
    assert m['kvbudget_request_duration_seconds_bucket{le="+Inf"}'] == 40


def _expect(response, status: int, code: str | None = None, words: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and words.lower() in error["message"].lower(), error
    if code:
        assert error["code"] == code, error


def test_every_bad_input_is_a_4xx_json_error(start):
    server = start()
    post = server.client.post
    user = [{"role": "user", "content": "hi"}]
    _expect(post("/v1/chat/completions", content=b"{not json"), 400, "invalid_json", "not valid JSON")
    _expect(post("/v1/chat/completions", json=[1, 2]), 400, "invalid_json", "JSON object")
    _expect(post("/v1/chat/completions", json={"messages": "hi"}), 400, None, "messages: Input should be a valid list")
    _expect(post("/v1/chat/completions", json={"messages": []}), 400, None, "at least 1 item")
    _expect(post("/v1/chat/completions", json={"messages": [{"role": "bot", "content": "x"}]}), 400, None, "role")
    _expect(post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 3}]}), 400, None, "content")
    _expect(post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]}), 400, None, "last")
    _expect(post("/v1/chat/completions", json={"messages": user, "max_tokens": 0}), 400, None, "max_tokens")
    _expect(post("/v1/chat/completions", json={"messages": user, "max_tokens": 10_000}), 400, None, "max_tokens")
    _expect(server.chat("no-such-session", "hi"), 404, "session_not_found", "unknown session")
    _expect(server.chat("no-such-session", "hi", stream=True), 404, "session_not_found")
    _expect(server.chat("../../etc/passwd", "hi"), 400, None, "session_id")
    _expect(server.chat(None, "hi", tools=[{"type": "function"}]), 400, None, "tools are not supported")
    _expect(server.chat(None, "hi", temprature=0.5), 400, "unknown_field", "unknown field 'temprature'")
    _expect(server.chat(None, "hi", policy="h2o"), 400, "policy_not_served", "not served")
    _expect(server.chat(None, "hi", model="gpt-4"), 404, "model_not_found")
    _expect(server.chat(None, "hello " * 9000), 400, "max_request_tokens", "more than max_request_tokens=8192")
    sid = server.new_session()
    _expect(server.chat(sid, "hi", policy="full"), 400, "policy_mismatch")
    _expect(post("/v1/sessions", json={"id": sid}), 409, "session_exists")
    _expect(post("/v1/sessions", json={"policy": "h2o"}), 400, "policy_not_served")
    _expect(server.client.get("/v1/sessions/nope"), 404, "session_not_found")
    _expect(server.client.get("/no/such/route"), 404)
    # Deleting: the file and the index row go, later requests get a 404.
    assert server.client.delete(f"/v1/sessions/{sid}").json() == {"id": sid, "object": "session", "deleted": True}
    _expect(server.client.get(f"/v1/sessions/{sid}"), 404)
    _expect(server.client.delete(f"/v1/sessions/{sid}"), 404)
    assert not list(Path(server.app.state.manager.store.root).rglob("*.kvb"))
    # A request larger than the memory bound is refused, not run.
    small = start(memory=1_000_000)
    _expect(small.chat(None, "hi"), 400, "kv_memory_exceeded", "memory bound")
    # Still serving, and every error was counted.
    assert server.client.get("/healthz").json()["status"] == "ok"
    assert server.metrics()['kvbudget_http_responses_total{code="400"}'] >= 10
    assert server.client.get("/v1/models").json()["data"][0]["id"] == "smollm2-135m"


def test_a_failed_save_loses_nothing(start, reference, monkeypatch):
    """A save that fails half-way (disk full) answers 503 naming the store; the session file
    still holds the previous turn, and the session goes on from it as if the failed turn had
    not happened."""
    answers, _ = reference
    server = start()
    sid = server.new_session()
    assert _answer(server.chat(sid, QUESTIONS[0])) == answers[0]
    path = server.app.state.manager.store.path("", sid)
    before = path.read_bytes()
    real = sessionfile.atomic_open
    monkeypatch.setattr(sessionfile, "atomic_open", half_then_fail(real))
    failed = server.chat(sid, QUESTIONS[1])
    _expect(failed, 503, "storage_unavailable", "No space left")
    assert server.metrics()["kvbudget_storage_errors_total"] == 1
    monkeypatch.setattr(sessionfile, "atomic_open", real)
    assert path.read_bytes() == before
    assert server.client.get(f"/v1/sessions/{sid}").json()["turns"] == 1
    assert _answer(server.chat(sid, QUESTIONS[1])) == answers[1]
    assert _answer(server.chat(sid, QUESTIONS[2])) == answers[2]


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (make test installs them)")
def test_chat_page_in_headless_chromium(start, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    server = start()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 180)
        wait.until(lambda d: d.find_element(By.ID, "session").text.startswith("session "))
        box = driver.find_element(By.ID, "input")
        box.send_keys(QUESTIONS[0])
        driver.find_element(By.ID, "send").click()
        kv = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant .kv"))[0]
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant .reply").text
        driver.save_screenshot(str(tmp_path / "chat.png"))
        assert reply.strip(), "the reply is shown"
        assert kv.text.startswith("KV ") and "MB held" in kv.text and "compression" in kv.text
        assert not driver.find_elements(By.CSS_SELECTOR, ".error")
        sid = driver.execute_script("return localStorage.getItem('kvbudget-session')")
        info = server.client.get(f"/v1/sessions/{sid}").json()
        assert info["messages"][1]["content"] == reply
    finally:
        driver.quit()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--memory", "3x"], "cannot read memory"),
        (["--policy", "bogus"], "unknown policy 'bogus'"),
        (["--budget", "0"], "budget must be positive"),
    ],
)
def test_serve_command_bad_input_is_one_clear_line(args, message, capsys):
    from kvbudget.cli import main

    assert main(["serve", *args]) == 2  # before any model is loaded or port opened
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbudget: error:") and message in lines[0], lines


def test_the_memory_estimate_covers_decode_time_compression(default_model, tmp_path):
    """A turn long enough to compress while decoding (a snapshot of the cache is kept for the
    roll-back) still peaks within what the manager reserved for it."""
    from kvbudget.serve import SessionManager
    from kvbudget.serve.schema import ChatRequest

    model, tok = default_model
    config = ServeConfig(model_name="smollm2-135m", store=tmp_path, policies=[POLICY], budget=BUDGET,
                         block_size=BLOCK, max_tokens=80)
    manager = SessionManager(model, tok, config)
    try:
        req = ChatRequest([{"role": "user", "content": "Write a long story about a cat who travels the world."}], 72)
        probe = kb.Session(model, tok, manager.default_policy)
        config.memory = manager.footprint.need(probe, probe.new_tokens(req.messages), req.max_tokens)  # the reserve
        result = manager.chat("", req)
        assert result.completion_tokens > manager.default_policy.decode_interval, result.text
        assert 0 < manager.metrics.kv_bytes_peak <= config.memory
    finally:
        manager.close()
