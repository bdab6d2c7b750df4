"""Static-capacity decoding of layers with a KIVI store: the encoded body in preallocated buffers.

A store layer (`kvbudget.store`) holds its older entries encoded (the body) and its most recent
ones in full precision (the tail). Between two compressions only the tail changes, one token per
step, so a decode step is as static as a dense one: the body's packed codes, scales and chunk ids
sit in buffers sized once, read by the fused dequantise-and-attend kernel
(`kernels.kivi_decode_attention`) up to ``body_lens`` entries per head, and the new token is
written into a ``[B, H, T, d]`` tail buffer at ``tail_lens``. Nothing in the step depends on a
host value, so it is captured in the decoder's CUDA graph with the rest of the model
(`runtime.decoder.StaticDecoder`); eagerly, each step costs the host 0.11-0.19 ms per layer for
the kernel's launch alone (docs/benchmarks.md, "KIVI decode in the CUDA graph").

At a compression the decoder writes the tail back to the `BudgetedLayer`, the policy flushes or
evicts as usual (encoding entries into a new body), and `StaticStoreLayer.load` copies the new
body and tail into the same buffers. A body the compression left untouched is not copied again.
In between, the cache's layer holds views of the buffers (`lend`), not a copy of its own, and
`release` gives it one back when the answer ends (`kvbudget.static`).

Capacities, fixed when the decoder is built for an answer of ``capacity`` tokens:

* body: the entries held now plus ``capacity`` (a body never holds more entries than the layer);
* chunk table: the chunks now plus two per 32 tokens that can still be encoded, + 2 (each
  compression encodes its new entries into ``ceil(new / 32)`` fresh chunks; partial chunks at
  short intervals are what the factor 2 is for). A compression that needs more raises
  `UnsupportedStatic` at `load` and the session goes on eagerly, as for a dense layer turned ragged;
* tail: the tail now plus ``capacity`` (a tail only grows by decoded tokens).

Only plain KIVI is covered (the stores the fused kernel reads); `unsupported` says why for others.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from ..kv.plan import Extras, set_plan
from ..kv.body import Body, at_start, chunk_dtype
from ..kv.layer import FUSED_KIVI, BudgetedLayer
from ..kv.ragged import RaggedEntries
from .static import UnsupportedStatic, append_metadata, append_token, record_query, release_tensors, shares


def unsupported(layer: BudgetedLayer) -> str | None:
    """None if ``layer``'s store can be decoded from static buffers, else why not."""
    if not getattr(layer.store, "fused_decode", False):  # what the fused kernel reads (not MiKV)
        return f"store '{layer.store.describe()}' decodes eagerly (static buffers hold plain KIVI bodies)"
    if isinstance(layer.entries, RaggedEntries):
        return "a store layer with per-head lengths"
    return None


@dataclass
class StoreStaticPlan:
    """Handed to the attention hook by `StaticStoreLayer.update`: attend to the body as stored
    and to the tail, each up to its device-side lengths."""

    keys: Tensor  # identity check against the attention call's key argument
    layer: "StaticStoreLayer"

    def attend(self, query: Tensor, scaling: float, extras: Extras) -> Tensor:
        """``query [B, Hq, 1, d]`` -> ``[B, 1, Hq, dv]``."""
        from .. import kernels  # imports triton: only once a static step runs

        layer = self.layer
        record_query(layer, query)
        attend = kernels.reference_kivi_decode_attention if FUSED_KIVI == "0" else kernels.kivi_decode_attention
        window = {}
        if layer.window is not None:  # positions masked by the torch path (the fused kernel has no window)
            window = {"window": layer.window, "body_pos": layer.body_pos, "tail_pos": layer.tail_pos,
                      "qpos": layer.qpos.view(-1)}
        out = attend(query[:, :, 0], layer.body, layer.store, layer.keys, layer.values, scaling,
                     tail_lens=layer.tail_lens, body_lens=layer.body_lens, softcap=extras.softcap, sinks=extras.sinks,
                     **window)
        return out[:, None]


