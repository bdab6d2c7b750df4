"""The session manager: persistent sessions over one model, under one memory bound.

* **One model thread, many turns at once.** Every call that touches the model or a session runs
  on the model thread (`worker.ModelThread`): session operations in arrival order between the
  engine's steps, and chat turns through the batching engine (`runtime.engine.Engine`), which
  decodes every turn in flight in one batched step and feeds new prompts in blocks between the
  steps. Requests reach it only after the checks of `auth` and `limits`. Turns of one session
  run one after the other, in arrival order. ``--max-batch 1`` serves one turn at a time.
* **Owners.** A session is known by (owner, id): the owner is the hash of the API key that
  created it. Another key asking for it gets the same 404 as for a session that does not exist.
* **Memory bound.** The KV bytes of the idle sessions held in memory plus what every turn in
  flight reserved add up to at most ``memory`` (`live.LiveSessions`). Before a turn starts, its
  reserve is estimated (`Footprint.need`: today's bytes + every new token at full precision,
  doubled if decode-time compression may snapshot the cache) and least-recently-used idle
  sessions are moved out of memory until it fits; if the turns in flight leave no room, the turn
  waits for them (its deadline runs). On CUDA the engine decodes in static slots whose buffers
  hold every slot of a batch-size bucket, used or not: what they hold beyond the reservations of
  the turns in them counts under the bound too, and before they grow idle sessions are moved out
  to make room (if the turns in flight leave none, the joining turn decodes eagerly). The peak
  reached is recorded in the metrics.
* **Write-through store.** A session's file is rewritten (atomically) after each of its turns
  and the turn answered once it is written (`saved.SavedSessions`), so moving a session out of
  memory costs nothing, a crash loses no answered turn, and a turn that fails (a timeout, a
  client gone mid-stream, a full or read-only disk: 503) leaves the session as it was saved. A
  file that cannot be read back makes that session broken (409); the others go on.
* **Files off the model thread.** A turn's session file is read, and after the turn written, on
  I/O threads (the copies between the device and the CPU included): the model thread goes on
  decoding the other sessions; a turn whose file is being read waits without holding up the
  turns after it. Until its file is written a session takes no next turn (the write reads its
  cache).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..compress import Policy
from ..errors import KVBudgetError
from ..methods import make_policy
from ..runtime.answer import Turn
from ..runtime.engine import DECODE_PARTS, Engine
from ..runtime.session import Session
from ..runtime.turnsteps import TurnCancelled, TurnSteps
from .config import ServeConfig
from .footprint import Footprint
from .limits import Deadline
from .live import LiveSessions
from .metrics import Metrics
from .saved import SavedSessions, Saving, not_found
from .schema import APIError, ChatRequest
from .worker import ModelThread

log = logging.getLogger("kvbudget.serve")

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
    def answered(cls, session: Session, turn: Turn, finish_reason: str, req: ChatRequest, prompt_tokens: int,
                 footprint: Footprint) -> "TurnResult":
        """The result of ``req``, answered by ``turn`` of ``session`` (``prompt_tokens`` fed)."""
        return cls(
            text=turn.text,
            finish_reason=finish_reason,
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
            positions_left=footprint.positions_left(session.next_position, session.policy.rerotate),
        )


@dataclass(eq=False)
class ChatJob:
    """A chat request from its arrival to its answer: waiting, then a turn in the engine."""

    owner: str
    req: ChatRequest
    events: Events | None
    deadline: Deadline | None
    future: Future = field(default_factory=Future)
    key: tuple[str, str] | None = None  # (owner, session id); None: a temporary session
    session: Session | None = None
    turn: TurnSteps | None = None
    prompt_tokens: int = 0
    deleted: bool = False  # its session was deleted while the turn ran
    reading: Future | None = None  # its session's file, being read before the turn starts
    saving: Saving | None = None  # its session's file, being written after the turn
    answer: TurnResult | None = None  # what it answers once saved


class SessionManager:
    """Sessions in memory (LRU order) and on disk; their turns served together on the model thread."""

    def __init__(self, model, tok, config: ServeConfig) -> None:
        self.model, self.tok, self.config = model, tok, config
        self.policies: dict[str, Policy] = {}
        for name in config.policies:
            policy = make_policy(name, budget=config.budget)
            self.policies.setdefault(policy.name, policy)
            self.policies.setdefault(name.strip().lower(), policy)
        self.default_policy = make_policy(config.policies[0], budget=config.budget)
        self.metrics = Metrics(self._gauges)
        self.live = LiveSessions(config, self.metrics, extra=self._slot_excess, shed=lambda: self.engine.release_slots())
        self.saved = SavedSessions(config, self.metrics, self.live)
        self.store = self.saved.store
        self.footprint = Footprint(model, tok)
        self.weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        self.engine = Engine(model, tok, prefill_tokens=config.prefill_tokens, max_batch=config.max_batch,
                             decode=config.decode, make_room=self._make_room)
        self.waiting: list[ChatJob] = []  # chat requests not started yet, in arrival order
        # By session key: the job whose file is read, whose turn runs or whose file is written.
        self.in_flight: dict[tuple[str, str], ChatJob] = {}
        self.saving: list[ChatJob] = []  # turns done, their files being written
        self.executor = ModelThread(self.engine, self._admit, self.live.track_peak)

    # --- the model thread --------------------------------------------------------------------
    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread (after the calls queued before it)."""
        return await asyncio.wrap_future(self.executor.submit(fn, *args))

    def close(self) -> None:
        """Finish the queued calls and turns and write their files, then close the index."""
        self.executor.shutdown(wait=True)
        self.saved.close()

    def _gauges(self) -> dict[str, tuple[str, float]]:
        stored, stored_bytes = self.store.usage()
        slots = self.engine.slot_counters()
        return {
            "sessions_live": ("sessions held in memory", len(self.live)),
            "sessions_stored": ("sessions in the session directory", stored),
            "stored_bytes": ("bytes of session files in the session directory", stored_bytes),
            "kv_bytes_held": ("KV bytes held by live sessions", self.live.held_total),
            "kv_bytes_limit": ("the memory bound (--memory)", self.config.memory),
            "kv_bytes_reserved": ("KV bytes reserved by the turns in flight (within the bound)",
                                  sum(n for _, _, n, _ in list(self.live.reserved.values()))),
            "model_weight_bytes": ("bytes of the model's weights and buffers (beside the bound)", self.weight_bytes),
            "device_bytes_peak": ("the most GPU memory the server has allocated (weights, KV, decode slots, "
                                  "activations; 0 on the CPU): what the bound and the weights leave room for",
                                  torch.cuda.max_memory_allocated(self.model.device) if self.model.device.type == "cuda" else 0),
            "queue_length": ("chat turns waiting to start (for memory, their session or a batch place)",
                             len(self.waiting) + len(self.engine.waiting)),
            "turns_in_flight": ("chat turns started and not finished", len(self.engine.running)),
            "batch_size": ("sessions decoded together in the latest decode step", self.engine.last_batch),
            "decode_steps": ("batched decode steps run so far", self.engine.decode_steps),
            "decode_batch_tokens": ("tokens those steps decoded (their mean batch: this / decode_steps)",
                                    self.engine.decoded_tokens),
            "decode_step_seconds": ("wall time of those steps (the decode rate: decode_batch_tokens / this)",
                                    self.engine.decode_seconds),
            "decode_eager_tokens": ("of decode_batch_tokens, those decoded eagerly beside the decode slots "
                                    "(a session the slots cannot take)", self.engine.eager_tokens),
            "decode_slot_waits": ("steps a turn waited for a decode slot, summed over turns (every slot taken and "
                                  "the memory bound refusing more)", self.engine.slot_waits),
            "feed_seconds": ("wall time the engine spent feeding prompt and answer blocks", self.engine.feed_seconds),
            "graph_captures": ("CUDA graphs captured for decode slots (one per batch-size bucket while the slots stand)",
                               slots["captures"]),
            "graph_capture_seconds": ("wall time of those captures (part of decode_step_seconds)", slots["capture_seconds"]),
            "slot_regrow_seconds": ("wall time of the decode slots' growths, re-allocating and re-filling every slot "
                                    "(part of decode_step_seconds)", slots["regrow_seconds"]),
            "slot_bytes": ("bytes of the decode slots' buffers (on CUDA; under the bound beyond the entries their sessions hold there)",
                           self.engine.slot_bytes),
            "saves_in_flight": ("session files being written (their turns are answered once written)",
                                len(self.saving)),
            **{f"decode_{part}_seconds": (f"part of decode_step_seconds: {DECODE_PARTS[part]}", seconds)
               for part, seconds in list(self.engine.decode_parts.items())},
        }

    # --- the decode slots under the memory bound (model thread) -------------------------------
    def _slot_excess(self, slot_bytes: int | None = None) -> int:
        """Bytes of the engine's decode slots (``slot_bytes``: what they would hold) beyond the
        entries the sessions decoding in them hold there (their layers' keys and values are views
        of the slots, counted by those turns' reservations). The rest of a slotted turn's
        reservation is its own (the snapshot its answer's compression takes, its growth), and
        every slot not in use counts whole."""
        held = self.engine.slot_bytes if slot_bytes is None else slot_bytes
        return max(0, held - self.engine.lent_bytes)

    def _make_room(self, slot_bytes: int) -> bool:
        """Before the slots grow to ``slot_bytes``: move idle sessions out until the growth fits."""
        return self.live.fit(self._slot_excess(slot_bytes) - self._slot_excess())

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
            left = self.footprint.positions_left(live.next_position, live.policy.rerotate)
        else:
            meta = self.saved.metadata(owner, session_id)
            try:
                messages, tokens, kv = meta["messages"], len(meta["input_ids"]), meta["kv_bytes"]
                policy, budget = meta["policy"]["resolved_name"], meta["policy"]["budget"]
                # A file without these keys: one position per token fed, no re-rotation.
                left = self.footprint.positions_left(meta.get("next_position", tokens), meta["policy"].get("rerotate", False))
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
            "positions_left": left,
            "kv_bytes": kv,
            "full_kv_bytes": full,
            "compression": round(full / kv, 3) if kv else None,
            "messages": messages,
        }

    def delete(self, owner: str, session_id: str) -> dict:
        """Forget a session: memory, file and index row (a turn in flight stops: 404)."""
        job = self.in_flight.get((owner, session_id))
        if job is not None:
            job.deleted = True
            if job.turn is not None:
                job.turn.cancel()
            if job.saving is not None:
                job.saving.future.exception()  # its file lands first, then goes with the session
        was_live = self.live.drop((owner, session_id))
        if not self.saved.delete(owner, session_id) and not was_live:
            raise not_found(session_id, "id")
        return {"id": session_id, "object": "session", "deleted": True}

    def chat(self, owner: str, req: ChatRequest, events: Events | None = None,
             deadline: Deadline | None = None) -> TurnResult:
        """`submit_chat`, waited for (from any thread but the model thread)."""
        return self.submit_chat(owner, req, events, deadline).result()

    def submit_chat(self, owner: str, req: ChatRequest, events: Events | None = None,
                    deadline: Deadline | None = None) -> Future:
        """Queue one chat request; its future gives the `TurnResult` or raises its `APIError`.
        With a session id the messages are *new* messages appended to that session; without one
        they are the whole conversation (a temporary session). ``deadline`` is checked while the
        request waits and before every prompt block and generated token; the turn is committed
        (saved, then answered) only if it is still in time once generated."""
        job = ChatJob(owner, req, events, deadline)
        self.executor.submit(self.waiting.append, job)
        return job.future

    # --- chat turns (model thread) ---------------------------------------------------------------
    def _admit(self) -> bool:
        """Answer the turns whose files are written, then start the waiting requests that can
        start, in arrival order (a request whose session has a turn in flight waits for it; one
        that does not fit the memory bound waits for the turns in flight, and so do those after
        it; one whose file is being read waits for it alone). True while some still wait or
        their files are being written."""
        for job in [job for job in self.saving if job.saving.done()]:
            self._saved(job)
        blocked = False
        for job in list(self.waiting):
            key = (job.owner, job.req.session_id) if job.req.session_id is not None else None
            try:
                if job.deadline is not None:
                    job.deadline.check()
                if job.deleted:
                    raise not_found(key[1])
                if key is not None and self.in_flight.get(key, job) is not job:
                    continue
                if blocked and job.reading is None:  # one reading its file holds its memory: it goes on
                    continue
                started = self._start(job, key)
                if started is None:
                    continue
                if not started:
                    blocked = True
                    continue
            except BaseException as exc:
                self.live.release(job)
                if key is not None and self.in_flight.get(key) is job:
                    del self.in_flight[key]
                job.future.set_exception(exc)
            self.waiting.remove(job)
        return bool(self.waiting or self.saving)

    def _start(self, job: ChatJob, key: tuple[str, str] | None) -> bool | None:
        """Check ``job``'s request, reserve its memory and start its turn; False: it waits for
        memory; None: its session's file is being read."""
        req = job.req
        if req.model is not None and req.model != self.config.model_name:
            raise APIError(404, f"model {req.model!r} is not served here (this server runs {self.config.model_name!r})",
                           code="model_not_found", param="model")
        policy = self._policy(req.policy)
        if key is not None:
            session = self.live.use(key)
            if session is None:  # from the store, once its bytes fit, read on an I/O thread
                if job.reading is None:
                    info = self.saved.info(*key)
                    if not self.live.reserve(job, key, info["kv_bytes"]):
                        return False
                    job.reading = self.saved.read_later(*key, self.model.device)
                    job.reading.add_done_callback(lambda _: self.executor.wake())
                    self.in_flight[key] = job
                if not job.reading.done():
                    return None
                session = self.saved.restore(*key, job.reading, self.model, self.tok)
                job.reading = None
                self.live.add(key, session)
                self.metrics.count("loads")
            if req.policy is not None and policy.name != session.policy.name:
                raise APIError(400, f"session {key[1]!r} runs policy {session.policy.name!r}, not {policy.name!r}",
                               code="policy_mismatch", param="policy")
            self.saved.check_limits(job.owner, new_session=False)
        else:
            session = Session(self.model, self.tok, policy, block_size=self.config.block_size)
        # The turn's reservation (`Footprint.need`) holds the snapshot a decode-time compression
        # takes on the device: it stays there (a copy on the device, not a transfer each way
        # through pinned host memory).
        session.cache.host_snapshots = False
        try:
            new_tokens = session.new_tokens(req.messages)
        except KVBudgetError as exc:
            raise APIError(400, str(exc), param="messages") from None
        self.footprint.check_positions(session, new_tokens, req.max_tokens)
        if not self.live.reserve(job, key, self.footprint.need(session, new_tokens, req.max_tokens)):
            self.live.release(job)
            if key is not None and self.in_flight.get(key) is job:
                del self.in_flight[key]
            return False
        job.key, job.session, job.prompt_tokens = key, session, new_tokens
        if job.events is not None:
            job.events("ready", None)

        def on_token(token: int) -> None:
            if job.events is not None:
                job.events("token", token)

        # A timeout or a client gone stops the turn before its next block or token, unsaved.
        job.turn = self.engine.submit(session, req.question, req.max_tokens, temperature=req.temperature or 0.0,
                                      top_p=req.top_p, seed=req.seed, stop=req.stop, on_token=on_token,
                                      context=req.context,
                                      check=job.deadline.check if job.deadline is not None else None)
        job.turn.done_callbacks.append(lambda _: self._finished(job))
        self.live.start(job, session)
        if key is not None:
            self.in_flight[key] = job
        return True

    def _finished(self, job: ChatJob) -> None:
        """A turn ended (model thread, inside an engine step): start writing its session's file
        (answered once written, `_saved`), or fail it (the session is dropped from memory: its
        file holds it as it was before this turn)."""
        self.live.track_peak()
        self.live.release(job)
        turn = job.turn
        try:
            if job.deleted:
                raise not_found(job.key[1])
            if turn.error is not None:
                if isinstance(turn.error, TurnCancelled) and job.deadline is not None:
                    job.deadline.check()  # the request's own reason (a client gone, the clock)
                if isinstance(turn.error, torch.OutOfMemoryError):
                    raise APIError(503, "the device ran out of memory during this turn; the session is kept as it "
                                   "was after its last saved turn (retry later, or run the server with a lower "
                                   "--memory)", code="device_memory_exhausted",
                                   headers={"Retry-After": "30"}) from None
                if not isinstance(turn.error, (APIError, KVBudgetError, TurnCancelled)):
                    log.error("a turn failed", exc_info=turn.error)
                    self.metrics.count("internal_errors")
                    raise APIError(500, f"internal error ({type(turn.error).__name__}); the server logged it; the "
                                   "session is kept as it was after its last saved turn", "internal_error") from None
                raise turn.error
            if job.deadline is not None:
                job.deadline.commit()
            answered = turn.result()
            self.metrics.generation(job.prompt_tokens, len(answered.token_ids), answered.decode_s)
            job.answer = TurnResult.answered(job.session, answered, turn.finish_reason, job.req, job.prompt_tokens,
                                             self.footprint)
            if job.key is None:
                job.future.set_result(job.answer)
                return
            self.live.update(job.key)
            # Its file is written from its cache: the bytes stay reserved (not moved out) until then.
            self.live.reserve(job, job.key, self.live.held[job.key])
            job.saving = self.saved.save_later(*job.key, job.session)
        except BaseException as exc:
            self._failed(job, exc)
            return
        self.saving.append(job)
        self.executor.wake()  # the loop looks at the saves before it waits or stops
        job.saving.future.add_done_callback(lambda _: self.executor.wake())

    def _saved(self, job: ChatJob) -> None:
        """``job``'s session file is written: record it and answer the turn (or fail it: 503, or
        404 if the session was deleted meanwhile)."""
        self.saving.remove(job)
        self.live.release(job)
        try:
            if job.deleted:
                raise not_found(job.key[1])
            self.saved.commit(job.saving)
        except BaseException as exc:
            self._failed(job, exc)
            return
        self.in_flight.pop(job.key, None)
        job.future.set_result(job.answer)

    def _failed(self, job: ChatJob, exc: BaseException) -> None:
        self.live.release(job)
        if job.key is not None:
            if self.in_flight.get(job.key) is job:
                del self.in_flight[job.key]
            if not job.deleted:
                self.live.drop(job.key)  # the file still holds the session as it was before this turn
        job.future.set_exception(exc)
