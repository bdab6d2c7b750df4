"""The session manager: persistent sessions over one model, under one memory bound.

* **One model step at a time.** Every call that touches the model or a session runs on a single
  worker thread (`call`), so requests queue in arrival order; correctness first.
* **Memory bound.** The KV bytes of the sessions held in memory add up to at most ``memory``.
  Before a turn runs, the manager estimates the most its session can hold during the turn
  (`_need`: today's bytes + every new token at full precision, doubled if decode-time
  compression may snapshot the cache) and moves least-recently-used sessions out of memory
  until that fits. The peak actually reached (other sessions + this one's own peak during the
  turn, from the cache's exact accounting) is recorded in the metrics.
* **Write-through store.** A session's file is rewritten (atomically) after each of its turns,
  so moving a session out of memory costs nothing, a crash loses no answered turn, and a turn
  that fails leaves the session as it was saved.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..kv.cache import BudgetedCache
from ..errors import KVBudgetError, SessionFileError
from ..runtime.session import Session
from ..compress import Policy
from ..methods import make_policy
from .config import ServeConfig
from .metrics import Metrics
from .schema import APIError, ChatRequest, check_session_id
from .sessionstore import SessionStore

# Called on the model thread: ("ready", None) once a request passed every check, then
# ("token", id) for each generated token.
Events = Callable[[str, object], None]


@dataclass
class TurnResult:
    """One answered request, with what the cache holds after it."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    session_id: str | None
    policy: str
    budget: str | None
    tokens_seen: int
    kv_bytes: int
    full_kv_bytes: int
    prefill_s: float
    decode_s: float

    def stats(self) -> dict:
        """The ``kvbudget`` block of a response: KV bytes held and the compression."""
        return {
            "session_id": self.session_id,
            "policy": self.policy,
            "budget": self.budget,
            "tokens_seen": self.tokens_seen,
            "kv_bytes": self.kv_bytes,
            "full_kv_bytes": self.full_kv_bytes,
            "compression": round(self.full_kv_bytes / self.kv_bytes, 3) if self.kv_bytes else None,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
        }


def _caches(session: Session) -> list:
    episodes = getattr(session, "episodes", None)
    return [ep.cache for ep in episodes] if episodes else [session.cache]


