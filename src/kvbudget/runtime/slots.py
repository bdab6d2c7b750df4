"""`SlotBatch`: many sessions decoded together over static buffers, one slot per session, one CUDA
graph per batch-size bucket.

The batching engine (`runtime.engine`) decodes one token for every session that is answering.
Sessions whose caches share a layout (`layout`: which layers hold a KIVI store, and its
configuration) share one `SlotBatch`: per layer, buffers of ``C`` slots (`runtime.slot_buffers`),
each slot one session's segments (one per KV head) with room for the tokens it may still decode.
A step feeds one token per slot through the model over those buffers: on CUDA one replay of the
graph captured for the bucket ``C`` (the smallest power of two holding the slots in use); on the
CPU the same forward runs eagerly, so every slot operation is the same on both.

* A session **joins** (`join`) by copying its own cache into a free slot (its dense layers then
  borrow views of the slot, as with `StaticDecoder`: nothing is held twice); the others' slots are
  untouched. The slot's position is its cache's next position.
* It **leaves** (`SlotRow.discard`) when its answer ends: the turn rolls the decoded entries back
  (the answer is fed again as text), so they are only counted in the cache's peaks, not written
  back; its layers get their own copies of what they held at the last (re)load, unless the
  rollback puts back a snapshot taken at a decode-time compression, and the slot is freed
  (masked: length 0, its logits ignored).
* **Decode-time compression** of one session: `SlotRow.write_back`, the policy compresses the
  session's cache as it would alone, `SlotRow.reload` copies what it kept into the same slot.
* **Growth**: more sessions than slots, or a session needing wider segments than the buffers
  have, re-allocates the buffers (the next power of two holding the sessions in slots, the one
  joining and those about to join: the engine's turns started and still feeding; the widest
  segments so far) and re-fills every slot once; the graphs of the old buffers go. It goes
  layer by layer: the sessions take their own copies of one layer, that layer's old buffers go,
  its new ones are filled, so the growth needs one layer's worth of memory beyond the old and
  new buffers' difference. Before it, ``make_room`` (if given) is told the bytes the buffers
  would hold (`bytes_for`) and may refuse, then is asked for half as many slots, down to the
  next bucket of the sessions in slots: refused even that, `SlotsFull` where only the number of
  slots is short and sessions are in slots (the joining session waits for one of theirs to
  end), otherwise `UnsupportedStatic` (it decodes eagerly beside the batch). Buckets shrink
  lazily: the bucket of a step covers the highest slot in use, and sessions move down to free
  lower slots once they fit a bucket of half the size or less.

Rows a slot cannot take (`runtime.decoder.supports` says why) decode eagerly beside the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..kv.cache import BudgetedCache
from . import fusion
from .clock import synced
from .decoder import supports, warmup_stream, write_back_layers
from .modelcall import run
from .slot_buffers import FlatSlots, StoreSlots, buffer_bytes, slots_for
from .static import StaticLayer, UnsupportedStatic


def layout(cache: BudgetedCache) -> tuple:
    """What caches must share to share a `SlotBatch`: per layer, its store's kind and settings."""
    return tuple(None if layer.store is None else (type(layer.store).__name__, tuple(sorted(vars(layer.store).items())))
                 for layer in cache.layers)


def _buffers(sample, slots: int, dims: tuple, device: torch.device) -> "FlatSlots | StoreSlots":
    """One layer's buffers for ``slots`` slots of sizes ``dims``, of the kind ``sample`` needs."""
    return StoreSlots(sample, slots, dims, device) if sample.store is not None else FlatSlots(sample, slots, dims[0], device)


