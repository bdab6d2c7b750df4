"""Sessions: one conversation over a budgeted cache, in the model's chat template.

``add_context`` prefills text or messages block-wise under the budget; ``ask`` appends a question,
decodes greedily, and appends the question and its answer so follow-up questions see them
(multi-turn mode). The question is *not* used to evict context before it is answered: the turn
(question + answer) is compressed into the cache after the answer, like any other block.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..compress import Policy
from ..errors import KVBudgetError, SessionFileError
from ..methods import make_policy
from .answer import DECODE_MODES, Turn, answer, eos_ids
from .prefill import BLOCK_SIZE, Block, PrefillStats, drain, prefill_blocks
from .profile import ensure_profile, load_scores
from .sessionfile import (cache_from_file, cache_to_file, check_model, policy_from_file, read_session_file,
                          restore_session, session_to_file, write_file)
from .template import context_messages, render


@dataclass
class Session:
    """A conversation whose KV cache is held under ``policy``'s budget."""

    model: object
    tok: object
    policy: "Policy | str | None" = None
    block_size: int = BLOCK_SIZE
    messages: list[dict] = field(default_factory=list)
    decode: str = "auto"  # "auto", "eager", "static" or "graph": `runtime.answer` says what each does

    def __new__(cls, model=None, tok=None, policy=None, *args, **kwargs):
        # A policy may need another kind of session: EpiCache's holds one cache per episode.
        if cls is Session and isinstance(policy, Policy):
            cls = next((sub for sub in Session.__subclasses__() if sub.takes(policy)), cls)
        return super().__new__(cls)

    @staticmethod
    def takes(policy: Policy) -> bool:
        """Whether a session of this kind is the one for ``policy`` (subclasses say)."""
        return False

    def __post_init__(self) -> None:
        if self.decode not in DECODE_MODES:
            raise KVBudgetError(f"unknown decode mode '{self.decode}' (choose from {', '.join(DECODE_MODES)})")
        if self.policy is None:
            self.policy = make_policy("full")
        elif isinstance(self.policy, str):
            self.policy = make_policy(self.policy)
        if self.block_size <= 0:
            raise KVBudgetError(f"block size must be positive, got {self.block_size}")
        # The layer sensitivities of EpiCache's allocator: the model's profile (made once if none).
        self.sensitivity = None
        if self.policy.allocator == "sensitivity":
            self.sensitivity = load_scores(self.model, ensure_profile(self.model, self.tok, self.policy.profile))
        self.tokens: int | None = None  # the budget resolved against this conversation's context
        self.target_bytes: float | None = None  # a ratio budget's bytes for that context
        self.cache = self.new_cache()
        self.rendered = ""  # text of everything fed to the cache so far
        self.input_ids: list[int] = []  # token ids of everything fed, in order
        self.stats = PrefillStats()
        self.eos = eos_ids(self.model, self.tok)

    # --- rendering ------------------------------------------------------------------------------
    def _suffix(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, str]:
        full = render(self.tok, messages, add_generation_prompt)
        if not full.startswith(self.rendered):
            raise KVBudgetError("the chat template re-rendered earlier turns differently; cannot append incrementally")
        return full, full[len(self.rendered) :]

    def _encode(self, text: str) -> Tensor:
        ids = self.tok(text, add_special_tokens=not self.rendered, return_tensors="pt").input_ids
        return ids

    def new_cache(self):
        """An empty cache of this session's policy, model and resolved budget."""
        cache = self.policy.new_cache(self.model, self.sensitivity)
        cache.tokens, cache.target_bytes = self.tokens, self.target_bytes
        return cache

    def _feed(
        self, full: str, text: str, compress_last: bool = True, scoring_ids: Tensor | None = None
    ) -> tuple[Tensor, PrefillStats]:
        return drain(self.feed_steps(full, text, compress_last, scoring_ids))

    def feed_steps(
        self, full: str, text: str, compress_last: bool = True, scoring_ids: Tensor | None = None
    ) -> Generator[Block, Tensor, tuple[Tensor, PrefillStats]]:
        """Feed ``text``, the end of the rendered conversation ``full``, block by block: yields
        each block before its forward (`prefill.Block`: `drain` runs it alone, the batching
        engine with other sessions' blocks) and returns the last token's logits and the
        prefill's stats."""
        ids = self._encode(text)
        if self.tokens is None:  # a ratio budget depends on the first context
            context = ids.shape[1] + len(self.input_ids)
            self.tokens = self.policy.resolve(self.cache, context_tokens=context, block_size=self.block_size)
            self.target_bytes = self.policy.target_bytes(self.cache, context)
        logits, stats = yield from self._prefill_steps(ids, compress_last, scoring_ids)
        self.input_ids.extend(ids[0].tolist())
        self.rendered = full
        return logits, stats

    def _prefill_steps(self, ids: Tensor, compress_last: bool,
                       scoring_ids: Tensor | None) -> Generator[Block, Tensor, tuple[Tensor, PrefillStats]]:
        """Feed token ids into the session's cache, one block per step (episodic sessions feed
        several caches)."""
        self.cache.tokens, self.cache.target_bytes = self.tokens, self.target_bytes
        return (yield from prefill_blocks(self.model, self.cache, self.policy, ids, self.block_size, compress_last,
                                          scoring_ids, self.tok))

    # --- public API -----------------------------------------------------------------------------
    def fork(self) -> "Session":
        """An independent copy of this session (multi-request mode: one compressed context, each
        question asked on its own copy). Everything the conversation holds is copied (caches,
        messages, fed ids; an episodic session's episodes); model, tokenizer, policy and configs
        are shared: they are read-only here (a policy keeps no per-session state)."""
        shared = [self.model, self.tok, self.policy, getattr(self.model, "config", None), self.cache.config]
        return copy.deepcopy(self, memo={id(x): x for x in shared if x is not None})

    def add_context(self, context: "str | list[dict]", question: str | None = None) -> PrefillStats:
        """Prefill a document (str) or chat messages block-wise under the budget.

        With ``question``, compression is *query-aware*: after every block the question's queries
        score the cache (the optimistic single-question mode most papers report; label it so).
        Without it, the context is compressed without knowing what will be asked.
        """
        return drain(self.context_steps(context, question))

    def context_steps(self, context: "str | list[dict]",
                      question: str | None = None) -> Generator[Block, Tensor, PrefillStats]:
        """`add_context`, block by block (`feed_steps`); returns the prefill's stats."""
        new = context_messages(context)
        full, text = self._suffix(self.messages + new, add_generation_prompt=False)
        scoring = None
        if question is not None:
            # The question turn as it will follow the context (same template, generation prompt).
            asked = render(self.tok, self.messages + new + [{"role": "user", "content": question}], True)
            scoring = self.tok(asked[len(full) :], add_special_tokens=False, return_tensors="pt").input_ids
        _, stats = yield from self.feed_steps(full, text, scoring_ids=scoring)
        self.messages += new
        self.stats.add(stats)
        return stats

    @torch.inference_mode()
    def ask_detailed(
        self,
        question: str,
        max_new_tokens: int = 64,
        gold: str | None = None,
        history_answer: str | None = None,
        on_token: Callable[[int], None] | None = None,
        reference: list[int] | None = None,
        keep_steps: bool = False,
    ) -> Turn:
        """Answer ``question`` greedily; with ``gold``, ``reference`` or ``keep_steps``, also score
        answers teacher-forced or keep the decoding's log-distributions (`answer.answer`).

        The turn is then appended to the conversation with the generated answer, or with
        ``history_answer`` if given (evaluation appends the gold answer so that every policy sees
        the same conversation). ``on_token`` is called with each generated token id as soon as it
        is chosen (the server streams with it).
        """
        asked, logits, stats = drain(self.question_steps(question))
        turn = answer(self.model, self.tok, self.cache, self.policy, question, logits, max_new_tokens, self.eos,
                      self.decode, on_token, gold, reference, keep_steps)
        turn.prefill_s = stats.seconds
        drain(self.answer_steps(asked, turn.text if history_answer is None else history_answer))
        turn.peak_bytes = self.cache.peak_bytes
        return turn

    def question_steps(self, question: str) -> Generator[Block, Tensor, tuple[list[dict], Tensor, PrefillStats]]:
        """The first part of a turn: feed ``question`` as the user's next message with the
        generation prompt, block by block (`feed_steps`), the last block left uncompressed.
        Returns the messages asked, the last token's logits and the prefill's stats."""
        if not question or not question.strip():
            raise KVBudgetError("question is empty")
        asked = self.messages + [{"role": "user", "content": question}]
        full, text = self._suffix(asked, add_generation_prompt=True)
        logits, stats = yield from self.feed_steps(full, text, compress_last=False)
        return asked, logits, stats

    def answer_steps(self, asked: list[dict], answer_text: str) -> Generator[Block, Tensor, None]:
        """The last part of a turn, after the answer was decoded (its tokens were scratch): feed
        the answer again as text, block by block, and compress the whole turn into the cache, so
        that the cache always holds exactly the rendered conversation."""
        answered = asked + [{"role": "assistant", "content": answer_text}]
        full, text = self._suffix(answered, add_generation_prompt=False)
        yield from self.feed_steps(full, text)
        self.messages = answered

    def new_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> int:
        """How many tokens feeding ``messages`` after the conversation so far would add (the
        server checks a prompt against the model's positions before running it)."""
        _, text = self._suffix(self.messages + list(messages), add_generation_prompt)
        return int(self._encode(text).shape[1])

    def ask(self, question: str, max_new_tokens: int = 64) -> str:
        """Answer ``question`` greedily and append the turn to the conversation."""
        return self.ask_detailed(question, max_new_tokens).text

    # --- files ----------------------------------------------------------------------------------
    def payload(self) -> tuple[dict[str, Tensor], dict]:
        """The tensors and the JSON metadata that describe this session completely (what `save`
        writes). The metadata is a copy; the tensors are the cache's own, on its device, and hold
        this state until the session's next turn (`sessionfile.write_file` copies them to the
        CPU, on any thread)."""
        return session_to_file(self)

    def save(self, path: "str | os.PathLike") -> int:
        """Write this session (caches, conversation, policy) to ``path`` atomically; returns the
        bytes written. See `runtime.sessionfile` for the format."""
        return write_file(path, *self.payload())

    @classmethod
    def load(cls, path: "str | os.PathLike", model, tok) -> "Session":
        """A session saved by `save`, continued with ``model`` (the model it was saved with): same
        policy, same conversation, the same cache entry for entry."""
        path = Path(path)
        return cls.restore(path, *read_session_file(path), model, tok)

    @classmethod
    def restore(cls, path: "str | os.PathLike", tensors: dict[str, Tensor], meta: dict, model, tok) -> "Session":
        """The session of a file already read (`sessionfile.read_session_file`, on any thread and
        device), continued with ``model``: `load` in two halves, so that a server reads files off
        its model thread. ``path`` names the file in errors."""
        path = Path(path)
        check_model(meta, model, path)
        tensors = {name: t.to(model.device) for name, t in tensors.items()}
        session = Session(model, tok, policy_from_file(meta, path), block_size=meta["block_size"])  # the policy's kind
        restore_session(session, meta, tensors, path)
        return session

    def caches_to_file(self, tensors: dict[str, Tensor]) -> dict:
        """The session file's metadata of the session's caches, their tensors added to ``tensors``."""
        return {"cache": cache_to_file("", self.cache, tensors), "episodic": None}

    def caches_from_file(self, meta: dict, tensors: dict[str, Tensor], path: Path) -> None:
        """Fill the session's caches from a session file (`caches_to_file` wrote them)."""
        if meta["episodic"] is not None:
            raise SessionFileError(f"{path}: episodic session file, but its policy did not build an episodic session")
        cache_from_file("", self.cache, meta["cache"], tensors, path)
        self.cache.tokens, self.cache.target_bytes = self.tokens, self.target_bytes

    @property
    def stored_bytes(self) -> int:
        """KV bytes of every cache the session holds (EpiCache: all its episodes')."""
        return self.kv_bytes

    @property
    def kv_bytes(self) -> int:
        """Exact bytes the cache holds now."""
        return self.cache.nbytes()

    @property
    def tokens_seen(self) -> int:
        """Tokens fed to the conversation (answers decoded are fed again as text)."""
        return self.cache.tokens_fed

    @property
    def next_position(self) -> int:
        """The model position of the next token fed: ``tokens_seen``, or less where key
        re-rotation (`Policy.rerotate`) moved the kept keys back to contiguous positions."""
        return self.cache.get_seq_length()
