"""The saved sessions as the server serves them: the session directory (`SessionStore`) under the
server's limits, its failures answered as API errors.

* Files are read and written on I/O threads (`read_later`, `save_later`), so the model thread
  decodes the other sessions meanwhile; a file is complete before its index row is written.
* A directory that cannot be written or read (full, read-only...) answers 503; the session stays
  as it was after its last saved turn.
* A file that cannot be read back makes that session broken (409); the others go on.
* An owner or the whole directory at its limit refuses new sessions and turns (429).
* A session idle for longer than ``session_ttl_s`` is deleted with its file (then 404).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..runtime.session import Session
from .config import ServeConfig
from .limits import limit_error
from .live import LiveSessions
from .metrics import Metrics
from .schema import APIError
from .sessionstore import SessionStore, Snapshot

log = logging.getLogger("kvbudget.serve")

# Session files read and written at once, off the model thread: a turn's start and its save
# (a checksum, a write and an fsync of the whole cache) overlap the other sessions' decoding,
# and each other.
IO_THREADS = 4


@dataclass(eq=False)
class Saving:
    """A session's file being written (`SavedSessions.save_later`)."""

    owner: str
    session_id: str
    snapshot: Snapshot
    future: Future

    def done(self) -> bool:
        return self.future.done()


def not_found(session_id: str, param: str = "session_id") -> APIError:
    """The 404 of a session that does not exist, or that belongs to another key."""
    return APIError(404, f"unknown session {session_id!r}", code="session_not_found", param=param)