def bucket(n: int) -> int:
    """The batch-size bucket of ``n`` slots: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


class SlotsFull(UnsupportedStatic):
    """Every slot is taken and ``make_room`` refused more, while the buffers' sizes hold the
    joining session: a slot that an answer in the batch frees will take it."""


class SlotRow:
    """One session's slot in a `SlotBatch`, for one answer of up to ``capacity`` tokens."""

    def __init__(self, batch: "SlotBatch", cache: BudgetedCache, capacity: int, query_slots: int) -> None:
        self.batch, self.cache = batch, cache
        self.capacity, self.query_slots = capacity, query_slots
        self.slot = -1
        self.statics: list = []
        self.decoded = 0  # tokens decoded since joining
        self.steps = 0  # tokens decoded since the last (re)load
        self.seen = 0
        self.lent = 0  # bytes of the cache's keys and values that are views of the slot (`settle`)

    @property
    def room(self) -> int:
        return self.capacity - self.decoded

    def load(self, slot: int) -> None:
        """Copy the cache's entries into ``slot`` (its layers borrow views of it)."""
        self.slot = slot
        self.statics = [None] * len(self.cache.layers)
        self._fill()

    def _fill(self) -> None:
        for i in range(len(self.statics)):
            self.fill_layer(i)
        self.settle()

    def fill_layer(self, i: int) -> None:
        """Copy layer ``i`` of the cache into the slot (the layer then borrows views of it)."""
        buf, layer = self.batch.buffers[i], self.cache.layers[i]
        placed = self.statics[i] is not None
        if not placed:
            self.statics[i] = buf.row(self.slot, layer)
        static = self.statics[i]
        static.load(layer, self.room)
        # The batch reads where the row's segments start: set when the row is placed, and again
        # after a reload only where it lays them out anew (ragged segments, sized by what each
        # head kept; dense segments start a whole width apart, always at the same places).
        if not placed or (isinstance(static, StaticLayer) and not static.dense):
            buf.placed(self.slot, static)

    def settle(self) -> None:
        """After every layer is in the slot: its position and query counter restart from the
        cache, and ``lent`` counts the keys and values its layers hold as views of the slot."""
        self.lent = sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers if layer.borrowed)
        self.seen = self.cache.get_seq_length()
        self.batch.pos[self.slot] = self.seen
        self.batch.qslot[self.slot] = 0
        self.steps = 0

    def write_back(self) -> None:
        """Append the tokens decoded since the last (re)load to the session's cache."""
        n, slot, qbufs = self.steps, self.slot, self.batch.qbufs
        queries = None if not self.query_slots else [q[slot : slot + 1, :, :n] for q in qbufs]
        write_back_layers(self.statics, self.cache, n, self.seen, queries)
        self.seen += n
        self.steps = 0
        self.batch.qslot[slot] = 0

    def reload(self) -> bool:
        """After a compression of the cache: copy what it keeps into the same slot; False (the
        slot released) where it no longer fits, and the session goes on eagerly."""
        try:
            self._fill()
        except UnsupportedStatic:
            self.release()
            return False
        return True

    def discard(self, keep: bool = True) -> None:
        """End of an answer that its turn rolls back (`BudgetedCache.scratch`): the tokens decoded
        since the last (re)load are not written back, only counted in the cache's peaks as
        `write_back` would hold them, and the slot is freed. ``keep``: the cache's layers get
        their own copies of what they held at that (re)load (`release`); without it they keep
        views of the freed slot, for a rollback that puts a snapshot back over them right after
        (`BudgetedCache.snapshotted`)."""
        n, cache = self.steps, self.cache
        if n:
            for layer in cache.layers:
                layer.peak_entries = max(layer.peak_entries, layer.max_entries + n)
            cache.track_peak(n * sum(layer.entries.token_bytes() for layer in cache.layers))
        self.steps = 0
        if keep:
            self.release()
        else:
            self.batch.free(self)

    def release(self) -> None:
        """End of the answer (after `write_back`): the cache's layers get their own copies, the
        slot is freed. The slot is freed even where a copy fails (the device out of memory): the
        turn then fails, its cache is not trusted, and the other slots decode on."""
        try:
            for static, layer in zip(self.statics, self.cache.layers):
                static.release(layer)
        finally:
            self.batch.free(self)


