"""What a turn may take of the served model: positions, and KV bytes against the memory bound.

The sizes are the model's (bytes of one cached token, sliding windows, positions) and its chat
template's (the tokens that close an answer), measured once when the server starts.
"""

from __future__ import annotations

from ..compress import Policy
from ..kv.cache import BudgetedCache
from ..methods import make_policy
from ..runtime.session import Session
from .schema import APIError


class Footprint:
    """The served model's sizes, and the positions and bytes a turn may take."""

    def __init__(self, model, tok) -> None:
        text = model.config.get_text_config(decoder=True)
        self.max_positions: int | None = getattr(text, "max_position_embeddings", None)
        probe = BudgetedCache(model.config, dtype=model.dtype)
        self.entry_bytes = Policy.entry_bytes(probe)  # one token, one layer, all KV heads
        self.windows = [layer.window for layer in probe.layers]  # sliding layers hold window - 1
        self.token_bytes = self.entry_bytes * len(probe.layers)  # one token in every layer
        # Tokens the chat template closes an answer with (fed again with the answer).
        asked = Session(model, tok, make_policy("full"))
        question = [{"role": "user", "content": "?"}]
        self.end_tokens = max(0, asked.new_tokens(question + [{"role": "assistant", "content": ""}], False)
                              - asked.new_tokens(question))

    def need(self, session: Session, new_tokens: int, max_tokens: int) -> int:
        """The most KV bytes ``session`` may hold while it takes ``new_tokens`` and answers with up
        to ``max_tokens``: every new token at full precision before any compression (in each
        episode's cache, for EpiCache); doubled when decoding may compress (the turn's decoding is
        rolled back from a snapshot of the cache taken at its first eviction). Scoring passes
        attend without storing, so they add nothing.

        The answer counts as `answer_tokens`."""
        policy = session.policy
        caches = max(1, len(getattr(session, "episodes", ())))
        tokens = new_tokens + self.answer_tokens(max_tokens)
        need = session.stored_bytes + tokens * self.token_bytes * caches
        if policy.decode_interval and max_tokens > policy.decode_interval:
            need *= 2
        return need

    def answer_tokens(self, max_tokens: int) -> int:
        """Cache entries and positions an answer of up to ``max_tokens`` may take. After decoding,
        the answer is fed again as text, with the template's end of turn. Its text, tokenized
        anew, may take more tokens than were generated (a token that is part of a character
        decodes to U+FFFD; pieces split differently): on random token ids of the default
        tokenizer, at most 4 tokens for 1, 14 for 8, 43 for 32. 2 x max_tokens + 8 covers those;
        generation itself (scratch entries, dropped before the answer is fed again) takes
        max_tokens."""
        return 2 * max_tokens + 8 + self.end_tokens

    def full_kv_bytes(self, tokens: int) -> int:
        """Bytes a full cache (no policy) would hold after ``tokens`` tokens."""
        return sum(tokens if w is None else min(tokens, w - 1) for w in self.windows) * self.entry_bytes

    def positions_left(self, next_position: int, rerotates: bool = False) -> int | None:
        """Model positions a conversation whose next token goes at ``next_position`` may still
        use; None: no limit (the model's is unknown, or the policy re-rotates its kept keys to
        contiguous positions after each eviction, so its positions stay within budget + block)."""
        if rerotates or not self.max_positions:
            return None
        return max(0, self.max_positions - next_position)

    def check_positions(self, session: Session, new_tokens: int, max_tokens: int) -> None:
        """Refuse (400) a turn of ``new_tokens`` prompt tokens and an answer of up to
        ``max_tokens`` that may run past the model's positions."""
        left = self.positions_left(session.next_position, session.policy.rerotate)
        answer = self.answer_tokens(max_tokens)
        if left is not None and new_tokens + answer > left:
            raise APIError(
                400,
                f"this turn may take {new_tokens + answer} positions ({new_tokens} prompt tokens + {answer} for an "
                f"answer of max_tokens {max_tokens}, fed back as text with the end of the turn), but the "
                f"conversation has {left} of the model's {self.max_positions} positions left "
                f"({session.next_position} used); send less, ask for fewer tokens or start a new session",
                code="context_length_exceeded", param="messages",
            )