class SavedSessions:
    """The session directory of ``config.store``; an expired session also leaves ``live``."""

    def __init__(self, config: ServeConfig, metrics: Metrics, live: LiveSessions) -> None:
        self.config, self.metrics, self.live = config, metrics, live
        self.store = SessionStore(config.store)
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="kvbudget-io")

    def close(self) -> None:
        """Finish the reads and writes started, then close the index."""
        self.io.shutdown(wait=True)
        self.store.close()

    def storage_error(self, doing: str, exc: Exception) -> APIError:
        """A 503 for a session directory that cannot be written or read (full, read-only...)."""
        self.metrics.count("storage_errors")
        log.error("session store: %s failed: %r", doing, exc)
        if isinstance(exc, OSError) and exc.errno is not None:
            reason = f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        return APIError(503, f"the session store could not {doing} ({reason}); the session is kept as it was "
                        "after its last saved turn", code="storage_unavailable",
                        headers={"Retry-After": "30"})

    def broken(self, session_id: str, exc: Exception) -> APIError:
        """The 409 of a session whose file cannot be read back."""
        self.metrics.count("broken_sessions")
        log.warning("session %r cannot be read back", session_id, exc_info=exc)
        reason = str(exc).split(": ", 1)[-1] if str(exc) else type(exc).__name__  # without the server's path
        return APIError(409, f"session {session_id!r} is broken: its file cannot be read back ({reason}); "
                        f"delete it (DELETE /v1/sessions/{session_id}) and start a new one",
                        code="session_broken", param="session_id")

    def check_limits(self, owner: str, new_session: bool) -> None:
        """Refuse (429, naming the limit) a new session or a turn once the owner or the whole
        directory holds as much as its limit allows."""
        lim = self.config.limits
        sessions, size = self.store.usage(owner)
        if new_session and sessions >= lim.max_sessions_per_key:
            raise limit_error(self.metrics, "max_sessions_per_key", 429,
                              f"this key holds {sessions} sessions, the most max_sessions_per_key="
                              f"{lim.max_sessions_per_key} allows: delete some (DELETE /v1/sessions/ID)")
        if size >= lim.max_stored_bytes_per_key:
            raise limit_error(self.metrics, "max_stored_bytes_per_key", 429,
                              f"this key's sessions take {size} bytes on disk, the most max_stored_bytes_per_key="
                              f"{lim.max_stored_bytes_per_key} allows: delete some (DELETE /v1/sessions/ID)")
        _, total = self.store.usage()
        if total >= lim.max_stored_bytes:
            raise limit_error(self.metrics, "max_stored_bytes", 429,
                              f"the session directory holds {total} bytes, the most max_stored_bytes="
                              f"{lim.max_stored_bytes} allows")

    def info(self, owner: str, session_id: str, param: str = "session_id") -> dict:
        """The index row of a session of ``owner``; 404 if there is none (another owner's
        included) or if it outlived the idle limit (it is deleted then)."""
        info = self.store.info(owner, session_id)
        if info is None:
            raise not_found(session_id, param)
        ttl = self.config.limits.session_ttl_s
        if ttl > 0 and info["updated"] < time.time() - ttl:
            self._expire(owner, session_id)
            raise not_found(session_id, param)
        return info

    # --- files, read and written on the I/O threads ------------------------------------------
    def read_later(self, owner: str, session_id: str, device: torch.device | str) -> Future:
        """Start reading the session's file to ``device`` on an I/O thread; `restore` continues it."""
        return self.io.submit(self._read, owner, session_id, device)

    def _read(self, owner: str, session_id: str, device: torch.device | str) -> tuple[dict, dict]:
        start = time.perf_counter()
        try:
            return self.store.read(owner, session_id, device)
        finally:
            self.metrics.count("load_seconds", time.perf_counter() - start)

    def restore(self, owner: str, session_id: str, reading: Future, model, tok) -> Session:
        """The session `read_later` read (waiting for it if it is not done), continued with
        ``model``; 503 or 409 if it could not be read."""
        try:
            tensors, meta = reading.result()
            return Session.restore(self.store.path(owner, session_id), tensors, meta, model, tok)
        except OSError as exc:  # the directory cannot be read (a missing file is a SessionFileError)
            raise self.storage_error("read the session", exc) from None
        except Exception as exc:  # a corrupt, truncated, missing or foreign file, however it fails
            raise self.broken(session_id, exc) from None

    def metadata(self, owner: str, session_id: str) -> dict:
        """The session file's JSON metadata; 503 or 409 if it cannot be read."""
        try:
            return self.store.metadata(owner, session_id)
        except OSError as exc:
            raise self.storage_error("read the session", exc) from None
        except Exception as exc:
            raise self.broken(session_id, exc) from None

    def save_later(self, owner: str, session_id: str, session: Session) -> Saving:
        """Snapshot the session now and write its file on an I/O thread (the copy of its cache to
        the CPU included); `commit` records it once written. The session takes no turn until
        then."""
        snapshot = Snapshot.of(session)
        return Saving(owner, session_id, snapshot, self.io.submit(self._write, owner, session_id, snapshot))

    def _write(self, owner: str, session_id: str, snapshot: Snapshot) -> int:
        start = time.perf_counter()
        size = self.store.write(owner, session_id, snapshot)
        self.metrics.count("saves")
        self.metrics.count("save_seconds", time.perf_counter() - start)
        return size

    def commit(self, saving: Saving) -> None:
        """Write the index row of a file `save_later` wrote (waiting for it if it is not done);
        503 if the file or the row could not be written (the previous file is intact)."""
        try:
            self.store.record(saving.owner, saving.session_id, saving.snapshot, saving.future.result())
        except (OSError, sqlite3.Error) as exc:
            raise self.storage_error("save the session", exc) from None

    def save(self, owner: str, session_id: str, session: Session) -> None:
        """Write the session's file and index row now (atomically); 503 if the directory refuses."""
        self.commit(self.save_later(owner, session_id, session))

    def delete(self, owner: str, session_id: str) -> bool:
        """Delete the session's index row and file; False if it was not known; 503 if it fails."""
        try:
            return self.store.delete(owner, session_id)
        except (OSError, sqlite3.Error) as exc:
            raise self.storage_error("delete the session", exc) from None

    def _expire(self, owner: str, session_id: str) -> None:
        self.live.drop((owner, session_id))
        try:
            if self.store.delete(owner, session_id):
                self.metrics.count("expired")
        except (OSError, sqlite3.Error) as exc:  # a read-only directory: the session stays on disk, unserved
            self.storage_error("delete an expired session", exc)

    def expire(self) -> int:
        """Delete every session idle for longer than ``session_ttl_s`` (with its file); returns
        how many went."""
        ttl = self.config.limits.session_ttl_s
        if ttl <= 0:
            return 0
        idle = self.store.idle(time.time() - ttl)
        for owner, session_id in idle:
            self._expire(owner, session_id)
        return len(idle)