class SessionManager:
    """Sessions in memory (LRU order) and on disk, served one model call at a time."""

    def __init__(self, model, tok, config: ServeConfig) -> None:
        self.model, self.tok, self.config = model, tok, config
        self.policies: dict[str, Policy] = {}
        for name in config.policies:
            policy = make_policy(name, budget=config.budget)
            self.policies.setdefault(policy.name, policy)
            self.policies.setdefault(name.strip().lower(), policy)
        self.default_policy = make_policy(config.policies[0], budget=config.budget)
        self.store = SessionStore(config.store)
        self.live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.metrics = Metrics(self._gauges)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbudget-model")
        self._held: dict[str, int] = {}
        self._held_total = 0  # kept as a plain int so that the metrics page reads it without a lock
        text = model.config.get_text_config(decoder=True)
        self.max_positions = getattr(text, "max_position_embeddings", None)
        probe = BudgetedCache(model.config, dtype=model.dtype)
        self._entry_bytes = Policy.entry_bytes(probe)  # one token, one layer, all KV heads
        self._windows = [layer.window for layer in probe.layers]  # sliding layers hold window - 1
        self._token_bytes = self._entry_bytes * len(probe.layers)  # one token in every layer

    # --- the model thread --------------------------------------------------------------------
    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread (after the calls queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        """Finish the queued calls, then close the index (every session file is already current)."""
        self.executor.shutdown(wait=True)
        self.store.close()

    # --- memory ------------------------------------------------------------------------------
    def _gauges(self) -> dict[str, tuple[str, float]]:
        return {
            "sessions_live": ("sessions held in memory", len(self.live)),
            "sessions_stored": ("sessions in the disk store", self.store.count()),
            "kv_bytes_held": ("KV bytes held by live sessions", self._held_total),
            "kv_bytes_limit": ("the memory bound (--memory)", self.config.memory),
        }

    def _set_held(self, session_id: str, nbytes: int | None) -> None:
        if nbytes is None:
            self._held.pop(session_id, None)
        else:
            self._held[session_id] = nbytes
        self._held_total = sum(self._held.values())

    def _make_room(self, need: int, keep: str | None) -> None:
        """Move least-recently-used sessions (not ``keep``) out of memory until the others and
        ``need`` more bytes fit under the bound."""
        while self._held_total - self._held.get(keep, 0) + need > self.config.memory:
            victim = next((sid for sid in self.live if sid != keep), None)
            if victim is None:
                raise APIError(
                    400,
                    f"this request may need {need} bytes of KV cache, more than the server's memory bound "
                    f"({self.config.memory} bytes); use a smaller max_tokens, a shorter message or a new session",
                    code="kv_memory_exceeded",
                )
            del self.live[victim]  # its file is current (write-through): nothing to write
            self._set_held(victim, None)
            self.metrics.count("evictions")

    def _need(self, session: Session, new_tokens: int, max_tokens: int) -> int:
        """The most KV bytes ``session`` may hold while it takes ``new_tokens`` and answers with up
        to ``max_tokens``: every new token at full precision before any compression (in each
        episode's cache, for EpiCache); doubled when decoding may compress (the turn's decoding is
        rolled back from a snapshot of the cache taken at its first eviction). Scoring passes
        attend without storing, so they add nothing."""
        policy = session.policy
        caches = max(1, len(getattr(session, "episodes", ())))
        need = session.stored_bytes + (new_tokens + max_tokens) * self._token_bytes * caches
        if policy.decode_interval and max_tokens > policy.decode_interval:
            need *= 2
        return need

    def full_kv_bytes(self, tokens: int) -> int:
        """Bytes a full cache (no policy) would hold after ``tokens`` tokens."""
        return sum(tokens if w is None else min(tokens, w - 1) for w in self._windows) * self._entry_bytes

    # --- sessions (model thread) -------------------------------------------------------------
    def _policy(self, name: str | None) -> Policy:
        if name is None:
            return self.default_policy
        policy = self.policies.get(name.strip().lower())
        if policy is None:
            served = ", ".join(sorted({p.name for p in self.policies.values()}))
            raise APIError(400, f"policy {name!r} is not served here (this server runs: {served})",
                           code="policy_not_served", param="policy")
        return policy

    def _session(self, session_id: str) -> Session:
        """A live session, loaded from the store if it is not in memory."""
        if session_id in self.live:
            self.live.move_to_end(session_id)
            return self.live[session_id]
        info = self.store.info(session_id)
        if info is None:
            raise APIError(404, f"unknown session {session_id!r}", code="session_not_found", param="session_id")
        self._make_room(info["kv_bytes"], keep=None)
        try:
            session = self.store.load(session_id, self.model, self.tok)
        except SessionFileError as exc:
            raise APIError(500, f"session {session_id!r} cannot be loaded: {exc}", code="session_unreadable") from None
        self.live[session_id] = session
        self._set_held(session_id, session.stored_bytes)
        self.metrics.count("loads")
        return session

    def _save(self, session_id: str, session: Session) -> None:
        start = time.perf_counter()
        self.store.save(session_id, session, session.policy.name)
        self.metrics.count("saves")
        self.metrics.count("save_seconds", time.perf_counter() - start)

    def _drop(self, session_id: str) -> None:
        """Forget the in-memory copy (after a failed turn: the file holds the last good state)."""
        self.live.pop(session_id, None)
        self._set_held(session_id, None)

    def create(self, session_id: str | None = None, policy: str | None = None) -> dict:
        """A new, empty session (saved at once, so it survives a restart)."""
        if session_id is None:
            session_id = uuid.uuid4().hex
        check_session_id(session_id, "id")
        if session_id in self.live or session_id in self.store:
            raise APIError(409, f"session {session_id!r} already exists", code="session_exists", param="id")
        session = Session(self.model, self.tok, self._policy(policy), block_size=self.config.block_size)
        self._save(session_id, session)
        self.live[session_id] = session
        self._set_held(session_id, session.stored_bytes)
        return self.describe(session_id)

    def describe(self, session_id: str) -> dict:
        """What ``GET /v1/sessions/{id}`` shows: the conversation, policy and KV bytes."""
        info = self.store.info(session_id)
        if info is None:
            raise APIError(404, f"unknown session {session_id!r}", code="session_not_found")
        live = self.live.get(session_id)
        if live is not None:
            messages, tokens, kv = live.messages, live.tokens_seen, live.stored_bytes
            policy, budget = live.policy.name, live.policy.budget
        else:
            try:
                meta = self.store.metadata(session_id)
            except SessionFileError as exc:
                raise APIError(500, f"session {session_id!r} cannot be read: {exc}", code="session_unreadable") from None
            messages, tokens, kv = meta["messages"], len(meta["input_ids"]), meta["kv_bytes"]
            policy, budget = meta["policy"]["resolved_name"], meta["policy"]["budget"]
        full = self.full_kv_bytes(tokens)
        return {
            "id": session_id,
            "object": "session",
            "policy": policy,
            "budget": None if budget is None else str(budget),
            "live": live is not None,
            "created": info["created"],
            "updated": info["updated"],
            "turns": sum(m["role"] == "assistant" for m in messages),
            "tokens_seen": tokens,
            "kv_bytes": kv,
            "full_kv_bytes": full,
            "compression": round(full / kv, 3) if kv else None,
            "messages": messages,
        }

    def delete(self, session_id: str) -> dict:
        """Forget a session: memory, file and index row."""
        was_live = self.live.pop(session_id, None) is not None
        self._set_held(session_id, None)
        if not self.store.delete(session_id) and not was_live:
            raise APIError(404, f"unknown session {session_id!r}", code="session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    def chat(self, req: ChatRequest, events: Events | None = None) -> TurnResult:
        """Answer one chat request. With a session id the messages are *new* messages appended
        to that session; without one they are the whole conversation (a temporary session)."""
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"model {req.model!r} is not served here (this server runs {self.config.model_name!r})",
                           code="model_not_found", param="model")
        policy = self._policy(req.policy)
        sid = req.session_id
        if sid is not None:
            session = self._session(sid)
            if req.policy is not None and policy.name != session.policy.name:
                raise APIError(400, f"session {sid!r} runs policy {session.policy.name!r}, not {policy.name!r}",
                               code="policy_mismatch", param="policy")
        else:
            session = Session(self.model, self.tok, policy, block_size=self.config.block_size)
        try:
            new_tokens = session.new_tokens(req.messages)
        except KVBudgetError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if self.max_positions and session.tokens_seen + new_tokens + req.max_tokens > self.max_positions:
            raise APIError(
                400,
                f"{new_tokens} prompt tokens + max_tokens {req.max_tokens} after the {session.tokens_seen} tokens "
                f"this conversation already used exceed the model's {self.max_positions} positions",
                code="context_length_exceeded", param="messages",
            )
        self._make_room(self._need(session, new_tokens, req.max_tokens), keep=sid)
        if events is not None:
            events("ready", None)
        on_token = (lambda token: events("token", token)) if events is not None else None
        lifetime = {id(c): c.peak_bytes for c in _caches(session)}
        for c in _caches(session):
            c.peak_bytes = c.nbytes()  # measure this turn's own peak ...
        others = self._held_total - self._held.get(sid, 0)
        try:
            if req.context:
                session.add_context(req.context)
            turn = session.ask_detailed(req.question, req.max_tokens, on_token=on_token)
            if sid is not None:
                self._save(sid, session)
                self._set_held(sid, session.stored_bytes)
        except BaseException:
            if sid is not None:
                self._drop(sid)  # the file still holds the session as it was before this turn
            raise
        finally:
            caches = _caches(session)  # (EpiCache builds its episode caches in the first turn)
            self.metrics.peak(others + sum(c.peak_bytes for c in caches))
            for c in caches:
                c.peak_bytes = max(lifetime.get(id(c), 0), c.peak_bytes)  # ... then keep the lifetime peak
        self.metrics.generation(new_tokens, len(turn.token_ids), turn.decode_s)
        return TurnResult(
            text=turn.text,
            finish_reason="length" if len(turn.token_ids) >= req.max_tokens else "stop",
            prompt_tokens=new_tokens,
            completion_tokens=len(turn.token_ids),
            session_id=sid,
            policy=session.policy.name,
            budget=None if session.policy.budget is None else str(session.policy.budget),
            tokens_seen=session.tokens_seen,
            kv_bytes=session.stored_bytes,
            full_kv_bytes=self.full_kv_bytes(session.tokens_seen),
            prefill_s=turn.prefill_s,
            decode_s=turn.decode_s,
        )

