"""The model thread: the one thread that touches the model and the sessions.

It runs, in a loop: the session operations submitted to it (`submit`: create, describe, delete,
expire, in arrival order), then the manager's admission of waiting chat turns (``admit``), then
one step of the batching engine (`runtime.engine.Engine.step`: every turn in flight advances
together), then ``after_step``. Operations therefore run between two engine steps, never inside
one, and many turns are served at once without any lock around the sessions. While the engine
is idle its decode slots stay for `SLOTS_IDLE_S`, then go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from ..runtime.engine import Engine

log = logging.getLogger("kvbudget.serve")

# Seconds the engine's decode slots (static buffers, CUDA graphs) outlast its last step: turns that
# come back after a pause (their sessions' files being written, their clients between two
# requests) reuse them rather than growing the buffers and capturing the graphs again. Under the
# memory bound they go at once when a turn or a load needs their bytes (`LiveSessions.fit`).
SLOTS_IDLE_S = 2.0


class ModelThread:
    """The loop above on a thread of its own (an executor of one thread, with the engine's steps
    between the calls)."""

    def __init__(self, engine: Engine, admit: Callable[[], bool], after_step: Callable[[], None]) -> None:
        self.engine = engine
        self.admit = admit  # admits waiting turns; True while some still wait
        self.after_step = after_step
        self._calls: deque[tuple[Future, Callable, tuple]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._woken = False  # `wake` was called since the loop last looked
        self._stepped = time.monotonic()  # when the engine last stepped
        self._thread = threading.Thread(target=self._loop, name="kvbudget-model", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        """Run ``fn(*args)`` on the model thread between two engine steps; its future."""
        future: Future = Future()
        with self._wake:
            if self._closing:
                raise RuntimeError("the model thread is shut down")
            self._calls.append((future, fn, args))
            self._wake.notify()
        return future

    def wake(self) -> None:
        """Look at the waiting turns again (from any thread: a file was read or written)."""
        with self._wake:
            self._woken = True
            self._wake.notify()

    def shutdown(self, wait: bool = True) -> None:
        """Finish the calls and the turns queued, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if wait:
            self._thread.join()

    def _loop(self) -> None:
        waiting = False
        while True:
            with self._wake:
                while not self._calls and not self.engine.busy and not self._closing and not self._woken:
                    # Turns waiting for memory or for their session look again now and then (their
                    # deadlines run); otherwise a call or a new turn wakes the loop.
                    timeout = 0.05 if waiting else None
                    if self.engine.slots:  # idle decode slots go after SLOTS_IDLE_S
                        left = SLOTS_IDLE_S - (time.monotonic() - self._stepped)
                        if left > 0:
                            timeout = left if timeout is None else min(timeout, left)
                        else:
                            self.engine.release_slots()
                    if not self._wake.wait(timeout=timeout) and waiting:
                        break
                if self._closing and not self._calls and not self.engine.busy and not waiting and not self._woken:
                    self.engine.release_slots()
                    return
                calls = list(self._calls)
                self._calls.clear()
                self._woken = False
            for future, fn, args in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:
                        future.set_exception(exc)
            waiting = self.admit()
            if self.engine.busy:
                try:
                    self.engine.step()
                except Exception as exc:  # outside any one turn (each turn's own errors end that turn)
                    log.exception("an engine step failed: the turns in flight end with its error")
                    self.engine.abort(exc)
                self._stepped = time.monotonic()
                self.after_step()
