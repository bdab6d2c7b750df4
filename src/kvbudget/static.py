"""Static-capacity decoding: the budgeted cache in preallocated buffers, one CUDA graph per step.

A budgeted cache has a capacity known in advance (what the policy keeps + the tokens decoded
before the next compression), so decoding can run on buffers allocated once. Nothing in a
decode step then depends on host-side values: the new token's KV is written at
``starts + lens`` (device tensors), the attention reads ``lens`` entries per head, and the
position and query slot advance on the device. That makes the whole step capturable as one
CUDA graph, which removes the ~70 ms/token launch overhead that plain transformers pays for an
8B model (docs/benchmarks.md, "GPU decode").

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
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from . import fusion
from .attention import Extras, set_plan
from .cache import BudgetedCache, BudgetedLayer, padded_to_ragged
from .modelcall import run
from .store import Body, at_start

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
    from . import kernels  # imports triton: only once a static step runs, not with kvbudget

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
    """Keep a decoded token's query in the layer's query buffer (scorers read them at write-back)."""
    if layer.qbuf is not None:
        layer.qbuf.index_copy_(2, layer.qslot, query)


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
        lens = view.lengths.reshape(-1)  # [B*H]
        size = int(lens.sum()) + lens.numel() * capacity
        # Zeroed, not empty: padded SDPA multiplies the unused slots by a mask, and stale
        # memory there can hold NaN/inf bit patterns (NaN * 0 is NaN).
        keys = view.keys.new_zeros(size, view.keys.shape[-1])
        values = view.values.new_zeros(size, view.values.shape[-1])
        # Dense layers: every head holds the same count, so the longest segment is bounded
        # by it; ragged ones may be laid out again differently, bounded only by the total.
        bound = int(lens.max()) + capacity if layer.head_lens is None else size
        static = cls(keys, values, torch.zeros_like(lens), lens.to(torch.int32), bound, dense=layer.head_lens is None,
                     window=layer.window)
        _fill(static, view.keys, view.values, lens, capacity, view.positions)
        static.lend(layer, int(lens.max()))
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
                b, h = layer.positions.shape[:2]
                self.kpos.view(b, h, self.width)[:, :, :held].copy_(layer.positions)
            self.lend(layer, held)
            return
        view = layer.view()
        lens = view.lengths.reshape(-1)
        if (self.dense and layer.head_lens is not None) or int(lens.max()) + room > self.width or (
            int(lens.sum()) + lens.numel() * room > self.keys.shape[0]
        ):
            raise UnsupportedStatic("the compressed cache no longer fits the static buffers")
        keys, values = (t.clone() if shares(t, self.keys) or shares(t, self.values) else t for t in (view.keys, view.values))
        _fill(self, keys, values, lens, room, view.positions)
        self.lend(layer, int(lens.max()))

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
        layer.keys, layer.values = self._lent
        layer.borrowed, layer.room = True, room

    def _kept_in_place(self, layer: BudgetedLayer) -> bool:
        """Whether ``layer``'s keys and values are the first entries of the dense buffers (a
        compression wrote what it kept there)."""
        if not self.dense or layer.head_lens is not None or self._lent is None:
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
        b, h = layer.positions.shape[:2] if layer.head_lens is None else (1, layer.head_lens.shape[0])
        keys = self.keys[idx].view(b, h, -1, self.keys.shape[-1])
        values = self.values[idx].view(b, h, -1, self.values.shape[-1])
        if layer.head_lens is None:  # a ragged layout holding a layer whose heads came out even
            layer.keys, layer.values = keys, values
            append_metadata(layer, n, new_pos)
            return
        layer.keys = padded_to_ragged(keys[0], lens)
        layer.values = padded_to_ragged(values[0], lens)
        layer.positions = layer._append_ragged(layer.positions, new_pos.expand(h, n))
        layer.state = {k: layer._append_ragged(s, s.new_zeros(h, n)) for k, s in layer.state.items()}
        layer.head_lens = lens.clone()


def shares(t: Tensor | None, buf: Tensor) -> bool:
    """Whether ``t`` lies in ``buf``'s memory (a view of a static buffer)."""
    return t is not None and t.numel() > 0 and buf.numel() > 0 and (
        t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())


def release_tensors(layer: BudgetedLayer, *buffers: Tensor) -> None:
    """Replace ``layer``'s keys / values / body tensors that are views of ``buffers`` by copies."""
    def own(t: Tensor | None) -> Tensor | None:
        return t.clone() if any(shares(t, buf) for buf in buffers) else t

    layer.keys, layer.values = own(layer.keys), own(layer.values)
    if layer.body is not None:
        body = layer.body
        layer.body = Body({k: own(t) for k, t in body.tokens.items()}, own(body.chunk_id),
                          {k: own(c) for k, c in body.chunks.items()})
    layer.borrowed, layer.room = False, None


