"""The server's session store: one session file per session under a directory, and an SQLite
index of them (id, policy, times, turns, tokens, bytes).

A file is always written (atomically) before its index row, so the index never names a file
that is not complete; a row whose file is missing is reported as such when loaded. Temp files
left by a save that was killed mid-write are removed when the store opens.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from ..runtime.session import Session
from ..runtime.sessionfile import read_metadata

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    kv_bytes INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL
)
"""
_COLUMNS = ("id", "policy", "created", "updated", "turns", "tokens", "kv_bytes", "file_bytes")


class SessionStore:
    """Session files in ``root`` (``<id>.kvb``) with the index ``root/index.sqlite``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".*.kvb.*.tmp"):  # a save killed mid-write; its target is intact
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()  # one connection, used from the model thread and the event loop
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._db.execute(_SCHEMA)

    def path(self, session_id: str) -> Path:
        return self.root / f"{session_id}.kvb"

    def info(self, session_id: str) -> dict | None:
        """The index row of ``session_id``, or None if the store does not know it."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return dict(zip(_COLUMNS, row)) if row else None

    def __contains__(self, session_id: str) -> bool:
        return self.info(session_id) is not None

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def save(self, session_id: str, session: Session, policy: str) -> int:
        """Write the session file, then its index row; returns the file's size in bytes."""
        size = session.save(self.path(session_id))
        now = time.time()
        turns = sum(m["role"] == "assistant" for m in session.messages)
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "updated = excluded.updated, turns = excluded.turns, tokens = excluded.tokens, "
                "kv_bytes = excluded.kv_bytes, file_bytes = excluded.file_bytes",
                (session_id, policy, now, now, turns, session.tokens_seen, session.stored_bytes, size),
            )
        return size

    def load(self, session_id: str, model, tok) -> Session:
        return Session.load(self.path(session_id), model, tok)

    def metadata(self, session_id: str) -> dict:
        """The session file's JSON metadata (conversation, policy), without reading its tensors."""
        return read_metadata(self.path(session_id))

    def delete(self, session_id: str) -> bool:
        """Forget ``session_id``: its row first, then its file. False if it was not known."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount > 0
        self.path(session_id).unlink(missing_ok=True)
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()
