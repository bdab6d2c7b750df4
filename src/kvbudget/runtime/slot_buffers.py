"""One attention layer's static buffers for a batch of slots (`runtime.slots`), one slot a session.

Two kinds, by how the sessions' layers store their entries:

* `FlatSlots` (dense and ragged layers): the flat ``keys [C*R, d]`` of `runtime.static`, where
  slot ``r`` owns the region ``[r*R, (r+1)*R)``, ``R = H * W``: a dense session lays its heads
  out ``W`` apart (so its layer can borrow a ``[1, H, W, d]`` view), a ragged one (Ada-KV) sizes
  its heads' segments by their lengths inside the region;
* `StoreSlots` (KIVI layers): the ``[C, H, ...]`` body and tail buffers of `runtime.static_store`,
  slot ``r`` being batch row ``r``.

A session's slot is a `StaticLayer` / `StaticStoreLayer` built over *views* of its region
(`row`), so loading, lending, write-back and release are those of the single-session decoder,
unchanged; the batch's forward runs over a layer of the same class viewing the first ``C`` slots
(`bucket`), whose ``live`` mask keeps empty slots at one scratch entry (their lengths are reset
before each append, inside the step), so an empty slot never grows and attends to something.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kv.body import Body, chunk_dtype
from ..kv.layer import BudgetedLayer
from ..kv.ragged import RaggedEntries
from .static import StaticLayer
from .static_store import StaticStoreLayer

ROUND = 64  # per-head sizes are rounded up to this, so sessions of about one size share buffers


def _up(n: int) -> int:
    return -(-n // ROUND) * ROUND


class SlotLayer(StaticLayer):
    """The batch's view of `FlatSlots`: an empty slot's lengths restart at 0 before each append."""

    live: Tensor

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.lens.mul_(self.live)
        return super().update(key_states, value_states, *args, **kwargs)


class SlotStoreLayer(StaticStoreLayer):
    """The batch's view of `StoreSlots` (empty slots as in `SlotLayer`)."""

    live: Tensor

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.tail_lens.mul_(self.live)
        return super().update(key_states, value_states, *args, **kwargs)


