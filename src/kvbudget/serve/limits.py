"""Request admission: the limits every request is held to before any work reaches the model.

Everything here runs in the request path (ASGI middleware and the route, on the event loop or a
tokenizer thread), never on the model thread, and knows nothing about how the model is run: the
bounded queue counts requests admitted to model work, whatever executes them, and a `Deadline`
is a cancellation token the model side polls. Each limit has one default (`Limits`), a
`kvbudget serve` flag, a counter in ``/metrics`` when it is hit (`Metrics.limit`) and a 4xx JSON
error whose ``code`` is the limit's name.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Limits
from .metrics import Metrics
from .schema import APIError, error_response


def limit_error(metrics: Metrics, name: str, status: int, message: str, param: str | None = None,
                headers: dict[str, str] | None = None) -> APIError:
    """The error for limit ``name`` (its code), counted in the metrics."""
    metrics.limit(name)
    return APIError(status, message, code=name, param=param, headers=headers)


# --- the body: size, UTF-8, JSON nesting -------------------------------------------------------
def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True  # FastAPI reads a body without a content type as JSON
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


def _path(parts: tuple) -> str | None:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def check_json(raw: bytes, max_depth: int, metrics: Metrics | None = None) -> object:
    """``raw`` parsed as JSON, or a 400 naming what is wrong: not UTF-8, not JSON, nested deeper
    than ``max_depth``, or a string that is not Unicode text (a lone UTF-16 surrogate written as
    ``\\ud800``: JSON allows the escape, no tokenizer or UTF-8 writer does). A body too deep
    counts as a hit of the limit in ``metrics``."""

    def too_deep() -> APIError:
        message = f"request body nests deeper than max_json_depth={max_depth}"
        if metrics is None:
            return APIError(400, message, code="max_json_depth")
        return limit_error(metrics, "max_json_depth", 400, message)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise too_deep() from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python reads
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    stack: list[tuple[object, int, tuple]] = [(body, 0, ())]
    while stack:  # iterative: a deep body cannot exhaust the Python stack here
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list)):
            if depth + 1 > max_depth:
                raise too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, where)
                stack.append((item, depth + 1, (*where, key)))
        elif isinstance(value, str):
            _check_text(value, where)
    return body


def _check_text(value: str, where: tuple) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        param = _path(where)
        raise APIError(400, f"{param or 'the request body'} holds a lone UTF-16 surrogate, which is not Unicode text",
                       code="invalid_unicode", param=param) from None


class BodyLimit:
    """ASGI middleware: reads the whole request body, refusing it (413) as soon as it passes
    ``max_body_bytes`` (a declared Content-Length before reading, a chunked upload while it is
    read), checks a JSON body with `check_json`, then hands the body on in one piece."""

    def __init__(self, app: ASGIApp, limits: Limits, metrics: Metrics) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            body = await self._read(scope, receive)
            if body and _is_json(_header(scope, b"content-type")):
                check_json(body, self.limits.max_json_depth, self.metrics)
        except APIError as exc:
            return await error_response(exc)(scope, receive, send)
        except _Disconnected:
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say it

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return limit_error(self.metrics, "max_body_bytes", 413,
                           f"request body is larger than max_body_bytes={self.limits.max_body_bytes}")


class _Disconnected(Exception):
    """The client went away while sending its body."""


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# --- messages: characters, then tokens ---------------------------------------------------------
class TokenCounter:
    """Counts prompt tokens off the model thread, with a copy of the tokenizer of its own (a
    tokenizer is not shared between threads) on one thread of its own. A text of ``n`` UTF-8
    bytes has at most ``n`` tokens (byte-level tokenizers spend at least one byte a token), so
    texts within the limit in bytes are not tokenized at all."""

    def __init__(self, tok, limits: Limits, metrics: Metrics) -> None:
        self.tok = copy.deepcopy(tok)
        self.limits, self.metrics = limits, metrics
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbudget-tokenize")

    def _count(self, texts: list[str]) -> int:
        return sum(len(self.tok(t, add_special_tokens=False).input_ids) for t in texts)

    async def check(self, messages: list[dict]) -> None:
        """A 400 naming the limit if a message is longer than ``max_message_chars`` or all of
        them together longer than ``max_request_tokens`` (characters first: cheap, and it bounds
        the tokenizing)."""
        lim = self.limits
        for i, m in enumerate(messages):
            if len(m["content"]) > lim.max_message_chars:
                raise limit_error(self.metrics, "max_message_chars", 400,
                                  f"messages[{i}].content has {len(m['content'])} characters, more than "
                                  f"max_message_chars={lim.max_message_chars}", param=f"messages[{i}].content")
        texts = [m["content"] for m in messages]
        if sum(len(t.encode("utf-8")) for t in texts) <= lim.max_request_tokens:
            return
        tokens = await asyncio.get_running_loop().run_in_executor(self.executor, self._count, texts)
        if tokens > lim.max_request_tokens:
            raise limit_error(self.metrics, "max_request_tokens", 400,
                              f"the messages hold {tokens} tokens, more than max_request_tokens="
                              f"{lim.max_request_tokens}", param="messages")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# --- the queue and the clock -------------------------------------------------------------------
class Admission:
    """A bounded queue in front of the model: at most ``max_queue`` requests admitted at once
    (running or waiting); one more gets a 429 with ``Retry-After`` (seconds: how long the
    admitted requests took on average lately, at least 1)."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limits, self.metrics = limits, metrics
        self.admitted = 0
        self._held_s = 1.0  # moving average of how long a request stays admitted

    def enter(self):
        """Admit one request; returns the function that lets it go (call it exactly once)."""
        if self.admitted >= self.limits.max_queue:
            wait = max(1, math.ceil(self._held_s))
            raise limit_error(self.metrics, "max_queue", 429,
                              f"the server is busy: {self.admitted} requests are queued (max_queue="
                              f"{self.limits.max_queue}); retry after {wait} s",
                              headers={"Retry-After": str(wait)})
        self.admitted += 1
        start = time.monotonic()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1
                self._held_s = 0.8 * self._held_s + 0.2 * (time.monotonic() - start)

        return release