def append_metadata(layer: BudgetedLayer, n: int, new_pos: Tensor) -> None:
    """Dense ``layer``: the positions and zeroed per-entry state of ``n`` appended tokens."""
    b, h = layer.positions.shape[:2]
    layer.positions = torch.cat([layer.positions, new_pos.expand(b, h, n)], dim=-1)
    layer.state = {k: torch.cat([s, s.new_zeros(b, h, n)], dim=-1) for k, s in layer.state.items()}


class UnsupportedStatic(Exception):
    """The cache or model cannot be decoded with static buffers (the caller decodes eagerly)."""


def supports(cache: BudgetedCache) -> str | None:
    """None if ``cache`` can be decoded statically, else the reason it cannot."""
    from . import static_store  # it builds on this module

    for layer in cache.budgeted_layers():
        if not layer.is_initialized:
            return "the cache is empty"
        if layer.store is not None and (reason := static_store.unsupported(layer)):
            return reason
        if layer.phantom or layer.transient:
            return "a scoring pass is in progress"
    return None


class StaticDecoder:
    """Greedy-decoding engine over static buffers; on CUDA each step is one CUDA-graph replay.

    Typical use (`Session` does this when ``decode`` is "graph", or "auto" on CUDA)::

        dec = StaticDecoder.from_cache(model, cache, capacity=max_new_tokens)
        logits = dec.step(token_ids)          # [B] -> [B, vocab]
        ...
        dec.write_back(cache)                 # the decoded entries join the cache
        policy.compress(cache); dec.reload(cache)

    ``capacity``: tokens decoded in all before the decoder is dropped; every head's segment has
    room for them, so compressions in between never need new buffers (a compression never grows
    a head beyond what it held plus the tokens decoded since).
    """

    def __init__(self, model, layers: list[StaticLayer], positions: Tensor, capacity: int,
                 graph: bool | None = None, query_slots: int = 0) -> None:
        if ATTENTION not in ATTENTION_CHOICES:
            raise ValueError(f"KVBUDGET_DECODE_ATTENTION must be one of {', '.join(ATTENTION_CHOICES)}, got '{ATTENTION}'")
        self.model = model
        self.layers = layers
        self.cache = Cache(layers=layers)
        device = layers[0].keys.device
        self.batch = positions.shape[0]
        self.capacity = capacity
        self.decoded = 0  # tokens decoded since construction
        self.steps = 0  # tokens decoded since the last (re)load
        self.query_slots = query_slots
        self.ids = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.pos = positions.to(device, torch.long).view(self.batch, 1).clone()
        self._seen = int(positions[0])
        # A prepared 4-D mask makes transformers skip building one (the kernel masks by length).
        self.mask = torch.ones(self.batch, 1, 1, 1, dtype=torch.bool, device=device)
        self.qslot = torch.zeros(1, dtype=torch.long, device=device)
        if query_slots:
            cfg = model.config.get_text_config(decoder=True)
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            for layer in layers:
                layer.qbuf = torch.zeros(self.batch, cfg.num_attention_heads, query_slots, head_dim,
                                         dtype=layer.keys.dtype, device=device)
        for layer in layers:
            layer.qslot = self.qslot
            layer.qpos = self.pos
        self.logits: Tensor | None = None
        self.use_graph = device.type == "cuda" if graph is None else graph
        # One kernel per norm, RoPE, SiLU*mul and append instead of ~37 per layer (kvbudget.fusion).
        self.fused = fusion.maybe_fuse(model, device)
        self.graph: "torch.cuda.CUDAGraph | None" = None
        self.released = False

    # --- building --------------------------------------------------------------------------
    @classmethod
    def from_cache(cls, model, cache: BudgetedCache, capacity: int, graph: bool | None = None,
                   query_slots: int = 0) -> "StaticDecoder":
        """Copy ``cache``'s entries into static buffers with room for ``capacity`` decoded tokens
        per head; ``query_slots``: queries kept per layer between write-backs (for scorers)."""
        from . import static_store  # it builds on this module

        reason = supports(cache)
        if reason:
            raise UnsupportedStatic(reason)
        layers = [
            (static_store.StaticStoreLayer if layer.store is not None else StaticLayer).build(layer, capacity)
            for layer in cache.budgeted_layers()
        ]
        first = cache.budgeted_layers()[0]
        batch = first.positions.shape[0] if first.head_lens is None else 1  # ragged layers: batch 1
        positions = torch.full((batch,), cache.get_seq_length(), dtype=torch.long)
        return cls(model, layers, positions, capacity, graph, query_slots)

    def reload(self, cache: BudgetedCache) -> None:
        """After a compression of ``cache``: copy what it keeps into the same buffers (the graph,
        which reads buffers, starts and lengths from device memory, stays valid)."""
        room = self.capacity - self.decoded
        for static, layer in zip(self.layers, cache.budgeted_layers()):
            static.load(layer, room)
        self._seen = cache.get_seq_length()
        self.pos.fill_(self._seen)
        self.qslot.zero_()
        self.steps = 0

    # --- decoding --------------------------------------------------------------------------
    def _forward(self) -> None:
        out = run(self.model, self.cache, self.ids, position_ids=self.pos, attention_mask=self.mask, logits_to_keep=1)
        if self.logits is None:
            self.logits = torch.empty_like(out.logits[:, -1])
        self.logits.copy_(out.logits[:, -1])
        self.pos.add_(1)
        self.qslot.add_(1)

    def _capture(self) -> None:
        """Warm up (kernel compilation, library handles) on a side stream, undo the warm-up's
        writes, then capture one step."""
        counters = [[c.clone() for c in layer.counters] for layer in self.layers]
        pos, qslot = self.pos.clone(), self.qslot.clone()
        stream = _warmup_stream(self.ids.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
                for layer, saved in zip(self.layers, counters):
                    for c, value in zip(layer.counters, saved):
                        c.copy_(value)
                self.pos.copy_(pos)
                self.qslot.copy_(qslot)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._forward()

    @torch.inference_mode()
    def step(self, token_ids: Tensor) -> Tensor:
        """Feed one token per sequence (``[B]``); returns the next-token logits ``[B, vocab]``
        (a buffer overwritten by the next step)."""
        if self.released:
            raise RuntimeError("this decoder was released: build a new one")
        if self.decoded >= self.capacity:
            raise RuntimeError(f"static buffers are full ({self.capacity} decoded tokens)")
        if self.query_slots and self.steps >= self.query_slots:
            raise RuntimeError(f"{self.query_slots} queries kept per layer: write_back and reload first")
        self.ids.copy_(token_ids.reshape(self.batch, 1))
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self._forward()
        self.steps += 1
        self.decoded += 1
        return self.logits

    def write_back(self, cache: BudgetedCache) -> None:
        """Append the tokens decoded since the last (re)load to ``cache``'s layers: their KV,
        positions, zeroed per-entry state and observed queries, exactly as eager decoding would."""
        n = self.steps
        if n == 0:
            return
        new_pos = torch.arange(self._seen, self._seen + n, dtype=torch.int32)
        for static, layer in zip(self.layers, cache.budgeted_layers()):
            static.write_back(layer, n, new_pos.to(layer.positions.device))
            layer.seen += n
            layer.peak_entries = max(layer.peak_entries, layer.max_entries)
            if static.qbuf is not None:  # copied: the buffer is overwritten after the next reload
                layer.observe(static.qbuf[:, :, :n].clone(), layer.scaling)
        cache.track_peak()
        self._seen += n
        self.steps = 0
        self.qslot.zero_()

    def release(self, cache: BudgetedCache) -> None:
        """End of the answer (after the last `write_back`): the cache's layers get copies of what
        they borrowed, layer by layer, each layer's buffers dropped as soon as it is done, so the
        peak stays at one layer's worth above the cache. The decoder cannot step afterwards."""
        for static, layer in zip(self.layers, cache.budgeted_layers()):
            static.release(layer)
        self.graph = None
        self.released = True


_WARMUP_STREAMS: dict = {}


def _warmup_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for the warm-up before a capture, reused by every decoder: cuBLAS
    keeps a workspace (32 MiB on Hopper) per stream it has run on, never freed, so a fresh stream
    per answer leaked that much GPU memory per answer (seen on the H100 as 35 MB per decoder)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[key] = torch.cuda.Stream(device=device)
    return _WARMUP_STREAMS[key]


def _fill(static: StaticLayer, keys: Tensor, values: Tensor, lens: Tensor, slots: int, positions: Tensor) -> None:
    """Lay segments out head after head (each with room for ``slots`` more entries) and copy the
    padded ``keys``/``values`` ``[B, H, n, d]``' first ``lens`` entries of each head into them
    (and their ``positions`` [B, H, n], for a sliding-window layer)."""
    lens = lens.to(static.keys.device, torch.long)
    sizes = torch.full_like(lens, static.width) if static.dense else lens + slots
    starts = torch.cumsum(sizes, 0) - sizes
    n = keys.shape[2]
    offs = torch.arange(n, device=lens.device)
    valid = offs[None] < lens[:, None]
    dest = (starts[:, None] + offs[None])[valid]
    static.keys.index_copy_(0, dest, keys.reshape(-1, n, keys.shape[-1])[valid].to(static.keys.dtype))
    static.values.index_copy_(0, dest, values.reshape(-1, n, values.shape[-1])[valid].to(static.values.dtype))
    if static.kpos is not None:
        static.kpos.index_copy_(0, dest, positions.reshape(-1, n)[valid].to(torch.int32))
    static.starts.copy_(starts)
    static.lens.copy_(lens.to(torch.int32))
