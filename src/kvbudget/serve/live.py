"""The sessions the server holds in memory, least recently used first, under the memory bound.

The bound (``config.memory``, ``--memory``, read at each use) covers the KV bytes of the live
sessions without a turn in flight, plus what every turn in flight reserved (`Footprint.need`, the
most its session may hold during the turn), plus ``extra``: KV memory held beside the sessions
(the engine's decode slots beyond the entries the sessions in them hold there). A turn reserves before it
starts (`reserve`), the slots before they grow (`fit`): the engine's idle decode slots are
dropped (`shed`), then least recently used idle sessions are moved out of memory until it fits
(their files are current: the manager writes each turn through, so moving one out writes
nothing); when the turns in flight leave no room, no session moves out and the turn waits for
them (a session joining the slots waits for a slot that an answer frees: `runtime.slots`). After
each engine step
`track_peak` records the KV bytes held at most (the idle sessions + each turn's own peak so far,
from the caches' exact accounting, + ``extra``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..runtime.session import Session
from .config import ServeConfig
from .metrics import Metrics
from .schema import APIError

Key = tuple[str, str]  # (owner, session id)


def _caches(session: Session) -> list:
    episodes = getattr(session, "episodes", None)
    return [ep.cache for ep in episodes] if episodes else [session.cache]


class LiveSessions:
    """Sessions in memory by (owner, id), least recently used first, the KV bytes each holds, and
    the bytes reserved by the turns in flight."""

    def __init__(self, config: ServeConfig, metrics: Metrics, extra: Callable[[], int] = lambda: 0,
                 shed: Callable[[], int] = lambda: 0) -> None:
        self.config = config
        self.metrics = metrics
        self.extra = extra  # KV bytes held beside the sessions and reservations (module docstring)
        self.shed = shed  # drops what of ``extra`` can go at once (idle decode slots); the bytes freed
        self.sessions: OrderedDict[Key, Session] = OrderedDict()
        self.held: dict[Key, int] = {}
        self.held_total = 0  # kept as a plain int so that the metrics page reads it without a lock
        # Turns in flight by a token of their own: (session key or None, session, bytes reserved,
        # the caches' lifetime peaks, restored when the turn ends).
        self.reserved: dict[object, tuple[Key | None, Session | None, int, dict]] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def __contains__(self, key: Key) -> bool:
        return key in self.sessions

    def get(self, key: Key) -> Session | None:
        """The live session of ``key``, or None (its place in the LRU order unchanged)."""
        return self.sessions.get(key)

    def use(self, key: Key) -> Session | None:
        """The live session of ``key``, now the most recently used; None if it is not live."""
        if key not in self.sessions:
            return None
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def add(self, key: Key, session: Session) -> None:
        """Hold ``session`` as the most recently used, with the bytes it stores now."""
        self.sessions[key] = session
        self.sessions.move_to_end(key)
        self.update(key)

    def update(self, key: Key) -> None:
        """Count the bytes the live session of ``key`` stores now (after a turn)."""
        self._set_held(key, self.sessions[key].stored_bytes)

    def drop(self, key: Key) -> bool:
        """Forget the in-memory copy of ``key`` (its file stays); False if it was not live."""
        was_live = self.sessions.pop(key, None) is not None
        self._set_held(key, None)
        return was_live

    def _set_held(self, key: Key, nbytes: int | None) -> None:
        if nbytes is None:
            self.held.pop(key, None)
        else:
            self.held[key] = nbytes
        self.held_total = sum(self.held.values())

    # --- turns in flight ------------------------------------------------------------------------
    def _busy(self) -> set:
        return {key for key, *_ in self.reserved.values() if key is not None}

    def committed(self, without: Key | None = None) -> int:
        """Bytes under the bound: idle live sessions' (not ``without``) + every reservation + ``extra``."""
        busy = self._busy() | {without}
        idle = sum(n for key, n in self.held.items() if key not in busy)
        return idle + sum(n for _, _, n, _ in self.reserved.values()) + self.extra()

    def fit(self, more: int, key: Key | None = None) -> bool:
        """Move least-recently-used idle sessions (not ``key``) out of memory until ``more`` bytes
        fit beside what is committed (``shed`` first: idle decode slots go before any session);
        False when the turns in flight leave no room, and then no session moves out."""
        busy = self._busy() | {key}
        if self.committed(without=key) + more > self.config.memory:
            self.shed()
        idle = sum(n for k, n in self.held.items() if k in self.sessions and k not in busy)
        if self.committed(without=key) - idle + more > self.config.memory:
            return False
        while self.committed(without=key) + more > self.config.memory:
            victim = next((k for k in self.sessions if k not in busy), None)
            if victim is None:
                return False
            self.drop(victim)  # its file is current (write-through): nothing to write
            self.metrics.count("evictions")
        return True

    def reserve(self, token: object, key: Key | None, need: int) -> bool:
        """Reserve ``need`` bytes for a turn (``token``) of the session ``key`` (None: a
        temporary session), moving least-recently-used idle sessions out of memory until it fits;
        False when the turns in flight leave no room (the turn waits); 400 when ``need`` alone is
        over the bound. A reservation the token held before is replaced."""
        self.reserved.pop(token, None)
        if need > self.config.memory:
            raise APIError(
                400,
                f"this request may need {need} bytes of KV cache, more than the server's memory bound "
                f"({self.config.memory} bytes); use a smaller max_tokens, a shorter message or a new session",
                code="kv_memory_exceeded",
            )
        if not self.fit(need, key):
            return False
        self.reserved[token] = (key, None, need, {})
        return True

    def start(self, token: object, session: Session) -> None:
        """The reserved turn ``token`` starts on ``session``: its caches measure this turn's peak."""
        key, _, need, _ = self.reserved[token]
        lifetime = {id(c): c.peak_bytes for c in _caches(session)}
        for c in _caches(session):
            c.peak_bytes = c.nbytes()
        self.reserved[token] = (key, session, need, lifetime)

    def release(self, token: object) -> None:
        """The turn ``token`` ended: its reservation goes; its caches keep their lifetime peak."""
        got = self.reserved.pop(token, None)
        if got is None or got[1] is None:
            return
        _, session, _, lifetime = got
        for c in _caches(session):
            c.peak_bytes = max(lifetime.get(id(c), 0), c.peak_bytes)

    def track_peak(self) -> None:
        """Record in the metrics the most KV bytes held since the last call: the idle sessions'
        and each turn in flight's own peak (an upper bound: the turns' peaks may not coincide)."""
        busy = self._busy()
        idle = sum(n for key, n in self.held.items() if key not in busy)
        turns = sum(sum(c.peak_bytes for c in _caches(s)) if s is not None else 0 for _, s, _, _ in self.reserved.values())
        self.metrics.peak(idle + turns + self.extra())
