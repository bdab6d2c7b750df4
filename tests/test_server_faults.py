"""Faults injected under the server, on a tiny random-weight model (plain transformers, saved and
loaded as users do): the disk full during a save, the session directory read-only, a session
file corrupted between turns, and `kvbudget serve` killed (SIGKILL) during a turn and during a
save. After each: no answered turn is lost, no file is left half-written, the server answers
every request with JSON (503 naming the store, 409 naming the broken session) and keeps serving
the rest."""

import errno
import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import half_then_fail
from server_kit import Process, Server, pairs, save_tiny_model
from safetensors.torch import save as st_save

import kvbudget as kb
from kvbudget.runtime import sessionfile
from kvbudget.runtime.engine import Engine
from kvbudget.runtime.models import load_model, load_tokenizer
from kvbudget.serve import ServeConfig, create_app

FLAGS = ["--policy", "snapkv", "--budget", "64", "--block-size", "64", "--max-tokens", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, model, tokenizer): the tiny model saved with save_pretrained, and loaded back
    by kvbudget's loader as `kvbudget serve --model DIR` loads it."""
    path = save_tiny_model(load_tokenizer(), tmp_path_factory.mktemp("tiny") / "model")
    model, tok = load_model(str(path))
    return path, model, tok


@pytest.fixture
def start(tiny):
    _, model, tok = tiny
    running: list[Server] = []

    def _start(store: Path) -> Server:
        config = ServeConfig(model_name="tiny", store=store, policies=["snapkv"], budget="64", block_size=64,
                             max_tokens=16, default_max_tokens=4)
        running.append(Server(create_app(model, tok, config)))
        return running[-1]

    yield _start
    for server in running:
        if server.thread.is_alive():
            server.stop()


