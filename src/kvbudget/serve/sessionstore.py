"""The server's session directory: one session file per session, and an SQLite index of them
(owner, id, policy, times, turns, tokens, bytes).

A session is named by its owner (the hash of the API key that created it, "" on a server without
keys) and its id: two keys may use the same id without meeting. Files of the empty owner are
``<id>.kvb`` in the directory; those of a key are in a sub-directory named for its hash.

A file is always written (atomically) before its index row, so the index never names a file
that is not complete (a creation killed between the two leaves a file without a row: an empty
session whose id the client never got, unknown to the server). Temp files left by a save that
was killed mid-write are removed when the directory opens.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from dataclasses import dataclass

import torch
from torch import Tensor

from ..runtime.session import Session
from ..runtime.sessionfile import read_metadata, read_session_file, write_file

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner TEXT NOT NULL,
    id TEXT NOT NULL,
    policy TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    kv_bytes INTEGER NOT NULL,
    file_bytes INTEGER NOT NULL,
    PRIMARY KEY (owner, id)
)
"""
_COLUMNS = ("owner", "id", "policy", "created", "updated", "turns", "tokens", "kv_bytes", "file_bytes")
_OWNER_DIR_CHARS = 32  # 128 bits of the owner's hash name its directory


@dataclass(frozen=True)
class Snapshot:
    """A session as it is between two turns, ready to be written from any thread: its file's
    tensors and metadata (`Session.payload`) and its index row's columns. The tensors are the
    session's own: it takes no turn until the snapshot is written (the server keeps its next
    turn waiting meanwhile)."""

    tensors: dict[str, Tensor]
    meta: dict
    policy: str
    turns: int
    tokens: int
    kv_bytes: int

    @classmethod
    def of(cls, session: Session) -> "Snapshot":
        """Snapshot ``session`` (on the thread that runs it)."""
        tensors, meta = session.payload()
        return cls(tensors, meta, session.policy.name, sum(m["role"] == "assistant" for m in session.messages),
                   session.tokens_seen, session.stored_bytes)


class SessionStore:
    """Session files under ``root`` with the index ``root/index.sqlite``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, used from the model thread and the event loop
        self._db = sqlite3.connect(self.root / "index.sqlite", check_same_thread=False, isolation_level=None)
        self._migrate()
        for stale in self.root.rglob(".*.kvb.*.tmp"):  # a save killed mid-write; its target is intact
            try:
                stale.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only directory: it serves what it holds, and its saves fail cleanly

    def _migrate(self) -> None:
        """Create the index, or give an index of sessions without owners the owner column."""
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(sessions)")]
        if columns and "owner" not in columns:
            self._db.executescript(
                "BEGIN; ALTER TABLE sessions RENAME TO sessions_unowned;" + _SCHEMA + ";"
                f"INSERT INTO sessions SELECT '', {', '.join(_COLUMNS[1:])} FROM sessions_unowned;"
                "DROP TABLE sessions_unowned; COMMIT;"
            )
        elif not columns:
            self._db.execute(_SCHEMA)

    def path(self, owner: str, session_id: str) -> Path:
        folder = self.root / owner[:_OWNER_DIR_CHARS] if owner else self.root
        return folder / f"{session_id}.kvb"

    def info(self, owner: str, session_id: str) -> dict | None:
        """The index row of ``session_id`` of ``owner``, or None if the store does not know it."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM sessions WHERE owner = ? AND id = ?",
                                   (owner, session_id)).fetchone()
        return dict(zip(_COLUMNS, row)) if row else None

    def usage(self, owner: str | None = None) -> tuple[int, int]:
        """(sessions, file bytes) of ``owner``, or of every owner with None."""
        where, args = ("WHERE owner = ?", (owner,)) if owner is not None else ("", ())
        with self._lock:
            n, size = self._db.execute(f"SELECT COUNT(*), COALESCE(SUM(file_bytes), 0) FROM sessions {where}",
                                       args).fetchone()
        return n, size

    def idle(self, before: float) -> list[tuple[str, str]]:
        """(owner, id) of the sessions last updated before ``before`` (a time.time())."""
        with self._lock:
            return self._db.execute("SELECT owner, id FROM sessions WHERE updated < ?", (before,)).fetchall()

    def save(self, owner: str, session_id: str, session: Session) -> int:
        """Write the session file, then its index row; returns the file's size in bytes."""
        snapshot = Snapshot.of(session)
        size = self.write(owner, session_id, snapshot)
        self.record(owner, session_id, snapshot, size)
        return size

    def write(self, owner: str, session_id: str, snapshot: Snapshot) -> int:
        """Write the session file of ``snapshot`` atomically (from any thread); returns its size.
        Its index row is `record`'s, once the file is complete."""
        path = self.path(owner, session_id)
        path.parent.mkdir(exist_ok=True)
        return write_file(path, snapshot.tensors, snapshot.meta)

    def record(self, owner: str, session_id: str, snapshot: Snapshot, size: int) -> None:
        """Write the index row of a session whose file `write` wrote (``size`` bytes)."""
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(owner, id) DO UPDATE SET "
                "updated = excluded.updated, turns = excluded.turns, tokens = excluded.tokens, "
                "kv_bytes = excluded.kv_bytes, file_bytes = excluded.file_bytes",
                (owner, session_id, snapshot.policy, now, now, snapshot.turns, snapshot.tokens, snapshot.kv_bytes,
                 size),
            )

    def read(self, owner: str, session_id: str, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict]:
        """The session file's tensors (on ``device``) and metadata, checked whole (from any
        thread); `Session.restore` continues them with the model."""
        return read_session_file(self.path(owner, session_id), device)

    def load(self, owner: str, session_id: str, model, tok) -> Session:
        """The saved session, continued with ``model``."""
        path = self.path(owner, session_id)
        return Session.restore(path, *read_session_file(path), model, tok)

    def metadata(self, owner: str, session_id: str) -> dict:
        """The session file's JSON metadata (conversation, policy), without reading its tensors."""
        return read_metadata(self.path(owner, session_id))

    def delete(self, owner: str, session_id: str) -> bool:
        """Forget a session: its row first, then its file. False if it was not known."""
        with self._lock:
            deleted = self._db.execute("DELETE FROM sessions WHERE owner = ? AND id = ?",
                                       (owner, session_id)).rowcount > 0
        self.path(owner, session_id).unlink(missing_ok=True)
        return deleted

    def close(self) -> None:
        with self._lock:
            self._db.close()
