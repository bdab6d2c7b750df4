"""Static-capacity decoding: the budgeted cache in preallocated buffers, one CUDA graph per step.

A budgeted cache has a capacity known in advance (what the policy keeps + the tokens decoded
before the next compression), so decoding can run on buffers allocated once. Nothing in a
decode step then depends on host-side values: the new token's KV is written at
``starts + lens`` (device tensors), the attention reads ``lens`` entries per head, and the
position and query slot advance on the device. That makes the whole step capturable as one
CUDA graph, which removes the ~70 ms/token launch overhead that plain transformers pays for an
8B model (docs/benchmarks.md, "Decode speed at batch 1").

Storage is flat per layer, ``keys [S, d]`` with one segment per (batch, KV head): segment ``i``
starts at ``starts[i]`` and holds ``lens[i]`` entries. Heads that keep different numbers of
entries (Ada-KV) therefore need no padding in memory, and since ``starts`` is a device tensor
the segments can be laid out again after a compression without re-capturing the graph.

Between compressions the decoded entries live only here; `StaticDecoder.write_back` appends
them to the `BudgetedCache` (with positions, zeroed per-entry state and the observed queries),
the policy compresses the cache as usual, and `StaticDecoder.reload` copies what was kept back
into the buffers. The entries are not held twice: the cache's dense layers hold views of the
buffers (`StaticLayer.lend`, flagged ``borrowed``), and `StaticDecoder.release` gives them their
own copies when the answer ends, layer by layer (ragged layers keep a flat copy of their own).
Layers with a KIVI store keep their encoded body in static buffers too (`kvbudget.static_store`):
the body only changes at a compression, decoded tokens go to the full-precision tail. Other
stores, and store layers with a sliding window, are not supported here: `supports` says why and
the session decodes eagerly instead. A sliding-window layer keeps its entries' positions in a
buffer beside its keys, and the kernel masks those outside the window of the token fed.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from ..kv.body import at_start
from ..kv.entries import LayerView
from ..kv.layer import BudgetedLayer
from ..kv.plan import Extras, set_plan
from ..kv.ragged import RaggedEntries, padded_to_ragged, true_indices
from . import fusion

_local = threading.local()


# Which attention a static decode step uses: "auto" (the Triton kernel on CUDA, else padded SDPA
# for dense layers, else the torch reference of kvbudget.kernels), or one of "triton", "sdpa",
# "reference" (benchmarks).
ATTENTION = os.environ.get("KVBUDGET_DECODE_ATTENTION", "auto")
ATTENTION_CHOICES = ("auto", "triton", "sdpa", "reference")


def padded_sdpa_decode(q: Tensor, keys: Tensor, values: Tensor, lens: Tensor, scale: float, width: int) -> Tensor:
    """Dense layers only (every segment ``width`` long, head after head): PyTorch SDPA over the
    padded ``[B, H, width, d]`` view with a length mask. The g query heads of a group are passed
    as g query rows of their KV head, so nothing is expanded for GQA."""
    b, hq, d = q.shape
    h = lens.numel() // b
    k = keys.view(b, h, width, -1)
    v = values.view(b, h, width, -1)
    mask = (torch.arange(width, device=q.device)[None, :] < lens[:, None]).view(b, h, 1, width)
    out = torch.nn.functional.scaled_dot_product_attention(q.view(b, h, hq // h, d), k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, -1)


def varlen_decode(q: Tensor, layer: "StaticLayer", scale: float, extras: Extras = Extras()) -> Tensor:
    """Decode attention of ``q [B, Hq, d]`` over ``layer``'s segments, with the backend chosen by
    `ATTENTION`; ``extras`` (softcapping, sinks) and the layer's sliding window applied."""
    from .. import kernels  # imports triton: only once a static step runs, not with kvbudget

    added = {}
    if extras.softcap or extras.sinks is not None:
        added.update(softcap=extras.softcap, sinks=extras.sinks)
    if layer.window is not None:
        added.update(window=layer.window, kpos=layer.kpos, qpos=layer.qpos.view(-1))
    choice = ATTENTION
    if choice in ("auto", "triton") and q.is_cuda:
        if kernels.HAVE_TRITON:
            return kernels.varlen_decode_attention(q, layer.keys, layer.values, layer.starts, layer.lens, scale,
                                                   max_len=layer.width, **added)
        if choice == "triton":
            raise RuntimeError("KVBUDGET_DECODE_ATTENTION=triton but triton is unavailable")
    if layer.dense and not added and (choice == "sdpa" or (choice == "auto" and q.is_cuda)):
        return padded_sdpa_decode(q, layer.keys, layer.values, layer.lens, scale, layer.width)
    return kernels.reference_varlen_decode_attention(q, layer.keys, layer.values, layer.starts, layer.lens, scale,
                                                     max_len=layer.width, **added)


