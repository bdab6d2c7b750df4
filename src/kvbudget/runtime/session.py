"""Sessions: one conversation over a budgeted cache, in the model's chat template.

``add_context`` prefills text or messages block-wise under the budget; ``ask`` appends a question,
decodes greedily, and appends the question and its answer so follow-up questions see them
(multi-turn mode). The question is *not* used to evict context before it is answered: the turn
(question + answer) is compressed into the cache after the answer, like any other block.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..compress import Policy, compress
from ..errors import KVBudgetError, SessionFileError
from ..methods import make_policy
from .decoder import StaticDecoder, supports
from .modelcall import run
from .prefill import BLOCK_SIZE, PrefillStats, prefill
from .profile import ensure_profile, load_scores
from .sessionfile import cache_from_file, cache_to_file, check_model, model_identity, read_session_file, write_file
from .static import UnsupportedStatic

DECODE_MODES = ("auto", "eager", "static", "graph")


@dataclass
class Turn:
    """One question answered by a session."""

    question: str
    text: str  # the generated answer
    token_ids: list[int]
    answer_logprob: float | None = None  # teacher-forced mean log-prob of the gold answer
    # Log-softmax [T, vocab] at the positions predicting a given reference answer's T tokens,
    # teacher-forced (fidelity against the full cache: eval/fidelity.py).
    reference_logprobs: Tensor | None = None
    # With ``keep_steps``: log-softmax [steps, vocab] of each greedy decoding step (the last one
    # predicts the end of the answer when it stopped by itself); its argmax is the answer.
    step_logprobs: Tensor | None = None
    prefill_s: float = 0.0  # question prefill
    decode_s: float = 0.0
    kv_bytes: int = 0  # held right before decoding (context + question)
    peak_bytes: int = 0  # most bytes the cache has held so far


@dataclass
class Session:
    """A conversation whose KV cache is held under ``policy``'s budget."""

    model: object
    tok: object
    policy: "Policy | str | None" = None
    block_size: int = BLOCK_SIZE
    messages: list[dict] = field(default_factory=list)
    # "auto": static buffers + one CUDA graph per decode step on CUDA where the cache allows it
    # (kvbudget.static), eager elsewhere; "eager"; "static" (static buffers, no graph: CPU too);
    # "graph" (static + CUDA graph, CUDA only).
    decode: str = "auto"

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
        self.cache = self.new_cache()
        self.rendered = ""  # text of everything fed to the cache so far
        self.input_ids: list[int] = []  # token ids of everything fed, in order
        self.stats = PrefillStats()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) | {self.tok.eos_token_id}
        self.eos.discard(None)

    # --- rendering ------------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # Base models without a template: a document, then "Question: ...\nAnswer: ..." turns.
        # Each rendering extends the previous one (prefix-stable), as incremental feeding needs.
        text = messages[0]["content"] if messages else ""
        for m in messages[1:]:
            text += f"\n\nQuestion: {m['content']}\nAnswer:" if m["role"] == "user" else f" {m['content']}"
        return text

    def _suffix(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, str]:
        full = self._render(messages, add_generation_prompt)
        if not full.startswith(self.rendered):
            raise KVBudgetError("the chat template re-rendered earlier turns differently; cannot append incrementally")
        return full, full[len(self.rendered) :]

    def _encode(self, text: str) -> Tensor:
        ids = self.tok(text, add_special_tokens=not self.rendered, return_tensors="pt").input_ids
        return ids

    def new_cache(self):
        """An empty cache of this session's policy, model and resolved budget."""
        cache = self.policy.new_cache(self.model, self.sensitivity)
        cache.tokens = self.tokens
        return cache

    def _feed(
        self, full: str, text: str, compress_last: bool = True, scoring_ids: Tensor | None = None
    ) -> tuple[Tensor, PrefillStats]:
        ids = self._encode(text)
        if self.tokens is None:  # a ratio budget depends on the first context
            self.tokens = self.policy.resolve(self.cache, context_tokens=ids.shape[1] + len(self.input_ids))
        logits, stats = self._prefill_ids(ids, compress_last, scoring_ids)
        self.input_ids.extend(ids[0].tolist())
        self.rendered = full
        return logits, stats

    def _prefill_ids(self, ids: Tensor, compress_last: bool, scoring_ids: Tensor | None) -> tuple[Tensor, PrefillStats]:
        """Feed token ids into the session's cache (episodic sessions feed several caches)."""
        self.cache.tokens = self.tokens
        return prefill(self.model, self.cache, self.policy, ids, self.block_size, compress_last, scoring_ids, self.tok)

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
        if isinstance(context, str):
            if not context.strip():
                raise KVBudgetError("context is empty")
            new = [{"role": "user", "content": context}]
        else:
            new = list(context)
            if not new:
                raise KVBudgetError("context is an empty list of messages")
            for i, m in enumerate(new):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise KVBudgetError(f"context message {i} must be a dict with 'role' and 'content'")
        full, text = self._suffix(self.messages + new, add_generation_prompt=False)
        scoring = None
        if question is not None:
            # The question turn as it will follow the context (same template, generation prompt).
            asked = self._render(self.messages + new + [{"role": "user", "content": question}], True)
            scoring = self.tok(asked[len(full) :], add_special_tokens=False, return_tensors="pt").input_ids
        _, stats = self._feed(full, text, scoring_ids=scoring)
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
        """Answer ``question`` greedily; with ``gold``, also score it teacher-forced.

        With ``reference`` (token ids, e.g. the full cache's answer), ``turn.reference_logprobs``
        holds the next-token log-distributions over that answer, teacher-forced; with
        ``keep_steps``, ``turn.step_logprobs`` holds those of this turn's own greedy decoding.

        The turn is then appended to the conversation with the generated answer, or with
        ``history_answer`` if given (evaluation appends the gold answer so that every policy sees
        the same conversation). ``on_token`` is called with each generated token id as soon as it
        is chosen (the server streams with it).
        """
        if not question or not question.strip():
            raise KVBudgetError("question is empty")
        asked = self.messages + [{"role": "user", "content": question}]
        full, text = self._suffix(asked, add_generation_prompt=True)
        logits, stats = self._feed(full, text, compress_last=False)
        turn = Turn(question, "", [], prefill_s=stats.seconds, kv_bytes=self.cache.nbytes())
        if gold is not None:
            turn.answer_logprob = self._answer_logprob(logits, gold)
        if reference is not None:
            ids = torch.tensor([reference], dtype=torch.long, device=self.model.device)
            turn.reference_logprobs = self._teacher_forced(logits, ids)[0]
        start = time.perf_counter()
        with self.cache.scratch():
            steps: list[Tensor] = []
            turn.token_ids = self._decode(logits, max_new_tokens, on_token, steps if keep_steps else None)
        if keep_steps:
            turn.step_logprobs = torch.cat(steps) if steps else None
        turn.decode_s = time.perf_counter() - start
        turn.text = self.tok.decode(turn.token_ids, skip_special_tokens=True).strip()
        answered = asked + [{"role": "assistant", "content": turn.text if history_answer is None else history_answer}]
        # The answer is fed again as one block (the decoded tokens were scratch), then the whole
        # turn is compressed into the cache: the cache always holds exactly the rendered text.
        full, text = self._suffix(answered, add_generation_prompt=False)
        self._feed(full, text)
        self.messages = answered
        turn.peak_bytes = self.cache.peak_bytes
        return turn

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
        writes)."""
        policy = self.policy
        if policy.spec is None:
            raise KVBudgetError("cannot save a session whose policy was not built by kb.policy() (its settings are unknown)")
        tensors: dict[str, Tensor] = {}
        meta = {
            "model": model_identity(self.model),
            "policy": {**policy.spec, "resolved_name": policy.name, "tokens": self.tokens},
            "block_size": self.block_size,
            "messages": self.messages,
            "rendered": self.rendered,
            "input_ids": self.input_ids,
            "stats": asdict(self.stats),
            "kv_bytes": self.stored_bytes,
            **self._caches_to_file(tensors),
        }
        return tensors, meta

    def save(self, path: "str | os.PathLike") -> int:
        """Write this session (caches, conversation, policy) to ``path`` atomically; returns the
        bytes written. See `runtime.sessionfile` for the format."""
        return write_file(path, *self.payload())

    @classmethod
    def load(cls, path: "str | os.PathLike", model, tok) -> "Session":
        """A session saved by `save`, continued with ``model`` (the model it was saved with): same
        policy, same conversation, the same cache entry for entry."""
        path = Path(path)
        tensors, meta = read_session_file(path, model.device)
        check_model(meta, model, path)
        spec = meta["policy"]
        # The block size is the session's: an older file may carry it among the policy's arguments.
        kwargs = {k: v for k, v in spec["kwargs"].items() if k != "block_size"}
        try:
            policy = make_policy(spec["name"], budget=spec["budget"], **kwargs)
        except KVBudgetError as exc:
            raise SessionFileError(f"{path}: cannot rebuild its policy: {exc}") from None
        session = Session(model, tok, policy, block_size=meta["block_size"])  # the session kind of the policy
        session.tokens = spec["tokens"]  # a ratio budget was resolved against that context
        session._caches_from_file(meta, tensors, path)
        session.messages = meta["messages"]
        session.rendered = meta["rendered"]
        session.input_ids = meta["input_ids"]
        session.stats = PrefillStats(**meta["stats"])
        return session

    def _caches_to_file(self, tensors: dict[str, Tensor]) -> dict:
        """The metadata of the session's caches, their tensors added to ``tensors``."""
        return {"cache": cache_to_file("", self.cache, tensors), "episodic": None}

    def _caches_from_file(self, meta: dict, tensors: dict[str, Tensor], path: Path) -> None:
        if meta["episodic"] is not None:
            raise SessionFileError(f"{path}: episodic session file, but its policy did not build an episodic session")
        cache_from_file("", self.cache, meta["cache"], tensors, path)
        self.cache.tokens = self.tokens

    @property
    def stored_bytes(self) -> int:
        """KV bytes of every cache the session holds (EpiCache: all its episodes')."""
        return self.kv_bytes

    # --- internals ------------------------------------------------------------------------------
    def _decode(
        self, logits: Tensor, max_new_tokens: int, on_token: Callable[[int], None] | None = None,
        steps: list[Tensor] | None = None,
    ) -> list[int]:
        """Greedy decoding; every ``policy.decode_interval`` new tokens the cache is compressed,
        so a long answer stays inside the budget (decode-time compression). With ``steps``, each
        step's log-softmax [1, vocab] is appended to it."""
        ids: list[int] = []
        interval = self.policy.decode_interval
        static = self._static_decoder(max_new_tokens)
        for step in range(max_new_tokens):
            if steps is not None:
                steps.append(logits.float().log_softmax(-1))
            token = int(logits[0].argmax())
            if token in self.eos:
                break
            ids.append(token)
            if on_token is not None:
                on_token(token)
            if step == max_new_tokens - 1:
                break
            inp = torch.tensor([[token]], device=self.model.device)
            if static is not None:
                logits = static.step(inp[0])
            else:
                logits = run(self.model, self.cache, inp).logits[:, -1]
                self.cache.track_peak()
            if interval and (step + 1) % interval == 0:
                if static is not None:
                    static.write_back(self.cache)
                compress(self.cache, self.policy)
                if static is not None:
                    try:
                        static.reload(self.cache)
                    except UnsupportedStatic:  # e.g. a dense layer turned ragged: go on eagerly
                        static.release(self.cache)
                        static = None
        if static is not None:
            static.write_back(self.cache)
            static.release(self.cache)  # the layers get their own copies back, buffers freed
        return ids

    def _static_decoder(self, max_new_tokens: int) -> StaticDecoder | None:
        """The static-buffer decoder for this answer, or None to decode eagerly."""
        mode = self.decode
        cuda = torch.device(self.model.device).type == "cuda"
        if mode == "eager" or (mode == "auto" and not cuda) or max_new_tokens < 2:
            return None
        if mode == "graph" and not cuda:
            raise KVBudgetError("decode='graph' needs a CUDA device (use 'static' or 'eager' on CPU)")
        reason = supports(self.cache)
        if reason is not None:
            if mode == "auto":
                return None
            raise KVBudgetError(f"decode='{mode}' is not possible here: {reason}")
        interval = self.policy.decode_interval
        compresses = self.policy.evicts and interval and interval < max_new_tokens - 1
        query_slots = interval if compresses and self.policy.scorer.queries != 0 else 0
        try:
            return StaticDecoder.from_cache(self.model, self.cache, capacity=max_new_tokens,
                                            graph=mode != "static", query_slots=query_slots)
        except UnsupportedStatic:
            if mode == "auto":
                return None
            raise

    def _answer_logprob(self, logits: Tensor, answer: str) -> float:
        """Mean log-probability of ``answer``'s tokens, teacher-forced after the current prompt."""
        ids = self.tok(answer, add_special_tokens=False, return_tensors="pt").input_ids.to(self.model.device)
        if ids.shape[1] == 0:
            raise KVBudgetError("gold answer is empty")
        logp = self._teacher_forced(logits, ids).gather(-1, ids[..., None])
        return float(logp.mean())

    def _teacher_forced(self, logits: Tensor, ids: Tensor) -> Tensor:
        """Log-softmax [1, T, vocab] predicting ``ids`` ([1, T]) after the current prompt, whose
        last ``logits`` are given; the fed tokens are forgotten afterwards."""
        with self.cache.scratch():
            all_logits = logits[:, None]
            if ids.shape[1] > 1:
                out = run(self.model, self.cache, ids[:, :-1])
                all_logits = torch.cat([all_logits, out.logits], dim=1)
        return all_logits.float().log_softmax(-1)

    @property
    def kv_bytes(self) -> int:
        """Exact bytes the cache holds now."""
        return self.cache.nbytes()

    @property
    def tokens_seen(self) -> int:
        return self.cache.get_seq_length()
