"""Helpers for the server tests, shared with benchmarks/soak_server.py: a uvicorn server in a
thread, `kvbudget serve` in its own process, a tiny random-weight model saved the way users save
one (plain transformers), and the soak driver (many clients, mixed valid and invalid requests,
streams cut short) with the check of every session's history against what was answered."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


class Server:
    """A uvicorn server for ``app`` in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app, headers: dict[str, str] | None = None) -> None:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=300, headers=headers)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()

    def chat(self, session_id=None, content=None, messages=None, stream=False, max_tokens=12, **extra):
        body = {"messages": messages or [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "stream": stream, **extra}
        if session_id is not None:
            body["session_id"] = session_id
        return self.client.post("/v1/chat/completions", json=body)

    def new_session(self, **body) -> str:
        r = self.client.post("/v1/sessions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.client.get("/metrics").text)


# --- a tiny model, saved as users save one ---------------------------------------------------------
def tiny_model(tok, positions: int = 1024, seed: int = 0):
    """A random-weight 2-layer Llama (hidden 64) over ``tok``'s vocabulary, built with plain
    transformers: fast enough to fuzz and soak a server with on a CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg).eval()


def slow_tiny_model(positions: int = 1024):
    """(model, tokenizer, slow): `tiny_model` over the default tokenizer, hooked, with a forward
    pre-hook that sleeps ``slow["sleep"]`` seconds per model call (a slow model on demand)."""
    import time

    from kvbudget.kv import attach
    from kvbudget.runtime.models import load_tokenizer

    tok = load_tokenizer()
    model = tiny_model(tok, positions=positions)
    attach(model)
    slow = {"sleep": 0.0}
    model.register_forward_pre_hook(lambda *_: time.sleep(slow["sleep"]))
    return model, tok, slow


def save_tiny_model(tok, path: Path, positions: int = 1024) -> Path:
    """``tiny_model`` and ``tok`` written with ``save_pretrained`` (a directory `--model` loads)."""
    if not (path / "config.json").exists():
        tiny_model(tok, positions).save_pretrained(path)
        tok.save_pretrained(path)
    return path


# --- `kvbudget serve` in its own process -----------------------------------------------------------
class Process:
    """``kvbudget serve ARGS`` on a free loopback port (``python -c PRELUDE`` runs first when
    given: a fault injected into the process); stopped by `kill` or `stop`."""

    def __init__(self, args: list[str], prelude: str | None = None, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), **(env or {}))
        full_env.setdefault("OMP_NUM_THREADS", "1")
        argv = ["serve", *args, "--port", str(self.port), "--log-level", "warning"]
        if prelude is None:
            cmd = [sys.executable, "-m", "kvbudget.cli", *argv]
        else:
            code = f"import sys\n{prelude}\nfrom kvbudget.cli import main\nraise SystemExit(main(sys.argv[1:]))"
            cmd = [sys.executable, "-c", code, *argv]
        self.log = open(log, "wb") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=self.log)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=10).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvbudget serve exited at startup with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("kvbudget serve did not start")
            time.sleep(0.2)

    def rss(self) -> int:
        """Resident bytes of the server process (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)

    def stop(self) -> None:
        """SIGTERM (uvicorn finishes and closes cleanly), SIGKILL after 60 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


# --- the soak -------------------------------------------------------------------------------------
@dataclass
class Turn:
    question: str
    answer: str | None  # the answer the client received; None if it does not know (stream cut short)
    kept: bool | None  # True: answered, must be in the history; False: refused, must not; None: either


@dataclass
class SoakLog:
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # a 5xx, or a status the request should not get
    cut: int = 0  # streams the client closed mid-answer
    sessions: dict[tuple[str, str], list[Turn]] = field(default_factory=dict)  # (key, id) -> its turns
    full: int = 0  # sessions that reached the model's positions (checked, then deleted)
    created: int = 0
    answered: int = 0  # turns the client got an answer for
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, what: str, status: int, allowed: set[int]) -> None:
        with self.lock:
            self.requests += 1
            self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1
            if status >= 500 or status not in allowed:
                self.unexpected.append(f"{what}: {status}")


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _deep(depth: int) -> bytes:
    return b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"


# Invalid requests: (label, method, path, body bytes or JSON, statuses allowed).
BAD = [
    ("not JSON", "POST", "/v1/chat/completions", b"{not json", {400}),
    ("not UTF-8", "POST", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', {400}),
    ("lone surrogate", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', {400}),
    ("nested", "POST", "/v1/chat/completions", _deep(5000), {400}),
    ("unknown field", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tempo": 1},
     {400}),
    ("wrong type", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, {400}),
    ("wrong max_tokens", "POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, {400}),
    ("no messages", "POST", "/v1/chat/completions", {"messages": []}, {400}),
    ("tools", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, {400}),
    ("bad session id", "GET", "/v1/sessions/..%2F..%2Fetc", None, {400, 404}),
    ("unknown session", "GET", "/v1/sessions/no-such-session", None, {404}),
    ("bad create", "POST", "/v1/sessions", {"id": 5}, {400}),
]


def soak(url: str, keys: list[str | None], seconds: float, clients: int = 4, sessions_per_client: int = 3,
         max_tokens: int = 8, big_body: int = 2 * 1024**2, seed: int = 0) -> SoakLog:
    """``clients`` clients at once for ``seconds``, each with its own key (``keys`` in turn;
    None: no key) and its own sessions, sending a random mix of: turns (JSON or streamed),
    streams closed after their first token, invalid requests (`BAD`, a body over the size
    limit sent chunked, a wrong key, another client's session), session reads, new sessions
    and deletions. Only loopback URLs are accepted."""
    host = httpx.URL(url).host
    assert host in ("127.0.0.1", "localhost", "::1"), f"soak refuses {url}: loopback only"
    log = SoakLog()
    end = time.monotonic() + seconds
    all_sessions: list[tuple[str | None, str]] = []

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        key = keys[c % len(keys)]
        n = 0
        with httpx.Client(base_url=url, timeout=600, headers=_auth(key)) as http:
            mine: list[str] = []
            while time.monotonic() < end:
                n += 1
                roll = rng.random()
                if not mine or (roll < 0.05 and len(mine) < sessions_per_client):
                    r = http.post("/v1/sessions", json={})
                    log.record("create", r.status_code, {200, 429})
                    if r.status_code == 200:
                        mine.append(r.json()["id"])
                        with log.lock:
                            log.created += 1
                            log.sessions[(key, mine[-1])] = []
                            all_sessions.append((key, mine[-1]))
                    continue
                sid = rng.choice(mine)
                question = f"[{c}.{n}] " + rng.choice(["Tell me about bees.", "What is two and two?",
                                                       "Name a colour.", "Say hello.", "Why is the sky blue?"])
                turns = log.sessions[(key, sid)]
                body = {"session_id": sid, "max_tokens": max_tokens, "messages": [{"role": "user", "content": question}]}
                if roll < 0.65:
                    if roll < 0.40:
                        r = http.post("/v1/chat/completions", json=body)
                        ended = _at_the_end(r)
                        log.record("turn", r.status_code, {200, 429} | ({400} if ended else set()))
                        answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else None
                        turn = Turn(question, answer, r.status_code == 200)
                    else:
                        turn, ended = _streamed(http, body, log, cut=roll >= 0.55)
                    turns.append(turn)
                    if turn.kept:
                        with log.lock:
                            log.answered += 1
                    if ended:  # the conversation reached the model's positions: check it, delete it
                        mine.remove(sid)
                        with log.lock:
                            del log.sessions[(key, sid)]
                            log.full += 1
                        wrong = _history_problem(http, sid, turns)
                        r = http.delete(f"/v1/sessions/{sid}")
                        log.record("delete a full session", r.status_code, {200})
                        if wrong:
                            with log.lock:
                                log.unexpected.append(f"{sid}: {wrong}")
                elif roll < 0.85:
                    label, method, path, payload, allowed = rng.choice(BAD)
                    kwargs = {"content": payload} if isinstance(payload, bytes) else {"json": payload}
                    r = http.request(method, path, **({} if payload is None else kwargs))
                    log.record(label, r.status_code, allowed)
                elif roll < 0.88:
                    def chunks():  # no Content-Length: the limit is counted while reading
                        for _ in range(big_body // 65536 + 1):
                            yield b" " * 65536
                    r = http.post("/v1/chat/completions", content=chunks())
                    log.record("big chunked body", r.status_code, {413})
                elif roll < 0.91:
                    r = httpx.get(url + f"/v1/sessions/{sid}", headers=_auth("wrong-key-" + "x" * 16), timeout=60)
                    log.record("wrong key", r.status_code, {401} if key else {200})
                elif roll < 0.94:
                    with log.lock:
                        others = [s for k, s in all_sessions if k != key]
                    if others:
                        r = http.get(f"/v1/sessions/{rng.choice(others)}")
                        log.record("another key's session", r.status_code, {404})
                elif roll < 0.98:
                    r = http.get(f"/v1/sessions/{sid}")
                    log.record("read", r.status_code, {200})
                else:
                    r = http.delete(f"/v1/sessions/{sid}")
                    log.record("delete", r.status_code, {200})
                    if r.status_code == 200:
                        mine.remove(sid)
                        with log.lock:
                            del log.sessions[(key, sid)]

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 900)
    return log


def _at_the_end(response: httpx.Response) -> bool:
    """Whether a turn was refused because its conversation reached the model's positions."""
    return response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def _history_problem(http: httpx.Client, sid: str, turns: list[Turn]) -> str | None:
    r = http.get(f"/v1/sessions/{sid}")
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    return check_history(pairs(r.json()["messages"]), turns)


def _streamed(http: httpx.Client, body: dict, log: SoakLog, cut: bool) -> tuple[Turn, bool]:
    """A streamed turn, and whether its conversation reached the model's positions; with
    ``cut`` the client closes the connection after the first text."""
    text, done = "", False
    question = body["messages"][0]["content"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            ended = _at_the_end(r)
            log.record("stream", r.status_code, {429} | ({400} if ended else set()))
            return Turn(question, None, False), ended
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:  # after the stream began: none is expected in a soak
                with log.lock:
                    log.unexpected.append(f"stream error event: {event['error']}")
                return Turn(question, None, None), False
            text += event["choices"][0]["delta"].get("content", "") or ""
            if cut and event["choices"][0]["delta"].get("role") is None:
                break  # the first token's text (or the end): hang up
    if cut and not done:
        log.record("stream cut short", 200, {200})
        with log.lock:
            log.cut += 1
        return Turn(question, None, None), False
    log.record("stream", 200 if done else 500, {200})
    return Turn(question, text if done else None, True if done else None), False


def check_history(question_answers: list[tuple[str, str]], turns: list[Turn]) -> str | None:
    """None if the (question, answer) pairs a session holds are exactly its answered turns in
    order, plus any of the turns whose fate the client does not know; else what differs."""
    i = 0
    for turn in turns:
        here = question_answers[i] if i < len(question_answers) else None
        if turn.kept is True:
            if here is None or here[0] != turn.question or (turn.answer is not None and here[1] != turn.answer):
                return f"answered turn {turn.question!r} missing or changed (found {here!r})"
            i += 1
        elif turn.kept is None and here is not None and here[0] == turn.question:
            i += 1
        elif turn.kept is False and here is not None and here[0] == turn.question:
            return f"refused turn {turn.question!r} is in the history"
    if i != len(question_answers):
        return f"{len(question_answers) - i} turns in the history that no client sent"
    return None


def pairs(messages: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) of each turn of a session's messages."""
    return [(messages[j]["content"], messages[j + 1]["content"]) for j in range(0, len(messages) - 1, 2)]


class Sampler:
    """Reads the server's /metrics every ``interval`` seconds in a thread: (seconds since start,
    resident bytes, KV bytes held) per sample."""

    def __init__(self, url: str, headers: dict[str, str], interval: float = 0.5) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._start = time.monotonic()

        def run() -> None:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
                while not self._stop.is_set():
                    m = parse_metrics(http.get("/metrics").text)
                    self.samples.append((time.monotonic() - self._start, m["kvbudget_process_resident_bytes"],
                                         m["kvbudget_kv_bytes_held"]))
                    self._stop.wait(interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, float, float]]:
        self._stop.set()
        self._thread.join(60)
        return self.samples

    def rss_after(self, seconds: float) -> float:
        """The first resident size sampled at or after ``seconds``."""
        return next(rss for t, rss, _ in self.samples if t >= seconds)


def soak_report(log: SoakLog, samples: list[tuple[float, float, float]], metrics: dict[str, float], seconds: float,
                warmup: float) -> dict:
    """What a soak did and what the server held: the numbers docs/serving.md quotes."""
    warm = next(rss for t, rss, _ in samples if t >= warmup)
    fives = sum(n for k, n in metrics.items() if k.startswith("kvbudget_http_responses_total") and '"5' in k)
    return {
        "seconds": round(seconds, 1),
        "requests": log.requests,
        "statuses": dict(sorted(log.statuses.items())),
        "streams_cut": log.cut,
        "sessions_full": log.full,
        "sessions": log.created,
        "sessions_at_end": len(log.sessions),
        "turns_answered": log.answered,
        "unexpected": log.unexpected[:10],
        "server_5xx": fives,
        "internal_errors": metrics["kvbudget_internal_errors_total"],
        "kv_bytes_peak": metrics["kvbudget_kv_bytes_peak"],
        "kv_bytes_limit": metrics["kvbudget_kv_bytes_limit"],
        "evictions": metrics["kvbudget_evictions_total"],
        "loads": metrics["kvbudget_session_loads_total"],
        "rss_start": samples[0][1],
        "rss_after_warmup": warm,
        "rss_end": samples[-1][1],
        "rss_max_after_warmup": max(rss for t, rss, _ in samples if t >= warmup),
    }


def check_soak(url: str, log: SoakLog) -> list[str]:
    """What is wrong with the sessions' histories after a soak (empty: every answered turn is
    there, in order, and nothing else)."""
    problems = []
    for (key, sid), turns in log.sessions.items():
        with httpx.Client(base_url=url, headers=_auth(key), timeout=120) as http:
            wrong = _history_problem(http, sid, turns)
        if wrong:
            problems.append(f"{sid}: {wrong}")
    return problems
