"""The session manager: persistent sessions over one model, under one memory bound.

* **One model step at a time.** Every call that touches the model or a session runs on a single
  worker thread (`call`), so requests queue in arrival order; correctness first. Requests reach
  it only after the checks of `auth` and `limits`.
* **Owners.** A session is known by (owner, id): the owner is the hash of the API key that
  created it. Another key asking for it gets the same 404 as for a session that does not exist.
* **Memory bound.** The KV bytes of the sessions held in memory add up to at most ``memory``.
  Before a turn runs, the manager estimates the most its session can hold during the turn
  (`_need`: today's bytes + every new token at full precision, doubled if decode-time
  compression may snapshot the cache) and moves least-recently-used sessions out of memory
  until that fits. The peak actually reached (other sessions + this one's own peak during the
  turn, from the cache's exact accounting) is recorded in the metrics.
* **Write-through store.** A session's file is rewritten (atomically) after each of its turns,
  so moving a session out of memory costs nothing, a crash loses no answered turn, and a turn
  that fails (a timeout, a client gone mid-stream, a full or read-only disk: 503) leaves the
  session as it was saved. A file that cannot be read back makes that session broken (409);
  the others go on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..compress import Policy
from ..errors import KVBudgetError
from ..kv.cache import BudgetedCache
from ..methods import make_policy
from ..runtime.session import Session
from .config import ServeConfig
from .limits import Deadline, limit_error
from .metrics import Metrics
from .schema import APIError, ChatRequest
from .sessionstore import SessionStore

log = logging.getLogger("kvbudget.serve")

# Called on the model thread: ("ready", None) once a request passed every check, then
# ("token", id) for each generated token.
Events = Callable[[str, object], None]
Key = tuple[str, str]  # (owner, session id)


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
    positions_left: int | None  # model positions the conversation may still use (None: no limit known)

    def stats(self) -> dict:
        """The ``kvbudget`` block of a response: KV bytes held, the compression, positions left."""
        return {
            "session_id": self.session_id,
            "policy": self.policy,
            "budget": self.budget,
            "tokens_seen": self.tokens_seen,
            "positions_left": self.positions_left,
            "kv_bytes": self.kv_bytes,
            "full_kv_bytes": self.full_kv_bytes,
            "compression": round(self.full_kv_bytes / self.kv_bytes, 3) if self.kv_bytes else None,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
        }


def _caches(session: Session) -> list:
    episodes = getattr(session, "episodes", None)
    return [ep.cache for ep in episodes] if episodes else [session.cache]


def _not_found(session_id: str, param: str = "session_id") -> APIError:
    return APIError(404, f"unknown session {session_id!r}", code="session_not_found", param=param)


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
        self.live: OrderedDict[Key, Session] = OrderedDict()  # least recently used first
        self.metrics = Metrics(self._gauges)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbudget-model")
        self._held: dict[Key, int] = {}
        self._held_total = 0  # kept as a plain int so that the metrics page reads it without a lock
        text = model.config.get_text_config(decoder=True)
        self.max_positions = getattr(text, "max_position_embeddings", None)
        probe = BudgetedCache(model.config, dtype=model.dtype)
        self._entry_bytes = Policy.entry_bytes(probe)  # one token, one layer, all KV heads
        self._windows = [layer.window for layer in probe.layers]  # sliding layers hold window - 1
        self._token_bytes = self._entry_bytes * len(probe.layers)  # one token in every layer
        # Tokens the chat template closes an answer with (fed again with the answer).
        asked = Session(model, tok, make_policy("full"))
        question = [{"role": "user", "content": "?"}]
        self._end_tokens = max(0, asked.new_tokens(question + [{"role": "assistant", "content": ""}], False)
                               - asked.new_tokens(question))

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
        stored, stored_bytes = self.store.usage()
        return {
            "sessions_live": ("sessions held in memory", len(self.live)),
            "sessions_stored": ("sessions in the session directory", stored),
            "stored_bytes": ("bytes of session files in the session directory", stored_bytes),
            "kv_bytes_held": ("KV bytes held by live sessions", self._held_total),
            "kv_bytes_limit": ("the memory bound (--memory)", self.config.memory),
        }

    def _set_held(self, key: Key, nbytes: int | None) -> None:
        if nbytes is None:
            self._held.pop(key, None)
        else:
            self._held[key] = nbytes
        self._held_total = sum(self._held.values())

    def _make_room(self, need: int, keep: Key | None) -> None:
        """Move least-recently-used sessions (not ``keep``) out of memory until the others and
        ``need`` more bytes fit under the bound."""
        while self._held_total - self._held.get(keep, 0) + need > self.config.memory:
            victim = next((key for key in self.live if key != keep), None)
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
        attend without storing, so they add nothing.

        The answer counts as `answer_tokens`."""
        policy = session.policy
        caches = max(1, len(getattr(session, "episodes", ())))
        tokens = new_tokens + self.answer_tokens(max_tokens)
        need = session.stored_bytes + tokens * self._token_bytes * caches
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
        return 2 * max_tokens + 8 + self._end_tokens

    def full_kv_bytes(self, tokens: int) -> int:
        """Bytes a full cache (no policy) would hold after ``tokens`` tokens."""
        return sum(tokens if w is None else min(tokens, w - 1) for w in self._windows) * self._entry_bytes

    def positions_left(self, tokens_seen: int) -> int | None:
        """Model positions a conversation that has used ``tokens_seen`` may still use."""
        return None if not self.max_positions else max(0, self.max_positions - tokens_seen)

    # --- the session directory ---------------------------------------------------------------
    def _storage_error(self, doing: str, exc: Exception) -> APIError:
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

    def _check_storage(self, owner: str, new_session: bool) -> None:
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

    def _info(self, owner: str, session_id: str, param: str = "session_id") -> dict:
        """The index row of a session of ``owner``; 404 if there is none (another owner's
        included) or if it outlived the idle limit (it is deleted then)."""
        info = self.store.info(owner, session_id)
        if info is None:
            raise _not_found(session_id, param)
        ttl = self.config.limits.session_ttl_s
        if ttl > 0 and info["updated"] < time.time() - ttl:
            self._expire(owner, session_id)
            raise _not_found(session_id, param)
        return info

    def _broken(self, session_id: str, exc: Exception) -> APIError:
        self.metrics.count("broken_sessions")
        log.warning("session %r cannot be read back", session_id, exc_info=exc)
        reason = str(exc).split(": ", 1)[-1] if str(exc) else type(exc).__name__  # without the server's path
        return APIError(409, f"session {session_id!r} is broken: its file cannot be read back ({reason}); "
                        f"delete it (DELETE /v1/sessions/{session_id}) and start a new one",
                        code="session_broken", param="session_id")

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

    def _session(self, owner: str, session_id: str) -> Session:
        """A live session, loaded from the store if it is not in memory."""
        key = (owner, session_id)
        if key in self.live:
            self.live.move_to_end(key)
            return self.live[key]
        info = self._info(owner, session_id)
        self._make_room(info["kv_bytes"], keep=None)
        try:
            session = self.store.load(owner, session_id, self.model, self.tok)
        except OSError as exc:  # the directory cannot be read (a missing file is a SessionFileError)
            raise self._storage_error("read the session", exc) from None
        except Exception as exc:  # a corrupt, truncated, missing or foreign file, however it fails
            raise self._broken(session_id, exc) from None
        self.live[key] = session
        self._set_held(key, session.stored_bytes)
        self.metrics.count("loads")
        return session

    def _save(self, owner: str, session_id: str, session: Session) -> None:
        start = time.perf_counter()
        try:
            self.store.save(owner, session_id, session, session.policy.name)
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error("save the session", exc) from None
        self.metrics.count("saves")
        self.metrics.count("save_seconds", time.perf_counter() - start)

    def _drop(self, key: Key) -> None:
        """Forget the in-memory copy (after a failed turn: the file holds the last good state)."""
        self.live.pop(key, None)
        self._set_held(key, None)

    def _expire(self, owner: str, session_id: str) -> None:
        self._drop((owner, session_id))
        try:
            if self.store.delete(owner, session_id):
                self.metrics.count("expired")
        except (OSError, sqlite3.Error) as exc:  # a read-only directory: the session stays on disk, unserved
            self._storage_error("delete an expired session", exc)

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

    def create(self, owner: str, session_id: str | None = None, policy: str | None = None) -> dict:
        """A new, empty session of ``owner`` (saved at once, so it survives a restart)."""
        if session_id is None:
            session_id = secrets.token_urlsafe(16)  # 128 random bits
        elif (owner, session_id) in self.live or self.store.info(owner, session_id) is not None:
            raise APIError(409, f"session {session_id!r} already exists", code="session_exists", param="id")
        policy_ = self._policy(policy)
        self._check_storage(owner, new_session=True)
        session = Session(self.model, self.tok, policy_, block_size=self.config.block_size)
        self._save(owner, session_id, session)
        self.live[(owner, session_id)] = session
        self._set_held((owner, session_id), session.stored_bytes)
        return self.describe(owner, session_id)

    def describe(self, owner: str, session_id: str) -> dict:
        """What ``GET /v1/sessions/{id}`` shows: the conversation, policy and KV bytes."""
        info = self._info(owner, session_id, "id")
        live = self.live.get((owner, session_id))
        if live is not None:
            messages, tokens, kv = live.messages, live.tokens_seen, live.stored_bytes
            policy, budget = live.policy.name, live.policy.budget
        else:
            try:
                meta = self.store.metadata(owner, session_id)
                messages, tokens, kv = meta["messages"], len(meta["input_ids"]), meta["kv_bytes"]
                policy, budget = meta["policy"]["resolved_name"], meta["policy"]["budget"]
            except OSError as exc:
                raise self._storage_error("read the session", exc) from None
            except Exception as exc:
                raise self._broken(session_id, exc) from None
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
            "positions_left": self.positions_left(tokens),
            "kv_bytes": kv,
            "full_kv_bytes": full,
            "compression": round(full / kv, 3) if kv else None,
            "messages": messages,
        }

    def delete(self, owner: str, session_id: str) -> dict:
        """Forget a session: memory, file and index row."""
        was_live = self.live.pop((owner, session_id), None) is not None
        self._set_held((owner, session_id), None)
        try:
            deleted = self.store.delete(owner, session_id)
        except (OSError, sqlite3.Error) as exc:
            raise self._storage_error("delete the session", exc) from None
        if not deleted and not was_live:
            raise _not_found(session_id, "id")
        return {"id": session_id, "object": "session", "deleted": True}

    def chat(self, owner: str, req: ChatRequest, events: Events | None = None,
             deadline: Deadline | None = None) -> TurnResult:
        """Answer one chat request. With a session id the messages are *new* messages appended
        to that session; without one they are the whole conversation (a temporary session).
        ``deadline`` is checked before the work and at every generated token; the turn is
        committed (saved, then answered) only if it is still in time once generated."""
        if deadline is not None:
            deadline.check()
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"model {req.model!r} is not served here (this server runs {self.config.model_name!r})",
                           code="model_not_found", param="model")
        policy = self._policy(req.policy)
        sid = req.session_id
        key = (owner, sid) if sid is not None else None
        if sid is not None:
            session = self._session(owner, sid)
            if req.policy is not None and policy.name != session.policy.name:
                raise APIError(400, f"session {sid!r} runs policy {session.policy.name!r}, not {policy.name!r}",
                               code="policy_mismatch", param="policy")
            self._check_storage(owner, new_session=False)
        else:
            session = Session(self.model, self.tok, policy, block_size=self.config.block_size)
        try:
            new_tokens = session.new_tokens(req.messages)
        except KVBudgetError as exc:
            raise APIError(400, str(exc), param="messages") from None
        left = self.positions_left(session.tokens_seen)
        answer = self.answer_tokens(req.max_tokens)
        if left is not None and new_tokens + answer > left:
            raise APIError(
                400,
                f"this turn may take {new_tokens + answer} positions ({new_tokens} prompt tokens + {answer} for an "
                f"answer of max_tokens {req.max_tokens}, fed back as text with the end of the turn), but the "
                f"conversation has {left} of the model's {self.max_positions} positions left "
                f"({session.tokens_seen} used); send less, ask for fewer tokens or start a new session",
                code="context_length_exceeded", param="messages",
            )
        self._make_room(self._need(session, new_tokens, req.max_tokens), keep=key)
        if events is not None:
            events("ready", None)

        def on_token(token: int) -> None:
            if deadline is not None:
                deadline.check()  # a timeout or a client gone: the turn stops here, unsaved
            if events is not None:
                events("token", token)

        lifetime = {id(c): c.peak_bytes for c in _caches(session)}
        for c in _caches(session):
            c.peak_bytes = c.nbytes()  # measure this turn's own peak ...
        others = self._held_total - self._held.get(key, 0)
        try:
            if req.context:
                session.add_context(req.context)
            turn = session.ask_detailed(req.question, req.max_tokens, on_token=on_token)
            if deadline is not None:
                deadline.commit()
            if key is not None:
                self._save(owner, sid, session)
                self._set_held(key, session.stored_bytes)
        except BaseException:
            if key is not None:
                self._drop(key)  # the file still holds the session as it was before this turn
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
            positions_left=self.positions_left(session.tokens_seen),
        )
