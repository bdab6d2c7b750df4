"""Which replica holds which session: the router's table of session homes.

A session's requests all go to its home replica, the one that holds it in memory; its home
changes only when that replica is gone. So a replica holding a session in memory is always its
home (a session never comes back to a replica that outlived its move, where a stale copy could
answer), and every turn is answered from the last saved one. A session the table does not know
(a new one, or one saved before this router started) gets the live replica that rendezvous
hashing picks for it: the same one for every router that sees the same replicas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

Key = tuple[str, str]  # (who asks: a hash of the Authorization header, session id)


def rendezvous(key: Key, replicas: Collection[int]) -> int:
    """The replica among ``replicas`` (indices) with the highest hash for ``key``."""
    if not replicas:
        raise ValueError("no replica to choose from")

    def weight(replica: int) -> bytes:
        return hashlib.sha256(f"{replica}\0{key[0]}\0{key[1]}".encode()).digest()

    return max(replicas, key=weight)


class SessionHomes:
    """Session -> home replica, kept until the session is deleted or its home is gone."""

    def __init__(self) -> None:
        self.homes: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self.homes)

    def home(self, key: Key, live: Collection[int]) -> int:
        """The home of ``key`` among the ``live`` replicas: its own while it is live, else (a new
        session, or one whose home is gone) the rendezvous choice, recorded."""
        replica = self.homes.get(key)
        if replica is None or replica not in live:
            replica = rendezvous(key, live)
            self.homes[key] = replica
        return replica

    def counts(self) -> dict[int, int]:
        """Sessions homed on each replica (those with any)."""
        out: dict[int, int] = {}
        for replica in self.homes.values():
            out[replica] = out.get(replica, 0) + 1
        return out

    def settle(self, key: Key, replica: int) -> None:
        """Record ``replica`` as the home of ``key`` (a session created there without an id)."""
        self.homes[key] = replica

    def forget(self, key: Key) -> None:
        """Drop a deleted session."""
        self.homes.pop(key, None)

    def gone(self, replica: int) -> int:
        """Forget every home on ``replica`` (it is gone, with what it held); how many were there."""
        moved = [k for k, r in self.homes.items() if r == replica]
        for k in moved:
            del self.homes[k]
        return len(moved)
