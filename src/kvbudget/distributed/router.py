"""The front of the replicas: a Ray Serve deployment that sends each request to the replica that
holds its session, and answers ``/metrics`` for all of them.

A request names its session by the ``X-Session-Id`` header, the ``session_id`` field of a chat
body, the ``id`` of a session it creates, or the path ``/v1/sessions/{id}``; its home comes from
`affinity.SessionHomes`. Requests without a session (a chat with the whole conversation, the
model list) go to the replicas in turn. The request and its answer pass through unchanged
(server-sent events stream through as they come); each replica checks keys and limits itself.

A replica that cannot be reached and whose actor Ray reports dead is gone: a new one starts in
its place, and its sessions move to the others, which load them from the session directory at
their last saved turn. A request that could not be delivered is delivered to the new home; one
whose replica died while answering gets a 503 (its turn is in the session file if it was saved:
``GET /v1/sessions/{id}`` shows which). A replica that fails a request but is alive stays: that
request gets a 503 to retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass

from ..serve.config import ServeConfig
from .affinity import Key, SessionHomes
from .aggregate import aggregate
from .replica import ReplicaServer

log = logging.getLogger("kvbudget.distributed")
# Connection headers of one hop, not passed on (RFC 9110, 7.6.1), and the length, set again.
HOP_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                         "upgrade", "host", "content-length"})
METRICS_TIMEOUT_S = 10.0
RESTART_DELAY_S = 30.0  # before another try at a replica that failed to start
ALIVE_TIMEOUT_S = 10.0  # a replica's actor that does not say its pid in this time is busy, not gone


@dataclass
class _Slot:
    handle: object
    url: str | None = None  # None while it starts
    pid: int | None = None


class SessionRouter:
    """Starts ``replicas`` `ReplicaServer` actors (``resources`` each, listening on ``host``; None:
    their node's address) and routes to them."""

    def __init__(self, config: ServeConfig, model: str | None, device: str | None, replicas: int,
                 resources: dict, host: str | None) -> None:
        import httpx
        import ray

        self.ray = ray
        self.config = config
        self.actor = ray.remote(max_restarts=0, **resources)(ReplicaServer)
        self.make = lambda: self.actor.remote(config, model, device, host)
        self.slots = [_Slot(self.make()) for _ in range(replicas)]
        urls = ray.get([s.handle.url.remote() for s in self.slots])  # each loads the model first
        pids = ray.get([s.handle.pid.remote() for s in self.slots])
        for slot, url, pid in zip(self.slots, urls, pids):
            slot.url, slot.pid = url, pid
        self.homes = SessionHomes()
        self.turn = itertools.count()
        self.failovers = 0
        # Idle connections expire before the replicas' (uvicorn closes them after 5 s): the router
        # never sends on a connection its replica is closing.
        self.client = httpx.AsyncClient(timeout=None, limits=httpx.Limits(keepalive_expiry=2.0))

    # --- replicas ------------------------------------------------------------------------------
    def live(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.url is not None]

    def replicas(self) -> list[dict]:
        """Each replica: its index, URL (None while it starts), process id and sessions homed there."""
        counts = self.homes.counts()
        return [{"index": i, "url": s.url, "pid": s.pid, "sessions": counts.get(i, 0)}
                for i, s in enumerate(self.slots)]

    async def _dead(self, index: int, url: str) -> bool:
        """Whether the replica at ``index`` that served ``url`` is gone (Ray says its actor died),
        not merely slow to answer."""
        from ray.exceptions import RayActorError

        slot = self.slots[index]
        if slot.url != url:
            return True  # already replaced
        try:
            await asyncio.wait_for(slot.handle.pid.remote(), ALIVE_TIMEOUT_S)
        except RayActorError:
            return True
        except asyncio.TimeoutError:
            return False
        return False

    def _lost(self, index: int, url: str) -> None:
        """The replica at ``index`` that served ``url`` cannot be reached: stop it, move its
        sessions, start another in its place (once: later failures of the same one change nothing)."""
        slot = self.slots[index]
        if slot.url != url:
            return
        log.warning("replica %d (%s) is gone; its sessions move to the others", index, slot.url)
        self.ray.kill(slot.handle, no_restart=True)
        self.failovers += 1
        self.homes.gone(index)
        self.slots[index] = _Slot(self.make())
        asyncio.get_running_loop().create_task(self._started(index, self.slots[index]))

    async def _started(self, index: int, slot: _Slot) -> None:
        """Wait for the new replica in ``slot``; where it fails to start, try another a while later."""
        try:
            slot.url, slot.pid = await _url_and_pid(slot.handle)
        except Exception:
            log.exception("replica %d did not start; another is tried in %g s", index, RESTART_DELAY_S)
            self.ray.kill(slot.handle, no_restart=True)
            await asyncio.sleep(RESTART_DELAY_S)
            if self.slots[index] is slot:
                self.slots[index] = _Slot(self.make())
                await self._started(index, self.slots[index])

    # --- requests ------------------------------------------------------------------------------
    async def __call__(self, request):
        from ..serve.schema import APIError, error_response

        if request.url.path == "/metrics" and request.method == "GET":
            return await self._metrics(request)
        body = await _read(request, self.config.limits.max_body_bytes)
        if body is None:
            return error_response(APIError(413, f"request body is larger than max_body_bytes="
                                           f"{self.config.limits.max_body_bytes}", code="max_body_bytes"))
        key = _session_key(request, body)
        while True:
            live = self.live()
            if not live:
                return error_response(APIError(503, "no replica is up; retry shortly", code="no_replica",
                                               headers={"Retry-After": "10"}))
            index = self.homes.home(key, live) if key is not None else live[next(self.turn) % len(live)]
            url = self.slots[index].url
            try:
                response = await self._send(index, url, request, body)
            except (_Unreached, _Lost) as exc:
                if not await self._dead(index, url):
                    return error_response(APIError(503, "the replica of this request did not answer; retry",
                                                   code="replica_unavailable", headers={"Retry-After": "1"}))
                self._lost(index, url)
                if isinstance(exc, _Unreached):
                    continue  # nothing was delivered: the new home gets it
                return error_response(APIError(
                    503, "the replica answering this request was lost; the session holds its last saved turn "
                    "(GET /v1/sessions/{id} shows it): retry", code="replica_lost", headers={"Retry-After": "1"}))
            return self._settle(request, key, index, response)

    def _settle(self, request, key: Key | None, index: int, response):
        """Record the home of a session created without an id, forget a deleted one."""
        path, method = request.url.path.rstrip("/"), request.method
        if method == "POST" and path == "/v1/sessions" and response.status_code == 200 and key is None:
            sid = json.loads(response.body).get("id")
            if isinstance(sid, str):
                self.homes.settle((_owner(request), sid), index)
        elif method == "DELETE" and key is not None and response.status_code == 200:
            self.homes.forget(key)
        return response

    async def _send(self, index: int, base: str, request, body: bytes):
        """Forward to replica ``index`` (at ``base``); its answer streamed back (read whole when a
        new session's id must be learnt from it)."""
        import httpx
        from starlette.background import BackgroundTask
        from starlette.responses import Response, StreamingResponse

        target = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        outgoing = self.client.build_request(request.method, target, headers=headers, content=body)
        try:
            upstream = await self.client.send(outgoing, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise _Unreached from None
        except httpx.TransportError:
            raise _Lost from None
        back = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        if request.url.path.rstrip("/") == "/v1/sessions" and request.method == "POST":
            try:
                content = await upstream.aread()
            except httpx.TransportError:
                raise _Lost from None
            finally:
                await upstream.aclose()
            return Response(content, status_code=upstream.status_code, headers=back)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.TransportError:
                if await self._dead(index, base):
                    self._lost(index, base)
                raise  # the stream ends short: the client sees it cut

        return StreamingResponse(relay(), status_code=upstream.status_code, headers=back,
                                 background=BackgroundTask(upstream.aclose))

    async def _metrics(self, request):
        """Every live replica's metrics page, added up (`aggregate`), and the router's own."""
        import httpx
        from starlette.responses import Response

        auth = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        live = self.live()

        async def page(index: int):
            try:
                return await self.client.get(self.slots[index].url + "/metrics", headers=auth,
                                             timeout=METRICS_TIMEOUT_S)
            except httpx.TransportError:
                return None

        answers = await asyncio.gather(*(page(i) for i in live))
        refused = next((a for a in answers if a is not None and a.status_code != 200), None)
        if refused is not None:  # a missing or wrong key: the replica's own answer
            return Response(refused.content, status_code=refused.status_code,
                            headers={k: v for k, v in refused.headers.items() if k.lower() not in HOP_HEADERS})
        pages = [a.text for a in answers if a is not None]
        own = (
            "# HELP kvbudget_replicas replicas answering\n# TYPE kvbudget_replicas gauge\n"
            f"kvbudget_replicas {len(pages)}\n"
            "# HELP kvbudget_replica_failovers_total replicas lost (their sessions moved to others)\n"
            f"# TYPE kvbudget_replica_failovers_total counter\nkvbudget_replica_failovers_total {self.failovers}\n"
        )
        return Response(aggregate(pages, own), media_type="text/plain; version=0.0.4")


class _Unreached(Exception):
    """The request did not reach the replica (nothing was delivered)."""


class _Lost(Exception):
    """The replica went away after the request was sent."""


async def _url_and_pid(handle) -> tuple[str, int]:
    return await handle.url.remote(), await handle.pid.remote()


async def _read(request, limit: int) -> bytes | None:
    """The request body; None once it passes ``limit`` bytes (read no further)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _owner(request) -> str:
    """Who asks, as the table keys it: a hash of the Authorization header ("" without one)."""
    auth = request.headers.get("authorization")
    return hashlib.sha256(auth.encode("latin-1")).hexdigest()[:32] if auth else ""


def _session_key(request, body: bytes) -> Key | None:
    """The session a request is about, if it names one."""
    sid = request.headers.get("x-session-id")
    path = request.url.path.rstrip("/")
    if sid is None and path.startswith("/v1/sessions/"):
        sid = path.removeprefix("/v1/sessions/")
    if sid is None and request.method == "POST" and path in ("/v1/chat/completions", "/v1/sessions") and body:
        try:
            data = json.loads(body)
        except ValueError:
            data = None  # the replica answers what is wrong with it
        if isinstance(data, dict):
            value = data.get("session_id" if path == "/v1/chat/completions" else "id")
            sid = value if isinstance(value, str) else None
    return (_owner(request), sid) if sid else None
