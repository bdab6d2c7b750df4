"""Streaming a reply: token ids become text deltas whose concatenation is the final answer, sent
as OpenAI-style server-sent events."""

from __future__ import annotations

import json


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

    def push(self, token_id: int) -> str:
        """The new text that ``token_id`` makes certain ('' if none yet)."""
        self.ids.append(token_id)
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
