"""`Engine`: many sessions' turns served together, with iteration-level scheduling.

Each `step` is one iteration over the turns in flight (`runtime.turnsteps`):

1. turns waiting join, up to ``max_batch`` in flight;
2. *chunked prefill*: turns that are feeding (a question, or an answer fed back) feed blocks of
   their session's ``block_size``, oldest turn first, until ``prefill_tokens`` tokens were fed
   this iteration (at least one block), so a long prompt holds the others' decoding up for at
   most that many tokens; the blocks of several turns go through one forward together
   (`batch_forward`: right-padded to the longest, the padding counted in ``prefill_tokens``),
   each compressed into its own session's cache after it;
3. *one batched decode step*: every turn that is decoding chooses its next token, and all those
   tokens go through the model together, then each session compresses at its own interval. With
   static decoding (``decode``: "auto" on CUDA, or "static" / "graph"), sessions decode in slots
   of static buffers shared by every session of the same cache layout (`runtime.slots`): one
   forward per layout, on CUDA one replay of the graph captured for the batch-size bucket; before
   the slots grow, ``make_room`` (if given: a server's memory bound) may refuse: a turn then
   waits, its token not chosen, for a slot that an answer in the batch frees (`SlotsFull`). The
   slots and their graphs outlast an idle moment, until `release_slots` (`run` calls it at its
   end). Eager (the default on the CPU, for a session a slot cannot take:
   `runtime.decoder.supports`, and where ``make_room`` refused while no session was in a slot to
   free one), they go through one forward of the model (`batch_forward`) in which each session's
   attention runs over its own budgeted cache (`kv.batch`).

A turn joins the decode batch at the first step after its question is fed and leaves it when its
answer ends. Sessions in one batch may differ in policy, budget, store, length and per-head
lengths: nothing of one session's cache is copied to another's. Under batching every session's
greedy answer is the one it gives alone, up to the float rounding of the shared matrix products
(the same tokens wherever no two candidates are within that rounding; tests/test_engine.py).

A session kind that answers its own way (EpiCache's episodes) runs its whole turn in one step,
alone.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import KVBudgetError
from ..kv.batch import BatchCache
from ..kv.cache import BudgetedCache
from .answer import DECODE_MODES, greedy, query_slots
from .clock import synced
from .decoder import supports
from .modelcall import run
from .prefill import Block
from .sampling import Sampler
from .session import Session
from .slots import SlotBatch, SlotsFull, layout
from .static import UnsupportedStatic
from .turnsteps import TurnSteps

# Prompt tokens fed per iteration, at most (at least one block): what one iteration may hold the
# decoding sessions up for.
PREFILL_TOKENS = 256
# Turns in flight at once (decoding together).
MAX_BATCH = 64
# The parts of a decode step timed in `Engine.decode_parts`. On CUDA a part that queued heavy work
# (an answer leaving its slot, a turn joining one, a compression) waits for it, so that the next
# part is not charged for it; a step without such work waits only in the forward's host read.
DECODE_PARTS = {
    "choose": "choosing each turn's token (answers that end leave their slots here)",
    "join": "turns taking decode slots (growths included)",
    "forward": "the batched forwards and the host read of their most likely tokens (graph captures included)",
    "compress": "decode-time compressions (a session in a slot: written back, compressed, reloaded)",
}


def batch_forward(model, caches: list[BudgetedCache], tokens: "list[int] | list[Tensor]") -> Tensor:
    """Feed ``tokens[i]`` (one token, or a block [1, q_i] of them) to the session of
    ``caches[i]``, all in one forward; returns the logits [B, vocab] of each row's last token.
    Each row's tokens go at its own cache's next positions; blocks of different lengths are
    right-padded to the longest (`kv.batch`)."""
    device = model.device
    rows = [t.reshape(-1) if isinstance(t, Tensor) else torch.tensor([t]) for t in tokens]
    lengths = [len(r) for r in rows]
    q = max(lengths)
    ids = torch.zeros(len(rows), q, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r.to(device)
    start = torch.tensor([c.get_seq_length() for c in caches], dtype=torch.long, device=device)
    positions = start[:, None] + torch.arange(q, device=device)
    # A prepared 4-D mask makes transformers skip building one: the hook masks each row by its plan.
    mask = torch.ones(len(caches), 1, 1, 1, dtype=torch.bool, device=device)
    last = sorted(set(n - 1 for n in lengths))  # the logits kept: each row's last token's position
    out = run(model, BatchCache(caches, lengths), ids, position_ids=positions, attention_mask=mask,
              logits_to_keep=q if q == 1 else torch.tensor(last, device=device))
    picks = torch.tensor([last.index(n - 1) for n in lengths], device=device)
    return out.logits[torch.arange(len(rows), device=device), picks]


class Engine:
    """Serves turns of many sessions over one model, decoding them together (module docstring).

    Typical use::

        engine = kb.Engine(model, tok)
        a = engine.submit(session_a, "What did Alice say?")
        b = engine.submit(session_b, "And Bob?", max_new_tokens=32)
        engine.run()                     # or engine.step() from a serving loop
        print(a.result().text, b.result().text)
    """

    def __init__(self, model, tok, prefill_tokens: int = PREFILL_TOKENS, max_batch: int = MAX_BATCH,
                 decode: str = "auto", make_room: Callable[[int], bool] | None = None) -> None:
        if decode not in DECODE_MODES:
            raise KVBudgetError(f"unknown decode mode '{decode}' (choose from {', '.join(DECODE_MODES)})")
        cuda = torch.device(model.device).type == "cuda"
        if decode == "graph" and not cuda:
            raise KVBudgetError("decode='graph' needs a CUDA device (use 'static' or 'eager' on CPU)")
        if prefill_tokens <= 0:
            raise KVBudgetError(f"prefill_tokens must be positive, got {prefill_tokens}")
        if max_batch <= 0:
            raise KVBudgetError(f"max_batch must be positive, got {max_batch}")
        self.model, self.tok = model, tok
        self.prefill_tokens = prefill_tokens
        self.max_batch = max_batch
        # Decoding: "auto" is slots of static buffers with a CUDA graph per bucket on CUDA, eager
        # on the CPU; "static" is the slots without graphs (any device); "eager" the model's forward.
        self.decode = decode
        self.static = decode in ("static", "graph") or (decode == "auto" and cuda)
        self.slots: dict[tuple, SlotBatch] = {}  # by cache layout; kept while idle (`release_slots`)
        # Asked before the slots grow, with the bytes every slot batch would then hold: True to go
        # ahead; False and the joining session decodes eagerly (a server's memory bound).
        self.make_room = make_room
        self._dropped = {"captures": 0, "capture_seconds": 0.0, "regrow_seconds": 0.0}  # of slot batches gone
        self.waiting: deque[TurnSteps] = deque()
        self.running: list[TurnSteps] = []
        self.last_batch = 0  # sessions in the latest decode step
        self.decode_steps = 0  # decode steps so far
        self.decoded_tokens = 0  # tokens fed by them (their mean batch: decoded_tokens / decode_steps)
        self.decode_seconds = 0.0  # wall time of those steps (the decode rate: decoded_tokens / this)
        self.eager_tokens = 0  # of decoded_tokens, those fed eagerly beside static slots (none took their turn)
        self.slot_waits = 0  # steps a turn waited for a slot, summed over turns (the slots full, not to grow)
        self.decode_parts = dict.fromkeys(DECODE_PARTS, 0.0)  # where that time goes (`DECODE_PARTS`)
        self.feed_seconds = 0.0  # wall time spent feeding prompt and answer blocks
        self._stepping = False  # inside `step` (`release_slots` waits for its end)

    # --- turns ----------------------------------------------------------------------------------
    def submit(self, session: Session, question: str, max_new_tokens: int = 64, *, temperature: float = 0.0,
               top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
               on_token: Callable[[int], None] | None = None, context: list[dict] | None = None,
               check: Callable[[], None] | None = None) -> TurnSteps:
        """Queue a turn of ``session`` answering ``question``; it runs in the next `step` that
        has room. Greedy unless ``temperature`` > 0 (then sampled with ``top_p`` and ``seed``);
        the answer ends early at the first of ``stop`` (cut before it). ``on_token`` is called
        with each token as it is chosen; ``context``: messages fed before the question (as
        `Session.add_context`); ``check`` is called before each block fed and each token decoded:
        what it raises ends the turn there (`TurnSteps.check`). A session takes one turn at a
        time."""
        if session.model is not self.model:
            raise KVBudgetError("the session runs another model than this engine's")
        if any(t.session is session for t in (*self.waiting, *self.running)):
            raise KVBudgetError("this session has a turn in flight: submit its next turn once it is done")
        if max_new_tokens <= 0:
            raise KVBudgetError(f"max_new_tokens must be positive, got {max_new_tokens}")
        choose = greedy if temperature == 0 else Sampler(temperature, top_p, seed)
        turn = TurnSteps(session, question, max_new_tokens, choose, stop, on_token, context, check)
        self.waiting.append(turn)
        return turn

    @property
    def busy(self) -> bool:
        """Whether turns wait or run."""
        return bool(self.waiting or self.running)

    def run(self) -> None:
        """Step until every turn submitted is done, then release the decode slots."""
        while self.busy:
            self.step()
        self.release_slots()

    def release_slots(self) -> int:
        """Drop the decode slots that no session decodes in (their static buffers and CUDA
        graphs); returns the bytes freed. The slots stay while the engine is idle, so that turns
        coming after a pause reuse their buffers and graphs rather than growing and capturing them
        again: `run` releases them at its end, a serving loop after an idle while or when the
        memory bound needs their bytes. Nothing is released in the middle of a step."""
        if self._stepping:
            return 0
        freed = 0
        for key, batch in list(self.slots.items()):
            if not batch.live:
                freed += batch.nbytes
                self._drop_slots(key)
        return freed

    # --- one iteration ----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: turns join, prompts are fed in blocks, every decoding turn advances by
        one token in one batched forward (the module docstring)."""
        self._stepping = True
        try:
            self._iterate()
        finally:
            self._stepping = False

    def _iterate(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        for turn in self.running:
            if not turn.done:
                self._guarded(turn, turn.check)  # a turn told to stop ends even where it waits for a block
        start = time.perf_counter()
        self._feed()
        fed = time.perf_counter()
        self.feed_seconds += fed - start
        if self._decode():
            self.decode_seconds += time.perf_counter() - fed
        self.running = [t for t in self.running if not t.done]

    def abort(self, error: BaseException) -> None:
        """End every turn waiting or in flight with ``error`` and drop the decode slots: for a
        serving loop whose `step` raised outside any one turn (the state it left is not trusted)."""
        turns, self.running = [*self.waiting, *self.running], []
        self.waiting.clear()
        for turn in turns:
            if not turn.done:
                self._guarded(turn, turn.fail, error)
        for key in list(self.slots):
            self._drop_slots(key)

    @property
    def slot_bytes(self) -> int:
        """Bytes of the static decode slots' buffers (0 once released, and when decoding eagerly)."""
        return sum(batch.nbytes for batch in list(self.slots.values()))  # (read by the metrics page too)

    @property
    def lent_bytes(self) -> int:
        """Bytes of the slots' buffers that the sessions decoding in them hold as their entries
        (their layers' keys and values are views of the slots: those bytes are not held twice)."""
        return sum(batch.lent_bytes for batch in list(self.slots.values()))

    def _room(self, key: tuple) -> Callable[[int], bool] | None:
        """The slot batch ``key``'s growth hook: ``make_room`` asked with every batch's bytes."""
        if self.make_room is None:
            return None
        return lambda grown: self.make_room(self.slot_bytes - self.slots[key].nbytes + grown)

    def _drop_slots(self, key: tuple) -> None:
        """The slot batch ``key`` goes; its counters add up in `slot_counters`."""
        batch = self.slots.pop(key)
        for name in self._dropped:
            self._dropped[name] += getattr(batch, name)

    def slot_counters(self) -> dict[str, float]:
        """Since the engine started, over every slot batch: ``captures`` (CUDA graphs captured:
        one per (bucket, layout) while the engine stays busy), ``capture_seconds`` (their wall
        time) and ``regrow_seconds`` (the wall time of the slots' growths)."""
        batches = list(self.slots.values())  # (read by the metrics page too)
        return {name: total + sum(getattr(b, name) for b in batches) for name, total in self._dropped.items()}

    def _feed(self) -> None:
        """Feed blocks of the turns that are feeding, oldest first, one block per turn per forward,
        the blocks of several turns in one forward (right-padded to the longest), until
        ``prefill_tokens`` tokens (padding counted) went through the model this iteration; at
        least one block."""
        budget = self.prefill_tokens
        while budget > 0:
            group: list[tuple[TurnSteps, Block]] = []
            width = 0
            for turn in self.running:
                if not turn.feeding:
                    continue
                if type(turn.session).ask_detailed is not Session.ask_detailed:
                    if not group:  # a session kind of its own: the whole turn, alone
                        self._whole(turn)
                        return
                    continue
                block = self._guarded(turn, turn.block)
                if block is None:
                    continue
                q = block.ids.shape[1]
                if group and (len(group) + 1) * max(width, q) > budget:
                    break
                group.append((turn, block))
                width = max(width, q)
            if not group:
                return
            budget -= len(group) * width
            if len(group) == 1:
                turn, block = group[0]
                self._forward([(turn, block)], lambda: block.run())
            else:
                self._forward(group, lambda: batch_forward(self.model, [b.cache for _, b in group],
                                                           [b.ids for _, b in group]))

    def _whole(self, turn: TurnSteps) -> None:
        """Run a turn of a session that answers its own way (`Session.ask_detailed`) in one go."""
        def on_token(token: int) -> None:
            turn.check()
            if turn.on_token is not None:
                turn.on_token(token)

        def ask() -> None:
            if turn.context:
                turn.session.add_context(turn.context)
            done = turn.session.ask_detailed(turn.turn.question, turn.max_new_tokens, on_token=on_token)
            turn.turn = done
            turn.finish_reason = "length" if len(done.token_ids) >= turn.max_new_tokens else "stop"
            turn.phase = "done"
            for callback in turn.done_callbacks:
                callback(turn)

        self._guarded(turn, ask)

    def _decode(self) -> bool:
        """One batched decode step of every decoding turn; False if none decoded."""
        parts, device = self.decode_parts, self.model.device
        # The turns in slots (and eager ones) choose first: an answer that ends frees its slot for
        # a turn joining in this step.
        seated, joining = [], []
        for turn in self.running:
            if turn.phase == "decode":
                (joining if self.static and turn.row is None and not turn.eager else seated).append(turn)
        start = time.perf_counter()
        rows, tokens, ended = self._choose(seated)
        choose = synced(start, device, wait=ended)
        join = 0.0
        if joining:
            start = time.perf_counter()
            full = set()  # layouts whose slots are all taken and may not grow: later turns wait too
            for turn in joining:
                if (key := layout(turn.session.cache)) not in full:
                    self._guarded(turn, self._join, turn, key)
                    if not turn.done and turn.row is None and not turn.eager:
                        full.add(key)
            join = synced(start, device)
            # A turn no slot took yet (`SlotsFull`) waits for one, its token not chosen.
            joined = [turn for turn in joining if not turn.done and (turn.row is not None or turn.eager)]
            self.slot_waits += sum(1 for turn in joining if not turn.done) - len(joined)
            start = time.perf_counter()
            more = self._choose(joined)
            choose += synced(start, device, wait=more[2])
            tokens = [token for turn, token in zip(rows, tokens) if not turn.done] + more[1]
            rows = [turn for turn in rows if not turn.done] + more[0]
        if not rows:
            return False  # not a decode step: its time is not counted (`decode_seconds` neither)
        parts["choose"] += choose
        parts["join"] += join
        groups: dict[SlotBatch, list[tuple[TurnSteps, int]]] = {}
        eager = []
        for turn, token in zip(rows, tokens):
            if turn.row is None:
                eager.append((turn, token))
            else:
                groups.setdefault(turn.row.batch, []).append((turn, token))
        for batch, group in groups.items():
            self._step(group, lambda: batch.step([t.row for t, _ in group], [token for _, token in group]))
        if eager:
            self.eager_tokens += len(eager) if self.static else 0
            self._step(eager, lambda: batch_forward(self.model, [t.session.cache for t, _ in eager],
                                                    [token for _, token in eager]))
        self.last_batch = len(rows)
        self.decode_steps += 1
        self.decoded_tokens += len(rows)
        return True

    def _choose(self, turns: list[TurnSteps]) -> tuple[list[TurnSteps], list[int], bool]:
        """Each turn's next token: the turns that feed one, their tokens, and whether an answer
        ended (it left its slot)."""
        rows, tokens, ended = [], [], False
        for turn in turns:
            token = self._guarded(turn, turn.next_token)
            if token is not None and not turn.done:
                rows.append(turn)
                tokens.append(token)
            else:
                ended = True
        return rows, tokens, ended

    def _join(self, turn: TurnSteps, key: tuple) -> None:
        """Give ``turn`` a slot in the static batch of its cache's layout ``key``, if it can take
        one; where every slot is taken and the slots may not grow, it waits for one (row None, not
        eager)."""
        cache, policy = turn.session.cache, turn.session.policy
        turn.eager = True  # unless a slot takes it
        if turn.max_new_tokens < 2 or supports(cache) is not None:
            return
        batch = self.slots.get(key)
        if batch is None:
            batch = self.slots[key] = SlotBatch(self.model, graph=self.decode != "static", make_room=self._room(key))
        def coming() -> int:  # turns of this layout that join next (started, not decoding yet)
            return sum(1 for t in self.running if t is not turn and t.row is None and not t.eager and not t.done
                       and t.max_new_tokens > 1 and layout(t.session.cache) == key)

        try:
            turn.row = batch.join(cache, turn.max_new_tokens, query_slots(policy, turn.max_new_tokens), coming)
            turn.eager = False
        except SlotsFull:
            turn.eager = False  # it waits for a slot that an answer in the batch frees
        except UnsupportedStatic:
            turn.row = None
        except Exception as exc:  # out of memory while the slots grew: they are half re-allocated
            self._drop_slots(key)
            for other in self.running:
                if other is not turn and other.row is not None and other.row.batch is batch:
                    other.fail(exc)  # its session holds what it had fed (a server reloads its file)
            raise

    def _step(self, group: list[tuple[TurnSteps, int]], forward: Callable[[], Tensor]) -> None:
        """One decode forward for ``group``'s tokens: each turn gets its logits and their most
        likely token (one argmax and one host read for the group), then compresses if due."""
        parts, device = self.decode_parts, self.model.device
        start = time.perf_counter()
        try:
            logits = forward()
            tops = logits.argmax(-1).tolist()
        except Exception as exc:  # the forward failed for the whole group
            for turn, _ in group:
                turn.fail(exc)
            return
        parts["forward"] += time.perf_counter() - start  # the host read waited for the forward
        start = time.perf_counter()
        compressed = [self._guarded(turn, turn.fed, logits[i : i + 1], tops[i]) for i, (turn, _) in enumerate(group)]
        parts["compress"] += synced(start, device, wait=any(compressed))

    def _forward(self, group: list[tuple[TurnSteps, Block]], forward: Callable[[], Tensor]) -> None:
        """Run one forward for ``group``'s blocks and hand each turn the logits of its block's
        last token (logits in the group's order)."""
        try:
            logits = forward()
        except Exception as exc:  # the forward failed for the whole group
            for turn, _ in group:
                turn.fail(exc)
            return
        for i, (turn, _) in enumerate(group):
            self._guarded(turn, turn.fed_block, logits[i : i + 1])

    @staticmethod
    def _guarded(turn: TurnSteps, fn: Callable, *args):
        """``fn(*args)`` for one turn; an error ends that turn only."""
        try:
            return fn(*args)
        except Exception as exc:
            turn.fail(exc)
            return None