@dataclass
class StaticPlan:
    """Handed to the attention hook by `StaticLayer.update`: attend with the layer's lengths."""

    keys: Tensor  # identity check against the attention call's key argument
    layer: "StaticLayer"

    def attend(self, query: Tensor, scaling: float, extras: Extras) -> Tensor:
        """``query [B, Hq, 1, d]`` -> ``[B, 1, Hq, dv]`` (the layout transformers expects back)."""
        record_query(self.layer, query)
        return varlen_decode(query[:, :, 0], self.layer, scaling, extras)[:, None]


def record_query(layer, query: Tensor) -> None:
    """Keep a decoded token's query in the layer's query buffer (scorers read them at write-back),
    at ``layer.qslot``: one slot [1] for every row, or one per row [B] (`runtime.slots`)."""
    if layer.qbuf is None:
        return
    if layer.qslot.numel() == 1:
        layer.qbuf.index_copy_(2, layer.qslot, query)
    else:
        rows = torch.arange(query.shape[0], device=query.device)
        layer.qbuf[rows, :, layer.qslot] = query[:, :, 0]


def append_token(key_states: Tensor, value_states: Tensor, keys: Tensor, values: Tensor, starts: Tensor,
                 lens: Tensor) -> None:
    """Write the new token of every (batch, head) at ``starts + lens`` of the flat buffers
    ``keys [S, d]`` / ``values [S, dv]``, then ``lens += 1`` (on the device: no host value)."""
    if key_states.shape[2] != 1:
        raise ValueError("static decoding feeds one token per step")
    key = key_states.reshape(-1, key_states.shape[-1]).to(keys.dtype)
    value = value_states.reshape(-1, value_states.shape[-1]).to(values.dtype)
    fused = fusion.kernels_for(key)
    if fused is not None and key.stride(-1) == 1 and value.stride(-1) == 1:
        fused.static_append(key, value, keys, values, starts, lens)
    else:
        slot = starts + lens.long()
        keys.index_copy_(0, slot, key)
        values.index_copy_(0, slot, value)
        lens.add_(1)