class StaticStoreLayer(CacheLayerMixin):
    """One KIVI layer in static buffers: encoded body (fixed between compressions) + tail."""

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(self, store, body: Body, keys: Tensor, values: Tensor, window: int | None = None) -> None:
        super().__init__()
        b, h, _, _ = keys.shape
        device = keys.device
        # A sliding-window layer: its entries' positions, beside the body and the tail, and the
        # decoder's position tensor of the token fed ([B, 1], shared by all layers).
        self.window = window
        self.body_pos = self.tail_pos = self.qpos = None
        if window is not None:
            self.body_pos = torch.zeros(b, h, body.chunk_id.shape[2], dtype=torch.int32, device=device)
            self.tail_pos = torch.zeros(b, h, keys.shape[2], dtype=torch.int32, device=device)
        self.store = store
        self.body = body  # capacity buffers: tokens [B, H, NB, ...], chunk ids [B, H, NB], chunks [B, H, NC, d]
        self.keys, self.values = keys, values  # tail [B, H, T, d] / [B, H, T, dv]
        self.body_lens = torch.zeros(b, h, dtype=torch.int32, device=device)
        self.tail_lens = torch.zeros(b, h, dtype=torch.int32, device=device)
        # The tail as flat rows (head after head, T each) for the shared append.
        self.starts = torch.arange(b * h, device=device, dtype=torch.long) * keys.shape[2]
        self.qbuf: Tensor | None = None  # set by the decoder, as for dense layers
        self.qslot: Tensor | None = None
        self._source: object = None  # the `Body` last copied in / lent (None: no body yet)
        self._held: tuple = (0, 0, None)  # body entries, chunks and chunk-id dtype last copied in
        self._tail = 0  # tail entries held (host mirror of tail_lens)
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # pragma: no cover
        raise RuntimeError("a StaticStoreLayer is built with its buffers")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new token of every (batch, head) to its tail."""
        if self.tail_pos is not None:  # its position first: append_token advances the lengths
            b, h = key_states.shape[:2]
            pos = self.qpos.view(b, 1).expand(b, h).reshape(-1).to(torch.int32)
            self.tail_pos.view(-1).index_copy_(0, self.starts + self.tail_lens.view(-1).long(), pos)
        append_token(key_states, value_states, self.keys.view(-1, self.keys.shape[-1]),
                     self.values.view(-1, self.values.shape[-1]), self.starts, self.tail_lens.view(-1))
        set_plan(StoreStaticPlan(self.keys, self))
        return self.keys, self.values

    def get_seq_length(self) -> int:  # positions are passed explicitly; never used in decode
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.body.chunk_id.shape[2] + self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.body.chunk_id.shape[2] + self.keys.shape[2]

    # --- what the decoder asks of every static layer ----------------------------------------
    @property
    def counters(self) -> list[Tensor]:
        return [self.tail_lens]

    @classmethod
    def build(cls, layer: BudgetedLayer, capacity: int) -> "StaticStoreLayer":
        """Buffers for ``layer`` (see the module docstring for the capacities), filled."""
        store, layer_body = layer.store, layer.entries.body
        b, h, t, d = layer.keys.shape
        held = len(layer_body) if layer_body is not None else 0
        n_chunks = next(iter(layer_body.chunks.values())).shape[2] if layer_body is not None else 0
        per_chunk = store.chunk or 1
        body_cap = held + t + capacity
        chunk_cap = n_chunks + 2 * -(-(t + capacity) // per_chunk) + 2
        # One encoded entry gives the shapes and dtypes of every per-token and per-chunk field.
        probe = store.encode(layer.keys.new_zeros(b, h, 1, d), layer.values.new_zeros(b, h, 1, layer.values.shape[-1]),
                             torch.ones(b, h, 1, dtype=torch.bool, device=layer.keys.device), None)
        body = Body(
            tokens={k: v.new_zeros(b, h, body_cap, *v.shape[3:]) for k, v in probe.tokens.items()},
            # The dtype the cache's own chunk ids have at this table size (so that lending views
            # keeps its byte count); the kernel reads either.
            chunk_id=torch.zeros(b, h, body_cap, dtype=chunk_dtype(chunk_cap), device=layer.keys.device),
            chunks={k: v.new_zeros(b, h, chunk_cap, *v.shape[3:]) for k, v in probe.chunks.items()},
        )
        static = cls(store, body, layer.keys.new_zeros(b, h, t + capacity, d),
                     layer.values.new_zeros(b, h, t + capacity, layer.values.shape[-1]), window=layer.window)
        static.load(layer, capacity)
        return static

    def load(self, layer: BudgetedLayer, room: int) -> None:
        """Copy ``layer``'s body (when it changed) and tail into the buffers, leaving room for
        ``room`` more tokens (`UnsupportedStatic` when that no longer fits), then lend ``layer``
        views of them."""
        t = layer.keys.shape[2]
        if t + room > self.keys.shape[2]:
            raise UnsupportedStatic("the store's full-precision tail no longer fits the static buffers")
        body = layer.entries.body
        if body is not self._source:
            n = len(body) if body is not None else 0
            chunks = next(iter(body.chunks.values())).shape[2] if n else 0
            if n > self.body.chunk_id.shape[2] or chunks > next(iter(self.body.chunks.values())).shape[2]:
                raise UnsupportedStatic("the store's encoded body no longer fits the static buffers")
            if n:
                for name, buf in self.body.tokens.items():
                    _copy_into(buf[:, :, :n], body.tokens[name])
                _copy_into(self.body.chunk_id[:, :, :n], body.chunk_id)
                for name, buf in self.body.chunks.items():
                    _copy_into(buf[:, :, :chunks], body.chunks[name])
            self.body_lens.fill_(n)
            self._held = (n, chunks, body.chunk_id.dtype if n else None)
        _copy_into(self.keys[:, :, :t], layer.keys)
        _copy_into(self.values[:, :, :t], layer.values)
        if self.window is not None:
            positions = layer.entries.positions
            n = positions.shape[2] - t
            self.body_pos[:, :, :n].copy_(positions[:, :, :n])
            self.tail_pos[:, :, :t].copy_(positions[:, :, n:])
        self.tail_lens.fill_(t)
        self._tail = t
        self.lend(layer)

    def lend(self, layer: BudgetedLayer) -> None:
        """``layer``'s body and tail become views of the buffers (nothing held twice while
        decoding); chunk ids stay the layer's own when their dtype differs from the buffer's."""
        n, chunks, id_dtype = self._held
        lent = layer.entries.body
        if n:
            body = self.body
            lent = Body(
                {k: t[:, :, :n] for k, t in body.tokens.items()},
                body.chunk_id[:, :, :n] if id_dtype == body.chunk_id.dtype else lent.chunk_id,
                {k: c[:, :, :chunks] for k, c in body.chunks.items()},
            )
        self._source = lent
        layer.entries = replace(layer.entries, body=lent, keys=self.keys[:, :, : self._tail],
                                values=self.values[:, :, : self._tail])
        layer.borrowed, layer.room = True, self.body

    def write_back(self, layer: BudgetedLayer, n: int, new_pos: Tensor) -> None:
        """Hand ``layer`` its tail with the ``n`` tokens decoded since the last load (the body
        did not change)."""
        self._tail += n
        layer.entries = replace(layer.entries, keys=self.keys[:, :, : self._tail], values=self.values[:, :, : self._tail])
        append_metadata(layer, n, new_pos)

    def release(self, layer: BudgetedLayer) -> None:
        """Give ``layer`` copies of what it borrowed and drop the buffers (the decoder is done)."""
        buffers = [self.keys, self.values, self.body.chunk_id, *self.body.tokens.values(), *self.body.chunks.values()]
        release_tensors(layer, *buffers)
        empty = self.keys.new_empty(0)
        self.keys = self.values = empty
        self.body = Body({k: empty for k in self.body.tokens}, empty, {k: empty for k in self.body.chunks})
        self._source = None


def _copy_into(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` where ``src`` may be a view of the same buffer (what was lent): the
    very same view needs no copy; an overlapping other one (a flushed tail starts further on)
    is copied out first."""
    if shares(src, dst):
        if at_start(src, dst) and src.shape == dst.shape:
            return
        src = src.clone()
    dst.copy_(src)