class Deadline:
    """One request's time limit and cancellation, shared by the request path and the model side.

    The model side calls `check` where it can stop (before starting, before each prompt block
    and each generated token) and `commit` once the work is done and about to be kept (a turn is
    saved after it): from then on the request is answered whatever the clock says. The request
    path calls `expire` when its time is up (it answers 408 only if the work was not committed)
    and `cancel` when the client went away."""

    def __init__(self, seconds: float, metrics: Metrics | None = None) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.metrics = metrics
        self.state = "open"  # open -> committed | expired | cancelled
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def _error(self) -> APIError:
        if self.state == "cancelled":
            return APIError(499, "the client closed the request", code="client_closed_request")
        return APIError(408, f"the request took longer than request_timeout={self.seconds:g} s (queueing included)",
                        code="request_timeout")

    def _expired(self) -> bool:  # with the lock held
        if self.state == "open" and time.monotonic() > self.end:
            self.state = "expired"
            if self.metrics is not None:
                self.metrics.limit("request_timeout")
        return self.state in ("expired", "cancelled")

    def check(self) -> None:
        """Raise the request's error if it is out of time or cancelled."""
        with self._lock:
            if self._expired():
                raise self._error()

    def commit(self) -> None:
        """The work will be kept: raise as `check` does if it is too late, else no later
        `expire` or `cancel` takes effect."""
        with self._lock:
            if self._expired():
                raise self._error()
            self.state = "committed"

    def expire(self) -> bool:
        """Time is up: True (answer with `error`) unless the work was committed."""
        with self._lock:
            if self.state == "committed":
                return False
            if self.state == "open":
                self.state = "expired"
                if self.metrics is not None:
                    self.metrics.limit("request_timeout")
            return True

    def cancel(self) -> None:
        """The client went away: the work stops at its next `check`, unless committed."""
        with self._lock:
            if self.state == "open":
                self.state = "cancelled"

    def error(self) -> APIError:
        return self._error()
