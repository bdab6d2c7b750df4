"""The sessions the server holds in memory, least recently used first, under the memory bound.

The KV bytes of the live sessions add up to at most ``config.memory`` (``--memory``, read at each
use). Before a turn, `make_room` moves least-recently-used sessions out of memory until the
turn's estimate fits (`Footprint.need`); their files are current (the manager writes each turn
through), so moving one out writes nothing. `measure_peak` records the peak a turn actually
reaches (the other live sessions + this one's own peak during the turn) in the metrics.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from ..runtime.session import Session
from .config import ServeConfig
from .metrics import Metrics
from .schema import APIError

Key = tuple[str, str]  # (owner, session id)


def _caches(session: Session) -> list:
    episodes = getattr(session, "episodes", None)
    return [ep.cache for ep in episodes] if episodes else [session.cache]


class LiveSessions:
    """Sessions in memory by (owner, id), least recently used first, and the KV bytes each holds."""

    def __init__(self, config: ServeConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.sessions: OrderedDict[Key, Session] = OrderedDict()
        self.held: dict[Key, int] = {}
        self.held_total = 0  # kept as a plain int so that the metrics page reads it without a lock

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

    def make_room(self, need: int, keep: Key | None) -> None:
        """Move least-recently-used sessions (not ``keep``) out of memory until the others and
        ``need`` more bytes fit under the bound; 400 if they cannot."""
        while self.held_total - self.held.get(keep, 0) + need > self.config.memory:
            victim = next((key for key in self.sessions if key != keep), None)
            if victim is None:
                raise APIError(
                    400,
                    f"this request may need {need} bytes of KV cache, more than the server's memory bound "
                    f"({self.config.memory} bytes); use a smaller max_tokens, a shorter message or a new session",
                    code="kv_memory_exceeded",
                )
            self.drop(victim)  # its file is current (write-through): nothing to write
            self.metrics.count("evictions")

    @contextmanager
    def measure_peak(self, key: Key | None, session: Session) -> Iterator[None]:
        """Around a turn of ``session`` (live as ``key``, or None for a temporary one): record in
        the metrics the most bytes held meanwhile, the other live sessions' and this turn's own
        peak, from the caches' exact accounting. The caches keep their lifetime peak."""
        lifetime = {id(c): c.peak_bytes for c in _caches(session)}
        for c in _caches(session):
            c.peak_bytes = c.nbytes()  # measure this turn's own peak ...
        others = self.held_total - self.held.get(key, 0)
        try:
            yield
        finally:
            caches = _caches(session)  # (EpiCache builds its episode caches in the first turn)
            self.metrics.peak(others + sum(c.peak_bytes for c in caches))
            for c in caches:
                c.peak_bytes = max(lifetime.get(id(c), 0), c.peak_bytes)  # ... then keep the lifetime peak