class FlatSlots:
    """Flat key / value buffers of ``slots`` regions of ``heads * width`` entries (module docstring)."""

    def __init__(self, sample: BudgetedLayer, slots: int, width: int, device: torch.device) -> None:
        keys, values = sample.keys, sample.values
        self.heads, self.width, self.window = sample.n_heads, width, sample.window
        self.region = self.heads * width
        size = slots * self.region
        # Zeroed: stale memory can hold NaN bit patterns that a masked product would spread.
        self.keys = torch.zeros(size, keys.shape[-1], dtype=keys.dtype, device=device)
        self.values = torch.zeros(size, values.shape[-1], dtype=values.dtype, device=device)
        self.starts = torch.arange(slots * self.heads, device=device, dtype=torch.long) * width
        self.lens = torch.zeros(slots * self.heads, dtype=torch.int32, device=device)
        self.live = torch.zeros(slots * self.heads, dtype=torch.int32, device=device)
        self.kpos = None if self.window is None else torch.zeros(size, dtype=torch.int32, device=device)
        self.ragged = False  # a ragged session was loaded: any segment may span its whole region
        self.moved: set[int] = set()  # slots whose segments a ragged row laid out away from their own starts

    @staticmethod
    def need(layer: BudgetedLayer, capacity: int) -> tuple[int]:
        """The per-head width ``layer`` needs to decode ``capacity`` tokens in a slot."""
        sizes = layer.entries.head_sizes()  # on the host: a join reads nothing back from the device
        if isinstance(layer.entries, RaggedEntries):
            return (_up(-(-(sum(sizes) + len(sizes) * capacity) // len(sizes))),)
        return (_up(max(sizes) + capacity),)

    def row(self, r: int, layer: BudgetedLayer) -> StaticLayer:
        """Slot ``r`` as the single-session static layer of ``layer``: views of its region."""
        h, region = self.heads, self.region
        dense = not isinstance(layer.entries, RaggedEntries)
        self.ragged |= not dense
        view = slice(r * region, (r + 1) * region)
        row = StaticLayer(self.keys[view], self.values[view], torch.zeros(h, dtype=torch.long, device=self.keys.device),
                          self.lens[r * h : (r + 1) * h], self.width if dense else region, dense=dense)
        row.window, row.kpos = self.window, None if self.kpos is None else self.kpos[view]
        return row

    def placed(self, r: int, row: StaticLayer) -> None:
        """After ``row`` (slot ``r``) laid its segments out: the batch reads them at absolute starts."""
        self.starts[r * self.heads : (r + 1) * self.heads].copy_(row.starts + r * self.region)
        self.live[r * self.heads : (r + 1) * self.heads] = 1
        if not row.dense:
            self.moved.add(r)

    def free(self, r: int) -> None:
        """Slot ``r`` holds nothing (its lengths 0) and its segments start at their own places again."""
        h = self.heads
        self.live[r * h : (r + 1) * h] = 0
        self.lens[r * h : (r + 1) * h] = 0
        if r in self.moved:  # a dense row's segments start where the buffers were made to start them
            self.moved.discard(r)
            self.starts[r * h : (r + 1) * h] = torch.arange(h, device=self.starts.device) * self.width + r * self.region

    def bucket(self, c: int) -> SlotLayer:
        """The batch's layer over the first ``c`` slots (views: every bucket shares the buffers)."""
        h = self.heads
        layer = SlotLayer(self.keys, self.values, self.starts[: c * h], self.lens[: c * h],
                          self.region if self.ragged else self.width, dense=False)
        layer.window, layer.kpos, layer.live = self.window, self.kpos, self.live[: c * h]
        return layer

    def counters(self, c: int) -> list[Tensor]:
        return [self.lens[: c * self.heads]]


class StoreSlots:
    """KIVI body and tail buffers of ``slots`` batch rows (module docstring)."""

    def __init__(self, sample: BudgetedLayer, slots: int, dims: tuple[int, int, int], device: torch.device) -> None:
        body_cap, chunk_cap, tail = dims
        store = sample.store
        _, h, _, d = sample.keys.shape
        dv = sample.values.shape[-1]
        self.heads, self.window, self.store, self.dims = h, sample.window, store, dims
        probe = store.encode(sample.keys.new_zeros(slots, h, 1, d, device=device),
                             sample.values.new_zeros(slots, h, 1, dv, device=device),
                             torch.ones(slots, h, 1, dtype=torch.bool, device=device), None)
        self.body = Body(
            tokens={k: v.new_zeros(slots, h, body_cap, *v.shape[3:]) for k, v in probe.tokens.items()},
            chunk_id=torch.zeros(slots, h, body_cap, dtype=chunk_dtype(chunk_cap), device=device),
            chunks={k: v.new_zeros(slots, h, chunk_cap, *v.shape[3:]) for k, v in probe.chunks.items()},
        )
        self.keys = sample.keys.new_zeros(slots, h, tail, d, device=device)
        self.values = sample.values.new_zeros(slots, h, tail, dv, device=device)
        self.body_lens = torch.zeros(slots, h, dtype=torch.int32, device=device)
        self.tail_lens = torch.zeros(slots, h, dtype=torch.int32, device=device)
        self.live = torch.zeros(slots, h, dtype=torch.int32, device=device)
        windowed = self.window is not None
        self.body_pos = torch.zeros(slots, h, body_cap, dtype=torch.int32, device=device) if windowed else None
        self.tail_pos = torch.zeros(slots, h, tail, dtype=torch.int32, device=device) if windowed else None

    @staticmethod
    def need(layer: BudgetedLayer, capacity: int) -> tuple[int, int, int]:
        """Body entries, chunks and tail entries ``layer`` needs to decode ``capacity`` tokens
        (the capacities of `StaticStoreLayer.build`)."""
        body = layer.entries.body
        held = len(body) if body is not None else 0
        chunks = next(iter(body.chunks.values())).shape[2] if body is not None else 0
        t = layer.keys.shape[2]
        per_chunk = layer.store.chunk or 1
        return _up(held + t + capacity), _up(chunks + 2 * -(-(t + capacity) // per_chunk) + 2), _up(t + capacity)

    def _view(self, rows: slice, cls: type) -> StaticStoreLayer:
        body = self.body
        view = Body({k: t[rows] for k, t in body.tokens.items()}, body.chunk_id[rows],
                    {k: t[rows] for k, t in body.chunks.items()})
        layer = cls(self.store, view, self.keys[rows], self.values[rows])
        layer.body_lens, layer.tail_lens = self.body_lens[rows], self.tail_lens[rows]
        layer.window = self.window
        if self.window is not None:
            layer.body_pos, layer.tail_pos = self.body_pos[rows], self.tail_pos[rows]
        return layer

    def row(self, r: int, layer: BudgetedLayer) -> StaticStoreLayer:
        return self._view(slice(r, r + 1), StaticStoreLayer)

    def placed(self, r: int, row: StaticStoreLayer) -> None:
        self.live[r] = 1

    def free(self, r: int) -> None:
        self.live[r] = 0
        self.body_lens[r] = 0
        self.tail_lens[r] = 0

    def bucket(self, c: int) -> SlotStoreLayer:
        layer = self._view(slice(0, c), SlotStoreLayer)
        layer.live = self.live[:c]
        return layer

    def counters(self, c: int) -> list[Tensor]:
        return [self.tail_lens[:c]]


def buffer_bytes(buffers: "FlatSlots | StoreSlots") -> int:
    """Bytes of the tensors ``buffers`` holds (on the meta device: what it would hold)."""
    tensors = [t for t in vars(buffers).values() if isinstance(t, Tensor)]
    body = getattr(buffers, "body", None)
    if body is not None:
        tensors += [*body.tokens.values(), body.chunk_id, *body.chunks.values()]
    return sum(t.nbytes for t in tensors)


def slots_for(layer: BudgetedLayer) -> type:
    """The buffer kind of ``layer``'s storage."""
    return StoreSlots if layer.store is not None else FlatSlots
