"""Server metrics in the Prometheus text format (written by hand: a few counters, gauges and one
histogram do not need a client library)."""

from __future__ import annotations

import os
import threading
from bisect import bisect_left
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """What the server counts. ``gauges`` are read when the page is rendered (sessions live, KV
    bytes held...), so they are never stale."""

    def __init__(self, gauges: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._lock = threading.Lock()
        self._gauges = gauges
        self.latency = Histogram()
        self.requests: dict[str, int] = {}  # by status code
        self.counters = {
            "evictions": 0,  # sessions dropped from memory to make room (their file is current)
            "loads": 0,  # sessions read back from disk
            "saves": 0,
            "save_seconds": 0.0,
            "load_seconds": 0.0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "decode_seconds": 0.0,
            "auth_failures": 0,  # requests refused for a missing or wrong API key
            "expired": 0,  # sessions deleted after session_ttl idle
            "storage_errors": 0,  # session store writes that failed (answered 503)
            "broken_sessions": 0,  # session files found unreadable (answered 409)
            "internal_errors": 0,  # exceptions no handler expected (answered 500)
        }
        self.limits: dict[str, int] = {}  # times each limit was hit, by its name
        self.responses: dict[str, int] = {}  # every HTTP response, by status
        self.last_tokens_per_second = 0.0
        self.kv_bytes_peak = 0  # most KV bytes live sessions held together, during any request

    def count(self, name: str, value: float = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def limit(self, name: str) -> None:
        with self._lock:
            self.limits[name] = self.limits.get(name, 0) + 1

    def response(self, status: int) -> None:
        with self._lock:
            self.responses[str(status)] = self.responses.get(str(status), 0) + 1

    def request(self, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1
            self.latency.observe(seconds)

    def generation(self, prompt_tokens: int, tokens: int, decode_seconds: float) -> None:
        with self._lock:
            self.counters["prompt_tokens"] += prompt_tokens
            self.counters["generated_tokens"] += tokens
            self.counters["decode_seconds"] += decode_seconds
            if decode_seconds > 0:
                self.last_tokens_per_second = tokens / decode_seconds

    def peak(self, held: int) -> None:
        with self._lock:
            self.kv_bytes_peak = max(self.kv_bytes_peak, held)

    def render(self) -> str:
        """The metrics page."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

        with self._lock:
            c = dict(self.counters)
            for name, (help_, value) in self._gauges().items():
                metric(f"kvbudget_{name}", "gauge", help_, [("", value)])
            metric("kvbudget_kv_bytes_peak", "gauge", "most KV bytes held by live sessions together (during requests)",
                   [("", self.kv_bytes_peak)])
            metric("kvbudget_evictions_total", "counter", "sessions moved out of memory to the disk store",
                   [("", c["evictions"])])
            metric("kvbudget_session_loads_total", "counter", "sessions loaded back from the disk store", [("", c["loads"])])
            metric("kvbudget_session_saves_total", "counter", "session files written", [("", c["saves"])])
            metric("kvbudget_session_save_seconds_total", "counter", "time spent writing session files",
                   [("", c["save_seconds"])])
            metric("kvbudget_session_load_seconds_total", "counter",
                   "time spent reading session files (checked, and copied to the model's device)", [("", c["load_seconds"])])
            metric("kvbudget_prompt_tokens_total", "counter", "tokens fed to the model from requests",
                   [("", c["prompt_tokens"])])
            metric("kvbudget_generated_tokens_total", "counter", "tokens generated", [("", c["generated_tokens"])])
            metric("kvbudget_decode_seconds_total", "counter", "time spent generating tokens", [("", c["decode_seconds"])])
            rate = c["generated_tokens"] / c["decode_seconds"] if c["decode_seconds"] else 0.0
            metric("kvbudget_tokens_per_second", "gauge", "generated tokens per second of decoding, over all requests",
                   [("", rate)])
            metric("kvbudget_last_request_tokens_per_second", "gauge", "decode tokens/s of the latest request",
                   [("", self.last_tokens_per_second)])
            metric("kvbudget_process_resident_bytes", "gauge", "resident memory of the server process",
                   [("", _rss())])
            metric("kvbudget_auth_failures_total", "counter", "requests refused for a missing or invalid API key",
                   [("", c["auth_failures"])])
            metric("kvbudget_limit_hits_total", "counter", "requests refused (or stopped) by a limit, by the limit's name",
                   [(f'{{limit="{name}"}}', n) for name, n in sorted(self.limits.items())])
            metric("kvbudget_sessions_expired_total", "counter", "sessions deleted after session_ttl idle",
                   [("", c["expired"])])
            metric("kvbudget_storage_errors_total", "counter", "session store writes that failed (answered 503)",
                   [("", c["storage_errors"])])
            metric("kvbudget_broken_sessions_total", "counter", "session files found unreadable (answered 409)",
                   [("", c["broken_sessions"])])
            metric("kvbudget_internal_errors_total", "counter", "unexpected exceptions (answered 500)",
                   [("", c["internal_errors"])])
            metric("kvbudget_http_responses_total", "counter", "HTTP responses of every route, by status",
                   [(f'{{code="{code}"}}', n) for code, n in sorted(self.responses.items())])
            metric("kvbudget_requests_total", "counter", "chat completion requests by HTTP status",
                   [(f'{{code="{code}"}}', n) for code, n in sorted(self.requests.items())])
            h = self.latency
            lines.append("# HELP kvbudget_request_duration_seconds chat completion latency (queueing included)")
            lines.append("# TYPE kvbudget_request_duration_seconds histogram")
            cumulative = 0
            for bound, n in zip((*h.buckets, float("inf")), h.counts):
                cumulative += n
                le = "+Inf" if bound == float("inf") else _number(bound)
                lines.append(f'kvbudget_request_duration_seconds_bucket{{le="{le}"}} {cumulative}')
            lines.append(f"kvbudget_request_duration_seconds_sum {_number(h.sum)}")
            lines.append(f"kvbudget_request_duration_seconds_count {h.count}")
        return "\n".join(lines) + "\n"


def _rss() -> int:
    """Resident bytes of this process (Linux /proc; 0 where it is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class CountResponses:
    """ASGI middleware: counts every response by status, whoever answered it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.response(message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"