class SlotBatch:
    """Static buffers of one layout for many sessions' slots (see the module docstring)."""

    def __init__(self, model, graph: bool, make_room: Callable[[int], bool] | None = None) -> None:
        self.model, self.use_graph, self.make_room = model, graph, make_room
        self.device = model.device
        self.rows: list[SlotRow | None] = []
        self.buffers: list = []
        self.qbufs: list[Tensor] = []
        self.nbytes = 0  # bytes of the buffers: every slot's, used or not, and the scorer's query buffers
        self.dims: list[tuple] = []  # per layer, the sizes the buffers were made for
        self.query_slots = 0
        self.graphs: dict[tuple, tuple] = {}  # (bucket, ragged) -> (graph, static inputs, logits)
        self.captures = 0  # graphs captured so far (for tests and metrics)
        self.allocations = 0  # buffers allocated so far (each growth drops the graphs of the last)
        self.regrow_seconds = 0.0  # wall time of the growths (re-allocating and re-filling every slot)
        self.capture_seconds = 0.0  # wall time of the captures (two warm-up forwards and the capture)
        self.fused = fusion.maybe_fuse(model, torch.device(self.device))
        self._sized: dict[tuple, int] = {}  # `bytes_for` by sizes (the batch's layout is one)

    # --- slots ------------------------------------------------------------------------------------
    def join(self, cache: BudgetedCache, capacity: int, query_slots: int = 0,
             coming: Callable[[], int] = lambda: 0) -> SlotRow:
        """A slot for ``cache``, whose answer may decode ``capacity`` tokens (``query_slots``:
        queries kept between two compressions, for the scorer). ``coming()``: sessions about to
        join after this one, given room too when the buffers grow (one growth for a burst of
        turns instead of one per power of two; where ``make_room`` refuses that many, half as many
        down to the bucket of the sessions in slots and this one). Raises `SlotsFull` where it
        refuses even those and `UnsupportedStatic` where the cache cannot be decoded statically."""
        if reason := supports(cache):
            raise UnsupportedStatic(reason)
        row = SlotRow(self, cache, capacity, query_slots)
        need = [slots_for(layer).need(layer, capacity) for layer in cache.layers]
        free = [i for i, r in enumerate(self.rows) if r is None]
        fits = bool(self.buffers) and query_slots <= self.query_slots and all(
            all(a <= b for a, b in zip(n, d)) for n, d in zip(need, self.dims))
        if not fits or not free:
            used = len(self.rows) - len(free)
            least = max(len(self.rows), bucket(used + 1))
            slots = max(least, bucket(used + 1 + coming()))
            dims = need if not self.dims else [tuple(max(a, b) for a, b in zip(n, d)) for n, d in zip(need, self.dims)]
            query_slots = max(query_slots, self.query_slots)
            while self.make_room is not None and not self.make_room(grown := self.bytes_for(cache, slots, dims, query_slots)):
                if slots // 2 < least:
                    refused = SlotsFull if fits and self.live else UnsupportedStatic
                    raise refused(f"the decode slots may not grow to {grown} bytes (the memory bound)")
                slots //= 2
            start = time.perf_counter()
            self._regrow(cache, slots, dims, query_slots)
            self.regrow_seconds += synced(start, self.device)
            free = [i for i, r in enumerate(self.rows) if r is None]
        self.rows[free[0]] = row
        try:
            row.load(free[0])
        except UnsupportedStatic:
            row.release()
            raise
        return row

    def free(self, row: SlotRow) -> None:
        for buf in self.buffers:
            buf.free(row.slot)
        self.rows[row.slot] = None
        row.slot = -1

    @property
    def live(self) -> list[SlotRow]:
        return [r for r in self.rows if r is not None]

    @property
    def lent_bytes(self) -> int:
        """Bytes of the buffers that the sessions in slots hold as their own entries (views)."""
        return sum(r.lent for r in self.live)

    def bytes_for(self, sample: BudgetedCache, slots: int, dims: list[tuple], query_slots: int) -> int:
        """Bytes of buffers of ``slots`` slots, sizes ``dims`` and ``query_slots`` queries (sized
        on the meta device: nothing is allocated). Kept per sizes: a turn waiting for a slot asks
        the same at each step, and sizing a layer's buffers costs a few hundred microseconds."""
        key = (slots, tuple(dims), query_slots)
        if key not in self._sized:
            meta = torch.device("meta")
            buffers = sum(buffer_bytes(_buffers(layer, slots, d, meta)) for layer, d in zip(sample.layers, dims))
            heads, head_dim = self._query_heads()
            queries = slots * heads * query_slots * head_dim * sample.layers[0].dtype.itemsize
            self._sized[key] = buffers + queries * len(sample.layers)
        return self._sized[key]

    def _query_heads(self) -> tuple[int, int]:
        """The model's query heads and their size (the scorer's query buffers)."""
        cfg = self.model.config.get_text_config(decoder=True)
        return cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _regrow(self, sample: BudgetedCache, slots: int, dims: list[tuple], query_slots: int) -> None:
        """New buffers of ``slots`` slots and sizes ``dims``; every session in a slot moves there,
        one layer at a time (the module docstring)."""
        rows = self.live
        for row in rows:
            row.write_back()
        self.graphs.clear()
        old, self.buffers = self.buffers, []
        self.qbufs = []
        self.allocations += 1
        device = torch.device(self.device)
        self.dims, self.query_slots = dims, query_slots
        self.rows = [None] * slots
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.qslot = torch.zeros(slots, dtype=torch.long, device=device)
        self.mask = torch.ones(slots, 1, 1, 1, dtype=torch.bool, device=device)
        heads, head_dim = self._query_heads()
        self.qbufs = [torch.zeros(slots, heads, query_slots, head_dim, dtype=sample.layers[0].dtype, device=device)
                      for _ in sample.layers] if query_slots else []
        for slot, row in enumerate(rows):
            self.rows[slot], row.slot = row, slot
        for i, (layer, d) in enumerate(zip(sample.layers, dims)):
            for row in rows:  # their caches own this layer's entries again: its old buffers can go
                row.statics[i].release(row.cache.layers[i])
                row.statics[i] = None
            if old:
                old[i] = None
            self.buffers.append(_buffers(layer, slots, d, device))
            for row in rows:
                row.fill_layer(i)
        for row in rows:
            row.settle()
        self.nbytes = sum(buffer_bytes(b) for b in self.buffers) + sum(q.nbytes for q in self.qbufs)

    def _compact(self) -> None:
        """Sessions in slots beyond the bucket their number needs move down to free slots."""
        live = self.live
        target = bucket(len(live))
        if not live or target * 2 > self.span:
            return
        for row in [r for r in live if r.slot >= target]:
            row.write_back()
            for static, layer in zip(row.statics, row.cache.layers):
                static.release(layer)
            self.free(row)
            slot = self.rows.index(None)
            self.rows[slot] = row
            row.load(slot)

    @property
    def span(self) -> int:
        """The bucket covering every slot in use."""
        used = [i for i, r in enumerate(self.rows) if r is not None]
        return bucket(used[-1] + 1) if used else 0

    # --- one step ---------------------------------------------------------------------------------
    def step(self, rows: list[SlotRow], tokens: list[int]) -> Tensor:
        """Feed ``tokens[i]`` to the session of ``rows[i]``: every session in a slot, one token
        each; returns their next-token logits [len(rows), vocab] (a copy)."""
        if len(rows) != len(self.live) or set(rows) != set(self.live):
            raise RuntimeError("every session in a slot feeds one token per step")
        self._compact()
        c = self.span
        ids = torch.zeros(c, dtype=torch.long)
        for row, token in zip(rows, tokens):
            ids[row.slot] = token
        self.ids[:c, 0].copy_(ids)
        key = (c, any(getattr(b, "ragged", False) for b in self.buffers))
        if key not in self.graphs:
            start = time.perf_counter()
            self.graphs[key] = self._bucket(c)
            self.capture_seconds += synced(start, self.device) if self.use_graph else 0.0
        graph, forward, logits = self.graphs[key]
        if graph is not None:
            graph.replay()
        else:
            forward()
        for row in rows:
            row.steps += 1
            row.decoded += 1
        return logits[0][torch.tensor([row.slot for row in rows], device=logits[0].device)]

    def _bucket(self, c: int) -> tuple:
        """The forward over the first ``c`` slots, and on CUDA its graph (captured once)."""
        layers = [buf.bucket(c) for buf in self.buffers]
        qslot = self.qslot[:c]
        for i, layer in enumerate(layers):
            layer.qpos = self.pos[:c]
            layer.qslot = qslot
            if self.qbufs:
                layer.qbuf = self.qbufs[i][:c]
        cache = Cache(layers=layers)
        ids, pos, mask = self.ids[:c], self.pos[:c], self.mask[:c]
        out: list[Tensor] = []

        def forward() -> None:
            result = run(self.model, cache, ids, position_ids=pos, attention_mask=mask, logits_to_keep=1).logits[:, -1]
            if not out:
                out.append(torch.empty_like(result))
            out[0].copy_(result)
            pos.add_(1)
            # A slot's query buffer index stays in range after its queries were taken (`write_back`).
            if self.qbufs:
                qslot.add_(1).clamp_(max=self.query_slots - 1)

        if not self.use_graph:
            return None, forward, out
        counters = [t for buf in self.buffers for t in buf.counters(c)] + [pos, qslot]
        saved = [t.clone() for t in counters]
        stream = warmup_stream(ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                forward()
                for t, s in zip(counters, saved):
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the server's other threads (session saves copying from the GPU) may use
        # CUDA while this thread captures.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            forward()
        self.captures += 1
        return graph, forward, out
