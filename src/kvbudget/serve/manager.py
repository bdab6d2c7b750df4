"""The session manager: persistent sessions over one model, under one memory bound.

* **One model step at a time.** Every call that touches the model or a session runs on a single
  worker thread (`call`), so requests queue in arrival order; correctness first. Requests reach
  it only after the checks of `auth` and `limits`.
* **Owners.** A session is known by (owner, id): the owner is the hash of the API key that
  created it. Another key asking for it gets the same 404 as for a session that does not exist.
* **Memory bound.** The KV bytes of the sessions held in memory (`live.LiveSessions`) add up
  to at most ``memory``. Before a turn runs, the manager estimates the most its session can
  hold during the turn (`Footprint.need`: today's bytes + every new token at full precision,
  doubled if decode-time compression may snapshot the cache) and moves least-recently-used
  sessions out of memory until that fits. The peak actually reached (other sessions + this
  one's own peak during the turn, from the cache's exact accounting) is recorded in the metrics.
* **Write-through store.** A session's file is rewritten (atomically) after each of its turns
  (`saved.SavedSessions`), so moving a session out of memory costs nothing, a crash loses no
  answered turn, and a turn that fails (a timeout, a client gone mid-stream, a full or
  read-only disk: 503) leaves the session as it was saved. A file that cannot be read back
  makes that session broken (409); the others go on.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..compress import Policy
from ..errors import KVBudgetError
from ..methods import make_policy
from ..runtime.answer import Turn
from ..runtime.session import Session
from .config import ServeConfig
from .footprint import Footprint
from .limits import Deadline
from .live import LiveSessions
from .metrics import Metrics
from .saved import SavedSessions, not_found
from .schema import APIError, ChatRequest

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

    @classmethod
    def answered(cls, session: Session, turn: Turn, req: ChatRequest, prompt_tokens: int,
                 footprint: Footprint) -> "TurnResult":
        """The result of ``req``, answered by ``turn`` of ``session`` (``prompt_tokens`` fed)."""
        return cls(
            text=turn.text,
            finish_reason="length" if len(turn.token_ids) >= req.max_tokens else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(turn.token_ids),
            session_id=req.session_id,
            policy=session.policy.name,
            budget=None if session.policy.budget is None else str(session.policy.budget),
            tokens_seen=session.tokens_seen,
            kv_bytes=session.stored_bytes,
            full_kv_bytes=footprint.full_kv_bytes(session.tokens_seen),
            prefill_s=turn.prefill_s,
            decode_s=turn.decode_s,
            positions_left=footprint.positions_left(session.tokens_seen),
        )


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
        self.metrics = Metrics(self._gauges)
        self.live = LiveSessions(config, self.metrics)
        self.saved = SavedSessions(config, self.metrics, self.live)
        self.store = self.saved.store
        self.footprint = Footprint(model, tok)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbudget-model")

    # --- the model thread --------------------------------------------------------------------
    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread (after the calls queued before it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        """Finish the queued calls, then close the index (every session file is already current)."""
        self.executor.shutdown(wait=True)
        self.store.close()

    def _gauges(self) -> dict[str, tuple[str, float]]:
        stored, stored_bytes = self.store.usage()
        return {
            "sessions_live": ("sessions held in memory", len(self.live)),
            "sessions_stored": ("sessions in the session directory", stored),
            "stored_bytes": ("bytes of session files in the session directory", stored_bytes),
            "kv_bytes_held": ("KV bytes held by live sessions", self.live.held_total),
            "kv_bytes_limit": ("the memory bound (--memory)", self.config.memory),
        }

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
        session = self.live.use(key)
        if session is not None:
            return session
        info = self.saved.info(owner, session_id)
        self.live.make_room(info["kv_bytes"], keep=None)
        session = self.saved.load(owner, session_id, self.model, self.tok)
        self.live.add(key, session)
        self.metrics.count("loads")
        return session

    def expire(self) -> int:
        """Delete every session idle for longer than ``session_ttl_s`` (with its file); returns
        how many went."""
        return self.saved.expire()

    def create(self, owner: str, session_id: str | None = None, policy: str | None = None) -> dict:
        """A new, empty session of ``owner`` (saved at once, so it survives a restart)."""
        if session_id is None:
            session_id = secrets.token_urlsafe(16)  # 128 random bits
        elif (owner, session_id) in self.live or self.store.info(owner, session_id) is not None:
            raise APIError(409, f"session {session_id!r} already exists", code="session_exists", param="id")
        policy_ = self._policy(policy)
        self.saved.check_limits(owner, new_session=True)
        session = Session(self.model, self.tok, policy_, block_size=self.config.block_size)
        self.saved.save(owner, session_id, session)
        self.live.add((owner, session_id), session)
        return self.describe(owner, session_id)

    def describe(self, owner: str, session_id: str) -> dict:
        """What ``GET /v1/sessions/{id}`` shows: the conversation, policy and KV bytes."""
        info = self.saved.info(owner, session_id, "id")
        live = self.live.get((owner, session_id))
        if live is not None:
            messages, tokens, kv = live.messages, live.tokens_seen, live.stored_bytes
            policy, budget = live.policy.name, live.policy.budget
        else:
            meta = self.saved.metadata(owner, session_id)
            try:
                messages, tokens, kv = meta["messages"], len(meta["input_ids"]), meta["kv_bytes"]
                policy, budget = meta["policy"]["resolved_name"], meta["policy"]["budget"]
            except Exception as exc:
                raise self.saved.broken(session_id, exc) from None
        full = self.footprint.full_kv_bytes(tokens)
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
            "positions_left": self.footprint.positions_left(tokens),
            "kv_bytes": kv,
            "full_kv_bytes": full,
            "compression": round(full / kv, 3) if kv else None,
            "messages": messages,
        }

    def delete(self, owner: str, session_id: str) -> dict:
        """Forget a session: memory, file and index row."""
        was_live = self.live.drop((owner, session_id))
        if not self.saved.delete(owner, session_id) and not was_live:
            raise not_found(session_id, "id")
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
            self.saved.check_limits(owner, new_session=False)
        else:
            session = Session(self.model, self.tok, policy, block_size=self.config.block_size)
        try:
            new_tokens = session.new_tokens(req.messages)
        except KVBudgetError as exc:
            raise APIError(400, str(exc), param="messages") from None
        self.footprint.check_positions(session, new_tokens, req.max_tokens)
        self.live.make_room(self.footprint.need(session, new_tokens, req.max_tokens), keep=key)
        if events is not None:
            events("ready", None)

        def on_token(token: int) -> None:
            if deadline is not None:
                deadline.check()  # a timeout or a client gone: the turn stops here, unsaved
            if events is not None:
                events("token", token)

        with self.live.measure_peak(key, session):
            try:
                if req.context:
                    session.add_context(req.context)
                turn = session.ask_detailed(req.question, req.max_tokens, on_token=on_token)
                if deadline is not None:
                    deadline.commit()
                if key is not None:
                    self.saved.save(owner, sid, session)
                    self.live.update(key)
            except BaseException:
                if key is not None:
                    self.live.drop(key)  # the file still holds the session as it was before this turn
                raise
        self.metrics.generation(new_tokens, len(turn.token_ids), turn.decode_s)
        return TurnResult.answered(session, turn, req, new_tokens, self.footprint)
