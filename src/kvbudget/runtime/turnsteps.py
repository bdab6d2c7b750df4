"""`TurnSteps`: one session's turn cut into the steps the batching engine (`runtime.engine`)
interleaves with other sessions' steps.

A turn has three parts, each the same code a session runs alone (`Session.ask_detailed`):

1. *question*: the messages sent before it, if any (`Session.context_steps`), then the user's
   message are fed block by block (`Session.question_steps`), one block per step, its forward
   shared with other turns' blocks of that step (`block`, then `fed_block`);
2. *decode*: one token per step (`answer.Decoding`), fed in a forward shared with every other
   session decoding at that step; the cache is compressed at the policy's interval after the
   session's own step; the decoded entries are scratch, rolled back at the end. Where the engine
   decodes it in a slot of its static batch (`runtime.slots`), ``row`` is that slot: the decoded
   entries are written back to the cache before each compression and the slot reloaded after,
   and the slot is left before the scratch entries are rolled back (what was decoded since the
   last reload is dropped there, not written back: `SlotRow.discard`);
3. *answer*: the answer's text is fed again block by block (as the question) and the turn
   compressed into the cache (`Session.answer_steps`).

The turn's result is a `Turn`, as `Session.ask_detailed` gives, and a finish reason ("stop": the
model ended its answer or a stop sequence came; "length": ``max_new_tokens`` reached).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack

from torch import Tensor

from ..compress import compress
from .answer import Decoding, Turn, greedy
from .prefill import Block
from .session import Session

PHASES = ("question", "decode", "answer", "done")


class TurnSteps:
    """One turn of ``session`` answering ``question`` (see the module docstring)."""

    def __init__(self, session: Session, question: str, max_new_tokens: int = 64,
                 choose: Callable[[Tensor], int] = greedy, stop: Sequence[str] = (),
                 on_token: Callable[[int], None] | None = None, context: list[dict] | None = None,
                 check: Callable[[], None] | None = None) -> None:
        self.session = session
        self.context = context
        self.max_new_tokens = max_new_tokens
        self.choose = choose
        self.stop = [s for s in stop if s]
        self.on_token = on_token
        self.turn = Turn(question, "", [])
        self.phase = "question"
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self._check = check
        self.done_callbacks: list[Callable[[TurnSteps], None]] = []
        self._steps = self._question(context, question)
        self._block: Block | None = None  # the block given by `block`, waiting for its forward
        self._scratch = ExitStack()
        self._asked: list[dict] = []
        self._decoding: Decoding | None = None
        self.row = None  # its `runtime.slots.SlotRow` while it decodes in the engine's static batch
        self.eager = False  # the engine decodes it eagerly for the rest of its answer (no slot took it)
        self._stop_hit: int | None = None  # where a stop sequence starts in the answer's text
        self._t0 = 0.0

    @property
    def feeding(self) -> bool:
        """Whether the next step feeds a block (of the question or of the answer)."""
        return self.phase in ("question", "answer")

    @property
    def tokens(self) -> list[int]:
        """The answer's tokens chosen so far."""
        return self._decoding.ids if self._decoding is not None else []

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def cancel(self) -> None:
        """Stop the turn at its next step (the engine fails it with `TurnCancelled`)."""
        self.cancelled = True

    def check(self) -> None:
        """Raise why the turn must stop now, if it must: `cancel` was called, or the ``check``
        it was made with raised (a request's deadline passed, its client went away). Called
        before each block fed and each token decoded, so a turn stops between two blocks of a long
        prompt as well as between two tokens."""
        if self.cancelled:
            raise TurnCancelled("the turn was cancelled")
        if self._check is not None:
            self._check()

    def result(self) -> Turn:
        """The answered turn; raises the turn's error if it failed."""
        if self.error is not None:
            raise self.error
        if not self.done:
            raise RuntimeError("the turn is not finished: run the engine")
        return self.turn

    # --- steps (the engine calls these) -------------------------------------------------------
    def block(self) -> Block | None:
        """The next block of the question or of the answer to feed (unless `check` raises): the
        engine runs its forward, alone or with other turns' blocks, and hands its logits to
        `fed_block`. None: there was none left (the turn went on to decoding or ended)."""
        self.check()
        if self._block is None:
            self._advance(None)
        return self._block

    def fed_block(self, logits: Tensor) -> None:
        """The logits [1, vocab] of `block`'s last token, after its forward: the block is
        compressed into the cache, then the turn is at its next block, decoding (the question is
        fed) or done (the answer is fed)."""
        self._block = None
        self._advance(logits)

    def _advance(self, logits: Tensor | None) -> None:
        try:
            self._block = self._steps.send(logits)
        except StopIteration as end:
            if self.phase == "question":
                self._start_decoding(*end.value)
            else:
                self._finish()

    def next_token(self) -> int | None:
        """The token to feed at this decode step, or None: the answer is over (the turn goes on
        with feeding the answer back). `check` first."""
        self.check()
        token = self._decoding.next_token()
        if token is None:
            self._end_decoding()
        return token

    def fed(self, logits: Tensor, top: int | None = None) -> bool:
        """The next-token logits [1, vocab] of the step that fed `next_token`'s token (``top``:
        their most likely token, if the engine read it for the whole batch); the cache is
        compressed when the policy's interval is due. Whether it was."""
        self._decoding.fed(logits, top)
        if not self._decoding.compress_due():
            return False
        cache = self.session.cache
        # While decoding, entries are only appended between two compressions: the cache holds
        # the most just before one, or when the answer ends (`_end_decoding`).
        cache.track_peak()
        if self.row is not None:
            self.row.write_back()
        compress(cache, self.session.policy)
        if self.row is not None and not self.row.reload():
            self.row, self.eager = None, True  # what it keeps no longer fits its slot: it goes on eagerly
        return True

    def fail(self, error: BaseException) -> None:
        """End the turn with ``error``: a decoding's scratch entries are rolled back; the session
        holds what the turn had fed before (a server drops it and reloads its file). Where the
        rollback fails too (the device out of memory while it puts a snapshot back), the turn
        still ends with ``error``; the session's cache is then left as it is: only its file
        holds the session."""
        for undo in (self._leave, self._steps.close, self._scratch.close):
            try:
                undo()
            except Exception:  # noqa: BLE001 - the turn fails with ``error`` whatever state it leaves
                pass
        self.error = error
        self.phase = "done"
        self._callbacks()

    # --- the parts ------------------------------------------------------------------------------
    def _question(self, context: list[dict] | None, question: str):
        """The messages before the question (if any), then the question, block by block."""
        if context:
            yield from self.session.context_steps(context)
        return (yield from self.session.question_steps(question))

    def _start_decoding(self, asked: list[dict], logits: Tensor, stats) -> None:
        session = self.session
        self._asked = asked
        self.turn.prefill_s = stats.seconds
        self.turn.kv_bytes = session.cache.nbytes()
        self._scratch.enter_context(session.cache.scratch())
        self._decoding = Decoding(session.policy, logits, self.max_new_tokens, session.eos, self._token,
                                  choose=self.choose)
        self.phase = "decode"
        self._t0 = time.perf_counter()

    def _token(self, token: int) -> None:
        if self.on_token is not None:
            self.on_token(token)
        if self.stop:
            text = self.session.tok.decode(self._decoding.ids, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
            if hits:
                self._stop_hit = min(hits)
                self._decoding.finish()

    def _leave(self, keep: bool = True) -> None:
        """Leave the engine's static batch before the answer's rollback: its slot freed, the
        entries decoded there dropped (`SlotRow.discard`; ``keep``: the cache's layers get their
        own copies of what they held, where no snapshot is put back over them)."""
        row, self.row = self.row, None
        if row is not None:
            row.discard(keep)

    def _end_decoding(self) -> None:
        self._leave(keep=not self.session.cache.snapshotted)
        self.session.cache.track_peak()
        self._scratch.close()  # the decoded entries go: the answer is fed again as text
        decoding, turn = self._decoding, self.turn
        turn.decode_s = time.perf_counter() - self._t0
        turn.token_ids = decoding.ids
        text = self.session.tok.decode(decoding.ids, skip_special_tokens=True)
        if self._stop_hit is not None:
            text = text[: self._stop_hit]
        turn.text = text.strip()
        stopped = decoding.stopped or self._stop_hit is not None
        self.finish_reason = "length" if not stopped and len(decoding.ids) >= self.max_new_tokens else "stop"
        self._steps = self.session.answer_steps(self._asked, turn.text)
        self.phase = "answer"

    def _finish(self) -> None:
        self.turn.peak_bytes = self.session.cache.peak_bytes
        self.phase = "done"
        self._callbacks()

    def _callbacks(self) -> None:
        for callback in self.done_callbacks:
            callback(self)


class TurnCancelled(Exception):
    """The turn was cancelled before it ended (`TurnSteps.cancel`)."""