class StaticLayer(CacheLayerMixin):
    """One budgeted layer's entries in a preallocated flat buffer (see the module docstring)."""

    is_sliding = False
    is_compileable = True
    is_croppable = False

    def __init__(self, keys: Tensor, values: Tensor, starts: Tensor, lens: Tensor, width: int, dense: bool,
                 window: int | None = None) -> None:
        super().__init__()
        # Dense: every head holds the same count, segments are all ``width`` long (a padded
        # [B, H, width, d] view exists); ragged: segments sized per head, ``width`` bounds them.
        self.dense = dense
        self.keys, self.values = keys, values  # [S, d], [S, dv]
        self.starts, self.lens = starts, lens  # [B*H] int64, [B*H] int32
        self.width = width  # host-side bound on any segment's length
        self.qbuf: Tensor | None = None  # [B, Hq, slots, d] queries of the decoded tokens
        self.qslot: Tensor | None = None  # [1] long, shared by all layers
        self._held = 0  # entries per head at the last load / write-back (host; dense layers)
        self._lent: tuple[Tensor, Tensor] | None = None  # the views handed to the cache's layer
        # A sliding-window layer: each entry's position, laid out as the keys ([S] int32), and the
        # decoder's position tensor of the token fed ([B, 1], shared by all layers).
        self.window = window
        self.kpos: Tensor | None = None if window is None else torch.zeros(keys.shape[0], dtype=torch.int32,
                                                                           device=keys.device)
        self.qpos: Tensor | None = None
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # pragma: no cover
        raise RuntimeError("a StaticLayer is built with its buffers")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write the new token of every (batch, head) at the end of its segment (one token per step)."""
        if self.kpos is not None:  # its position first: append_token advances the lengths
            b, h = key_states.shape[:2]
            pos = self.qpos.view(b, 1).expand(b, h).reshape(-1).to(torch.int32)
            self.kpos.index_copy_(0, self.starts + self.lens.long(), pos)
        append_token(key_states, value_states, self.keys, self.values, self.starts, self.lens)
        set_plan(StaticPlan(self.keys, self))
        return self.keys, self.values

    def get_seq_length(self) -> int:  # positions are passed explicitly; never used in decode
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_max_length(self) -> int:
        return self.width

    # --- what the decoder asks of every static layer ----------------------------------------
    @property
    def counters(self) -> list[Tensor]:
        """Device tensors a decode step advances (restored after the warm-up before a capture)."""
        return [self.lens]

    @classmethod
    def build(cls, layer: BudgetedLayer, capacity: int) -> "StaticLayer":
        """Buffers for ``layer``'s entries with room for ``capacity`` decoded tokens per head."""
        view = layer.view()
        sizes = layer.entries.head_sizes()  # [B*H] on the host
        size = sum(sizes) + len(sizes) * capacity
        # Zeroed, not empty: padded SDPA multiplies the unused slots by a mask, and stale
        # memory there can hold NaN/inf bit patterns (NaN * 0 is NaN).
        keys = view.keys.new_zeros(size, view.keys.shape[-1])
        values = view.values.new_zeros(size, view.values.shape[-1])
        # Dense layers: every head holds the same count, so the longest segment is bounded
        # by it; ragged ones may be laid out again differently, bounded only by the total.
        dense = not isinstance(layer.entries, RaggedEntries)
        bound = max(sizes) + capacity if dense else size
        heads = len(sizes)
        static = cls(keys, values, torch.zeros(heads, dtype=torch.long, device=keys.device),
                     torch.zeros(heads, dtype=torch.int32, device=keys.device), bound, dense=dense, window=layer.window)
        _fill(static, view, sizes, capacity)
        static.lend(layer, max(sizes))
        return static

    def load(self, layer: BudgetedLayer, room: int) -> None:
        """Copy what ``layer`` holds after a compression into the same buffers, with room for
        ``room`` more tokens per head (`UnsupportedStatic` when that no longer fits)."""
        if self._kept_in_place(layer):  # nothing evicted, or kept in the buffers (`BudgetedLayer.hold`)
            held = layer.keys.shape[2]
            if held + room > self.width:
                raise UnsupportedStatic("the compressed cache no longer fits the static buffers")
            self.lens.fill_(held)  # dense segments keep their starts
            if self.kpos is not None:  # the kept entries' positions (a window may have dropped some)
                b, h = layer.entries.positions.shape[:2]
                self.kpos.view(b, h, self.width)[:, :, :held].copy_(layer.entries.positions)
            self.lend(layer, held)
            return
        view = layer.view()
        sizes = layer.entries.head_sizes()
        if (self.dense and isinstance(layer.entries, RaggedEntries)) or max(sizes) + room > self.width or (
            sum(sizes) + len(sizes) * room > self.keys.shape[0]
        ):
            raise UnsupportedStatic("the compressed cache no longer fits the static buffers")
        keys, values = (t.clone() if shares(t, self.keys) or shares(t, self.values) else t for t in (view.keys, view.values))
        _fill(self, replace(view, keys=keys, values=values), sizes, room)
        self.lend(layer, max(sizes))

    def lend(self, layer: BudgetedLayer, held: int) -> None:
        """Dense layers: ``layer``'s keys / values become views of the buffers' first ``held``
        entries per head, so that decoding does not hold the entries twice (ragged layers keep
        their own flat copy: their buffer has gaps between heads)."""
        self._held = held
        if not self.dense:
            return
        b, h = layer.keys.shape[:2]
        room = (self.keys.view(b, h, self.width, -1), self.values.view(b, h, self.width, -1))
        self._lent = (room[0][:, :, :held], room[1][:, :, :held])
        layer.entries = replace(layer.entries, keys=self._lent[0], values=self._lent[1])
        layer.borrowed, layer.room = True, room

    def _kept_in_place(self, layer: BudgetedLayer) -> bool:
        """Whether ``layer``'s keys and values are the first entries of the dense buffers (a
        compression wrote what it kept there)."""
        if not self.dense or isinstance(layer.entries, RaggedEntries) or self._lent is None:
            return False
        return all(at_start(t, lent) and t.shape[:2] == lent.shape[:2] for t, lent in zip((layer.keys, layer.values), self._lent))

    def release(self, layer: BudgetedLayer) -> None:
        """Give ``layer`` copies of what it borrowed and drop the buffers (the decoder is done)."""
        release_tensors(layer, self.keys, self.values)
        self._lent = None
        self.keys = self.values = self.keys.new_empty(0, self.keys.shape[-1])

    def write_back(self, layer: BudgetedLayer, n: int, new_pos: Tensor) -> None:
        """Hand ``layer`` its entries with the ``n`` tokens decoded since the last load."""
        if self.dense:
            self.lend(layer, self._held + n)
            append_metadata(layer, n, new_pos)
            return
        lens = self.lens.long()
        offs = torch.arange(int(lens.max()), device=lens.device)
        idx = torch.where(offs[None] < lens[:, None], self.starts[:, None] + offs[None], 0)
        entries = layer.entries
        h = entries.n_heads
        b = lens.numel() // h
        keys = self.keys[idx].view(b, h, -1, self.keys.shape[-1])
        values = self.values[idx].view(b, h, -1, self.values.shape[-1])
        if not isinstance(entries, RaggedEntries):  # a ragged layout holding a layer whose heads came out even
            layer.entries = replace(entries, keys=keys, values=values)
            append_metadata(layer, n, new_pos)
            return
        layer.entries = RaggedEntries(
            padded_to_ragged(keys[0], lens), padded_to_ragged(values[0], lens),
            entries.append_rows(entries.positions, new_pos.expand(h, n)),
            {k: entries.append_rows(s, s.new_zeros(h, n)) for k, s in entries.state.items()},
            lens.clone(), tuple(n_old + n for n_old in entries.sizes))


