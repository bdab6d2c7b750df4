"""`StaticDecoder`: greedy decoding over static buffers, one CUDA graph per step.

A budgeted cache has a capacity known in advance (what the policy keeps + the tokens decoded
before the next compression), so decoding runs on buffers allocated once (`runtime.static` for
dense and ragged layers, `runtime.static_store` for KIVI layers) and every step is the same
sequence of kernels reading device-side lengths and positions: one CUDA graph replay per token.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..kv.cache import BudgetedCache
from ..kv.ragged import RaggedEntries
from . import fusion
from .modelcall import run
from . import static
from .static import ATTENTION_CHOICES, StaticLayer, UnsupportedStatic
from .static_store import StaticStoreLayer, unsupported


def supports(cache: BudgetedCache) -> str | None:
    """None if ``cache`` can be decoded statically, else the reason it cannot."""
    for layer in cache.layers:
        if not layer.is_initialized:
            return "the cache is empty"
        if layer.store is not None and (reason := unsupported(layer)):
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
        compress(cache, policy); dec.reload(cache)

    ``capacity``: tokens decoded in all before the decoder is dropped; every head's segment has
    room for them, so compressions in between never need new buffers (a compression never grows
    a head beyond what it held plus the tokens decoded since).
    """

    def __init__(self, model, layers: list[StaticLayer], positions: Tensor, capacity: int,
                 graph: bool | None = None, query_slots: int = 0) -> None:
        if static.ATTENTION not in ATTENTION_CHOICES:
            raise ValueError(f"KVBUDGET_DECODE_ATTENTION must be one of {', '.join(ATTENTION_CHOICES)}, "
                             f"got '{static.ATTENTION}'")
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
        reason = supports(cache)
        if reason:
            raise UnsupportedStatic(reason)
        layers = [
            (StaticStoreLayer if layer.store is not None else StaticLayer).build(layer, capacity)
            for layer in cache.layers
        ]
        first = cache.layers[0].entries
        batch = 1 if isinstance(first, RaggedEntries) else first.positions.shape[0]
        positions = torch.full((batch,), cache.get_seq_length(), dtype=torch.long)
        return cls(model, layers, positions, capacity, graph, query_slots)

    def reload(self, cache: BudgetedCache) -> None:
        """After a compression of ``cache``: copy what it keeps into the same buffers (the graph,
        which reads buffers, starts and lengths from device memory, stays valid)."""
        room = self.capacity - self.decoded
        for static, layer in zip(self.layers, cache.layers):
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
        stream = warmup_stream(self.ids.device)
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
        # thread_local: the server's other threads (session saves copying from the GPU) may use
        # CUDA while this thread captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
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
        queries = [static.qbuf[:, :, :n] for static in self.layers] if self.query_slots else None
        write_back_layers(self.layers, cache, n, self._seen, queries)
        self._seen += n
        self.steps = 0
        self.qslot.zero_()

    def release(self, cache: BudgetedCache) -> None:
        """End of the answer (after the last `write_back`): the cache's layers get copies of what
        they borrowed, layer by layer, each layer's buffers dropped as soon as it is done, so the
        peak stays at one layer's worth above the cache. The decoder cannot step afterwards."""
        for static, layer in zip(self.layers, cache.layers):
            static.release(layer)
        self.graph = None
        self.released = True


def write_back_layers(statics: list, cache: BudgetedCache, n: int, seen: int, queries: list[Tensor] | None) -> None:
    """Append the ``n`` tokens decoded from position ``seen`` on, held in the static layers
    ``statics``, to ``cache``'s layers, with ``queries`` (per layer, [1, Hq, n, d]: the decoded
    tokens' queries, for the scorer) when given."""
    if n == 0:
        return
    new_pos: dict = {}  # per device, made there (a copy from the host would wait for the queued work)
    for i, (static, layer) in enumerate(zip(statics, cache.layers)):
        if layer.device not in new_pos:
            new_pos[layer.device] = torch.arange(seen, seen + n, dtype=torch.int32, device=layer.device)
        static.write_back(layer, n, new_pos[layer.device])
        layer.seen += n
        layer.peak_entries = max(layer.peak_entries, layer.max_entries)
        if queries is not None:  # copied: the buffer is overwritten after the next reload
            layer.observe(queries[i].clone(), layer.observed.scaling)
    cache.track_peak()


_WARMUP_STREAMS: dict = {}


def warmup_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per device for the warm-up before a capture, reused by every decoder: cuBLAS
    keeps a workspace (32 MiB on Hopper) per stream it has run on, never freed, so a fresh stream
    per answer leaked that much GPU memory per answer (seen on the H100 as 35 MB per decoder)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[key] = torch.cuda.Stream(device=device)
    return _WARMUP_STREAMS[key]
