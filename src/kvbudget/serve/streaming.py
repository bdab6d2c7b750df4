"""Streaming a reply: the model thread's events reach the request's queue on the event loop in
batches (`Outbox`, `next_events`), token ids become text deltas whose concatenation is the final
answer (`TextStreamer`), sent as OpenAI-style server-sent events (`sse`)."""

from __future__ import annotations

import asyncio
import json
import threading


class Outbox:
    """Events sent from the model thread to requests' queues on the event loop, delivered in
    batches: the loop is woken once for every event that comes before it runs the delivery (a
    batched decode step's tokens for every stream: one wake-up, not one per stream and token)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: object) -> None:
        """Queue ``event`` for ``queue``, which ``loop`` serves (from any thread)."""
        with self._lock:
            batch = self._pending.setdefault(loop, [])
            batch.append((queue, event))
            if len(batch) > 1:
                return  # its delivery is scheduled already
        try:
            loop.call_soon_threadsafe(self._deliver, loop)
        except RuntimeError:  # the loop is closed: nothing will read these
            with self._lock:
                self._pending.pop(loop, None)
            raise

    def _deliver(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._pending.pop(loop, [])
        for queue, event in batch:
            queue.put_nowait(event)


async def next_events(queue: asyncio.Queue, timeout: float | None) -> list:
    """Every event in ``queue``, once there is at least one; TimeoutError after ``timeout``
    seconds without any (None: no limit)."""
    async with asyncio.timeout(timeout):
        events = [await queue.get()]
    while not queue.empty():
        events.append(queue.get_nowait())
    return events


class TextStreamer:
    """Turns generated token ids into text deltas.

    The whole prefix is decoded again at each token (a token alone may be half a character, and
    tokenizers join pieces with context-dependent spaces). The session strips its final answer,
    so leading spaces are dropped and trailing spaces are held back until more text follows;
    an incomplete UTF-8 sequence (decoded as U+FFFD) is held back until it completes. With stop
    sequences, text that may be the start of one is held back too, and nothing from the first one
    on is ever sent (the answer is cut there).
    """

    def __init__(self, tok, stop: list[str] | None = None) -> None:
        self.tok = tok
        self.stop = [s for s in stop or [] if s]
        self.ids: list[int] = []
        self.sent = ""

    def push(self, *token_ids: int) -> str:
        """The new text that ``token_ids`` (the next tokens) make certain ('' if none yet)."""
        self.ids.extend(token_ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):
            return ""
        stable = self._before_stop(text).rstrip()
        if not stable.startswith(self.sent):
            return ""  # the decoding of earlier tokens changed: wait for the final text
        delta, self.sent = stable[len(self.sent) :], stable
        return delta

    def _before_stop(self, text: str) -> str:
        """``text`` cut at the first stop sequence, less any end that may begin one."""
        for s in self.stop:
            if (i := text.find(s)) >= 0:
                text = text[:i]
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    text = text[:-n]
                    break
        return text

    def finish(self, final: str) -> str:
        """What is left of ``final`` (the session's answer) after the deltas already sent."""
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


def sse(payload: dict | str) -> str:
    """One server-sent event carrying ``payload`` (JSON) or a bare string such as ``[DONE]``."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