def _expect(response, status: int, code: str, words: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words.lower() in error["message"].lower(), error
    return error


def _intact(store: Path, model, tok) -> list[Path]:
    """Every session file under ``store`` loads; no temp file is left. Returns the files."""
    assert not list(store.rglob("*.tmp")), "a temp file was left behind"
    files = sorted(store.rglob("*.kvb"))
    for path in files:
        kb.Session.load(path, model, tok)
    return files


def _mount(path: Path, *options: str) -> bool:
    """Mount a tmpfs (or remount it) where this process may (root); False elsewhere."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    cmd = ["mount", "-o", ",".join(options), path] if "remount" in options else \
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", path]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@contextmanager
def _small_disk(path: Path, size: int):
    """A tmpfs of ``size`` bytes at ``path`` where one can be mounted, else a plain directory."""
    path.mkdir()
    real = _mount(path, f"size={size}")
    try:
        yield real
    finally:
        if real:
            subprocess.run(["umount", "-l", path], check=True)


def test_disk_full_during_a_save(start, tiny, tmp_path, monkeypatch):
    """A real full tmpfs where this process can mount one (root), else a writer patched to fail
    as a full disk does, half-way: the turn answers 503 naming the store, the file keeps the previous
    turn, no temp file stays, other requests go on, and after space is freed the session
    continues from its last saved turn."""
    _, model, tok = tiny
    with _small_disk(tmp_path / "disk", 512 * 1024) as real:
        store = tmp_path / "disk" / "store"
        server = start(store)
        sid = server.new_session()
        assert server.chat(sid, "first", max_tokens=4).status_code == 200
        path = server.app.state.manager.store.path("", sid)
        before = path.read_bytes()
        ballast = tmp_path / "disk" / "ballast"
        if real:  # fill the disk to the last byte
            fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
        else:
            monkeypatch.setattr(sessionfile, "atomic_open", half_then_fail(sessionfile.atomic_open))
        error = _expect(server.chat(sid, "lost to the full disk", max_tokens=4), 503, "storage_unavailable",
                        "No space left on device")
        assert error["type"] == "server_error" and "last saved turn" in error["message"]
        _expect(server.client.post("/v1/sessions", json={}), 503, "storage_unavailable")
        assert server.chat(None, "a request without a session needs no disk", max_tokens=2).status_code == 200
        assert path.read_bytes() == before and not list(store.rglob("*.tmp"))
        assert server.client.get(f"/v1/sessions/{sid}").json()["turns"] == 1
        # Space again: the session goes on from its last saved turn.
        ballast.unlink(missing_ok=True)
        monkeypatch.undo()
        assert server.chat(sid, "second", max_tokens=4).status_code == 200
        info = server.client.get(f"/v1/sessions/{sid}").json()
        assert [q for q, _ in pairs(info["messages"])] == ["first", "second"]
        assert server.metrics()["kvbudget_storage_errors_total"] == 2
        assert server.metrics()["kvbudget_internal_errors_total"] == 0
        server.stop()
        _intact(store, model, tok)


@contextmanager
def _read_only(store: Path, monkeypatch):
    """``store`` read-only: chmod 555 for a user; for root (whom modes do not stop) a read-only
    remount of a tmpfs holding it where root may mount, else writes patched to fail with EROFS
    (temp files) and the index opened read-only."""
    disk = store.parent
    if os.geteuid() != 0:
        store.chmod(0o555)
        try:
            yield "chmod 555"
        finally:
            store.chmod(0o755)
    elif disk.is_mount() and _mount(disk, "remount", "ro"):
        try:
            yield "read-only tmpfs"
        finally:
            assert _mount(disk, "remount", "rw")
    else:
        import sqlite3

        from kvbudget import fileio

        def refuse(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

        connect = sqlite3.connect
        monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
        monkeypatch.setattr(sqlite3, "connect", lambda path, **kw: connect(f"file:{path}?mode=ro", uri=True, **kw))
        try:
            yield "patched"
        finally:
            monkeypatch.undo()


def test_a_read_only_session_directory(start, tiny, tmp_path, monkeypatch):
    """A server started on a read-only session directory serves what it holds and answers every
    write with a 503 naming the store; nothing saved is lost, and once the directory is writable
    again a restarted server goes on with the sessions."""
    _, model, tok = tiny
    with _small_disk(tmp_path / "disk", 4 * 1024**2):
        store = tmp_path / "disk" / "store"
        server = start(store)
        sid = server.new_session()
        assert server.chat(sid, "first", max_tokens=4).status_code == 200
        before = server.client.get(f"/v1/sessions/{sid}").json()
        server.stop()
        with _read_only(store, monkeypatch) as how:
            server = start(store)
            _expect(server.chat(sid, "not saved", max_tokens=4), 503, "storage_unavailable", "could not save")
            _expect(server.client.post("/v1/sessions", json={}), 503, "storage_unavailable")
            _expect(server.client.delete(f"/v1/sessions/{sid}"), 503, "storage_unavailable")
            assert server.client.get(f"/v1/sessions/{sid}").json()["messages"] == before["messages"], how
            assert server.chat(None, "no session, no disk", max_tokens=2).status_code == 200
            m = server.metrics()
            assert m["kvbudget_storage_errors_total"] == 3 and m["kvbudget_internal_errors_total"] == 0, how
            server.stop()
        server = start(store)
        assert server.chat(sid, "second", max_tokens=4).status_code == 200
        info = server.client.get(f"/v1/sessions/{sid}").json()
        assert [q for q, _ in pairs(info["messages"])] == ["first", "second"]
        server.stop()
        _intact(store, model, tok)


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif how == "foreign metadata":  # a valid safetensors file, metadata of the right format but nothing else
        path.write_bytes(st_save({"x": __import__("torch").zeros(2)},
                                 metadata={"kvbudget": json.dumps({"format": "kvbudget-session", "version": 1})}))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "deleted":
        path.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "foreign metadata", "empty", "deleted"])
def test_a_session_file_corrupted_between_turns(start, tmp_path, how):
    """The broken session answers 409 naming it; the others go on, and it can still be deleted.
    (Reading a session reads its file's header only: with the tensor data damaged but the
    header whole, the conversation is still shown, and the next turn finds the damage.)"""
    store = tmp_path / "store"
    server = start(store)
    broken, fine = server.new_session(), server.new_session()
    for sid in (broken, fine):
        assert server.chat(sid, "hello", max_tokens=2).status_code == 200
    server.stop()
    _corrupt(store / f"{broken}.kvb", how)
    server = start(store)  # nothing in memory: the files are read
    read, turn = server.client.get(f"/v1/sessions/{broken}"), server.chat(broken, "again", max_tokens=2)
    for r in (turn,) if how == "flipped byte" else (read, turn):
        error = _expect(r, 409, "session_broken", f"session '{broken}' is broken")
        assert str(store) not in error["message"], "the server's paths stay private"
    if how == "flipped byte":
        assert read.status_code == 200 and read.json()["turns"] == 1
    assert server.chat(fine, "again", max_tokens=2).status_code == 200
    assert server.client.get(f"/v1/sessions/{fine}").json()["turns"] == 2
    assert server.client.delete(f"/v1/sessions/{broken}").status_code == 200
    _expect(server.client.get(f"/v1/sessions/{broken}"), 404, "session_not_found")
    m = server.metrics()
    assert m["kvbudget_broken_sessions_total"] == (1 if how == "flipped byte" else 2)
    assert m["kvbudget_internal_errors_total"] == 0


# --- `kvbudget serve` killed -----------------------------------------------------------------------
HANG_ON_SAVE = """
import os, time
from contextlib import contextmanager
from kvbudget.runtime import sessionfile
from kvbudget.runtime.engine import Engine

real, saves = sessionfile.atomic_open, [0]

@contextmanager
def opener(target, mode="w"):  # the KVB_HANG_AT-th save writes half its file, then hangs
    saves[0] += 1
    with real(target, mode) as f:
        if saves[0] < int(os.environ["KVB_HANG_AT"]):
            yield f
            return
        class Half:
            def write(self, data):
                f.write(data[: len(data) // 2]); f.flush(); os.fsync(f.fileno())
                time.sleep(3600)
        yield Half()

sessionfile.atomic_open = opener
"""


def _turn(url: str, sid: str, question: str, max_tokens: int = 4) -> str:
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "session_id": sid, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _check(url: str, store: Path, sid: str, answered: list[tuple[str, str]], tiny) -> None:
    """The server at ``url`` (on ``store``) holds exactly the answered turns, every file loads
    and no temp file is left."""
    _, model, tok = tiny
    info = httpx.get(f"{url}/v1/sessions/{sid}", timeout=60).json()
    assert pairs(info["messages"]) == answered
    _intact(store, model, tok)


def test_an_engine_step_that_fails_outside_any_turn(start, tmp_path, monkeypatch):
    """An engine step that raises outside any one turn (here the decode step itself) ends the
    turn in flight with a 500 JSON error and the model thread goes on: the session answers its
    next turn from its file as if the failed turn never ran (its answer = a twin session's)."""
    server = start(tmp_path / "store")
    sid, twin = (server.client.post("/v1/sessions", json={}).json()["id"] for _ in range(2))
    for s in (sid, twin):
        assert server.chat(s, "first").status_code == 200
    decode, calls = Engine._decode, []

    def failing_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a decode step failed")
        return decode(self)

    monkeypatch.setattr(Engine, "_decode", failing_once)
    _expect(server.chat(sid, "second"), 500, "internal_error")
    answers = [server.chat(s, "second") for s in (sid, twin)]
    assert [r.status_code for r in answers] == [200, 200]
    assert answers[0].json()["choices"][0]["message"] == answers[1].json()["choices"][0]["message"]
    assert server.client.get(f"/v1/sessions/{sid}").json()["turns"] == 2


def test_killed_during_a_turn_and_during_a_save(tiny, tmp_path):
    """SIGKILL while a turn is being answered (streamed), then, after a restart on the same
    directory, while a turn is being saved (the save hangs half-written); a third server on the
    directory holds exactly the answered turns and goes on."""
    path = tiny[0]
    store = tmp_path / "store"
    args = ["--model", str(path), "--store", str(store), *FLAGS]
    server = Process(args, log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        sid = httpx.post(server.url + "/v1/sessions", json={}, timeout=60).json()["id"]
        answered = [("first", _turn(server.url, sid, "first"))]
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300, json={
                    "session_id": sid, "max_tokens": 64, "stream": True,
                    "messages": [{"role": "user", "content": "killed while answering"}]}) as r:
                for line in r.iter_lines():
                    if '"content": "' in line and '"role"' not in line:  # the first generated text
                        server.kill()
                        break
        except httpx.HTTPError:
            pass  # the connection died with the server
        assert server.proc.returncode == -9, "killed mid-answer"
    finally:
        server.kill()
    assert "loopback" in (tmp_path / "serve.log").read_text(), "a server without keys says it stays on loopback"
    # Restarted, with the first save from now on hanging half-written.
    server = Process(args, prelude=HANG_ON_SAVE, env={"KVB_HANG_AT": "1"})
    try:
        server.wait_ready()
        _check(server.url, store, sid, answered, tiny)
        before = (store / f"{sid}.kvb").read_bytes()
        try:
            httpx.post(server.url + "/v1/chat/completions", timeout=2, json={
                "session_id": sid, "max_tokens": 4, "messages": [{"role": "user", "content": "killed while saved"}]})
        except httpx.TimeoutException:
            pass  # the save hangs: the answer never comes
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in store.glob("*.tmp")):
            assert time.monotonic() < deadline, "the save did not start"
            time.sleep(0.05)
        server.kill()
        assert (store / f"{sid}.kvb").read_bytes() == before, "the half-written save never replaced the file"
    finally:
        server.kill()
    server = Process(args)
    try:
        server.wait_ready()
        _check(server.url, store, sid, answered, tiny)
        _turn(server.url, sid, "after the restarts")
    finally:
        server.stop()