def shares(t: Tensor | None, buf: Tensor) -> bool:
    """Whether ``t`` lies in ``buf``'s memory (a view of a static buffer)."""
    return t is not None and t.numel() > 0 and buf.numel() > 0 and (
        t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())


def release_tensors(layer: BudgetedLayer, *buffers: Tensor) -> None:
    """Replace ``layer``'s keys / values / body tensors that are views of ``buffers`` by copies."""
    def own(t: Tensor | None) -> Tensor | None:
        return t.clone() if any(shares(t, buf) for buf in buffers) else t

    layer.entries = layer.entries.apply(own)
    layer.borrowed, layer.room = False, None


def append_metadata(layer: BudgetedLayer, n: int, new_pos: Tensor) -> None:
    """Dense ``layer``: the positions and zeroed per-entry state of ``n`` appended tokens."""
    entries = layer.entries
    b, h = entries.positions.shape[:2]
    layer.entries = replace(entries, positions=torch.cat([entries.positions, new_pos.expand(b, h, n)], dim=-1),
                            state={k: torch.cat([s, s.new_zeros(b, h, n)], dim=-1) for k, s in entries.state.items()})


class UnsupportedStatic(Exception):
    """The cache or model cannot be decoded with static buffers (the caller decodes eagerly)."""


def _fill(static: StaticLayer, view: LayerView, sizes: tuple[int, ...], slots: int) -> None:
    """Lay segments out head after head (each with room for ``slots`` more entries) and copy the
    padded ``view``'s first ``sizes[i]`` entries of each (sequence, head) into them (and their
    positions, for a sliding-window layer)."""
    keys, values, positions = view.keys, view.values, view.positions
    n, device = keys.shape[2], static.keys.device
    if all(size == n for size in sizes):
        # Every head holds all n entries (dense; the sizes are known on the host): the copies
        # need no mask, so nothing is read back from the device (a join or a reload fills every
        # layer of a session, and each read would wait for the work queued before it).
        heads = len(sizes)
        width = static.width if static.dense else n + slots
        # Head h's segment starts at h * width: the buffers seen as [heads, width, ...] take the
        # entries in one strided copy each.
        for buf, src in ((static.keys, keys), (static.values, values), (static.kpos, positions)):
            if buf is not None:
                buf[: heads * width].view(heads, width, *buf.shape[1:])[:, :n].copy_(src.reshape(heads, n, *buf.shape[1:]))
        static.starts.copy_(torch.arange(heads, device=device) * width)
        static.lens.fill_(n)
        return
    lens = view.lengths.reshape(-1).to(device, torch.long)
    widths = torch.full_like(lens, static.width) if static.dense else lens + slots
    starts = torch.cumsum(widths, 0) - widths
    offs = torch.arange(n, device=lens.device)
    # The held entries' rows in the padded view, their number known on the host (no read back).
    rows = true_indices((offs[None] < lens[:, None]).flatten(), sum(sizes))
    dest = (starts[:, None] + offs[None]).reshape(-1)[rows]
    static.keys.index_copy_(0, dest, keys.reshape(-1, keys.shape[-1])[rows].to(static.keys.dtype))
    static.values.index_copy_(0, dest, values.reshape(-1, values.shape[-1])[rows].to(static.values.dtype))
    if static.kpos is not None:
        static.kpos.index_copy_(0, dest, positions.reshape(-1)[rows].to(torch.int32))
    static.starts.copy_(starts)
    static.lens.copy_(lens.to(torch.int32))
