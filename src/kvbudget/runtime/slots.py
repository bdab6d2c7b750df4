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
* It **leaves** (`SlotRow.write_back`, then `SlotRow.release`) when its answer ends: the decoded
  entries go back to its own `BudgetedCache`, its layers get their own copies and the slot is
  freed (masked: length 0, its logits ignored).
* **Decode-time compression** of one session: `SlotRow.write_back`, the policy compresses the
  session's cache as it would alone, `SlotRow.reload` copies what it kept into the same slot.
* **Growth**: more sessions than slots, or a session needing wider segments than the buffers
  have, re-allocates the buffers (the next power of two; the widest segments so far) and re-fills
  every slot once; the graphs of the old buffers go. Buckets shrink lazily: the bucket of a step
  covers the highest slot in use, and sessions move down to free lower slots once they fit a
  bucket of half the size or less.

Rows a slot cannot take (`runtime.decoder.supports` says why) decode eagerly beside the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..kv.cache import BudgetedCache
from . import fusion
from .decoder import supports, warmup_stream, write_back_layers
from .modelcall import run
from .slot_buffers import FlatSlots, StoreSlots, slots_for
from .static import UnsupportedStatic


def layout(cache: BudgetedCache) -> tuple:
    """What caches must share to share a `SlotBatch`: per layer, its store's kind and settings."""
    return tuple(None if layer.store is None else (type(layer.store).__name__, tuple(sorted(vars(layer.store).items())))
                 for layer in cache.layers)


def bucket(n: int) -> int:
    """The batch-size bucket of ``n`` slots: the next power of two."""
    return 1 << max(n - 1, 0).bit_length()


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

    @property
    def room(self) -> int:
        return self.capacity - self.decoded

    def load(self, slot: int) -> None:
        """Copy the cache's entries into ``slot`` (its layers borrow views of it)."""
        batch, cache = self.batch, self.cache
        self.slot = slot
        self.statics = [buf.row(slot, layer) for buf, layer in zip(batch.buffers, cache.layers)]
        self._fill()

    def _fill(self) -> None:
        batch, cache, slot = self.batch, self.cache, self.slot
        for buf, static, layer in zip(batch.buffers, self.statics, cache.layers):
            static.load(layer, self.room)
            buf.placed(slot, static)
        self.seen = cache.get_seq_length()
        batch.pos[slot] = self.seen
        batch.qslot[slot] = 0
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

    def release(self) -> None:
        """End of the answer (after `write_back`): the cache's layers get their own copies, the slot is freed."""
        for static, layer in zip(self.statics, self.cache.layers):
            static.release(layer)
        self.batch.free(self)


class SlotBatch:
    """Static buffers of one layout for many sessions' slots (see the module docstring)."""

    def __init__(self, model, graph: bool) -> None:
        self.model, self.use_graph = model, graph
        self.device = model.device
        self.rows: list[SlotRow | None] = []
        self.buffers: list = []
        self.dims: list[tuple] = []  # per layer, the sizes the buffers were made for
        self.query_slots = 0
        self.graphs: dict[tuple, tuple] = {}  # (bucket, ragged) -> (graph, static inputs, logits)
        self.captures = 0  # graphs captured so far (for tests and metrics)
        self.allocations = 0  # buffers allocated so far (each growth drops the graphs of the last)
        self.fused = fusion.maybe_fuse(model, torch.device(self.device))

    # --- slots ------------------------------------------------------------------------------------
    def join(self, cache: BudgetedCache, capacity: int, query_slots: int = 0) -> SlotRow:
        """A slot for ``cache``, whose answer may decode ``capacity`` tokens (``query_slots``:
        queries kept between two compressions, for the scorer). Raises `UnsupportedStatic`
        where the cache cannot be decoded statically."""
        if reason := supports(cache):
            raise UnsupportedStatic(reason)
        row = SlotRow(self, cache, capacity, query_slots)
        need = [slots_for(layer).need(layer, capacity) for layer in cache.layers]
        free = [i for i, r in enumerate(self.rows) if r is None]
        fits = bool(self.buffers) and query_slots <= self.query_slots and all(
            all(a <= b for a, b in zip(n, d)) for n, d in zip(need, self.dims))
        if not fits or not free:
            slots = bucket(len(self.rows) - len(free) + 1) if not free else len(self.rows)
            dims = need if not self.dims else [tuple(max(a, b) for a, b in zip(n, d)) for n, d in zip(need, self.dims)]
            self._regrow(cache, slots, dims, max(query_slots, self.query_slots))
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

    def _regrow(self, sample: BudgetedCache, slots: int, dims: list[tuple], query_slots: int) -> None:
        """New buffers of ``slots`` slots and sizes ``dims``; every session in a slot moves there."""
        rows = self.live
        for row in rows:  # their caches own their entries again, the old buffers can go
            row.write_back()
            for static, layer in zip(row.statics, row.cache.layers):
                static.release(layer)
            row.statics = []  # (views of the old buffers)
        self.graphs.clear()
        self.buffers = []
        self.allocations += 1
        device = torch.device(self.device)
        for layer, d in zip(sample.layers, dims):
            self.buffers.append(StoreSlots(layer, slots, d, device) if layer.store is not None
                                else FlatSlots(layer, slots, d[0], device))
        self.dims, self.query_slots = dims, query_slots
        self.rows = [None] * slots
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.qslot = torch.zeros(slots, dtype=torch.long, device=device)
        self.mask = torch.ones(slots, 1, 1, 1, dtype=torch.bool, device=device)
        cfg = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = sample.layers[0].dtype
        self.qbufs = [torch.zeros(slots, cfg.num_attention_heads, query_slots, head_dim, dtype=dtype, device=device)
                      for _ in sample.layers] if query_slots else []
        for i, row in enumerate(rows):
            self.rows[i] = row
            row.load(i)

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
            self.graphs[key] = self._bucket(c)
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
