"""`BudgetedCache`: a transformers `Cache` whose layers hold each head's kept entries with their
positions, under a budget (`BudgetedLayer`: one per attention layer, sliding-window layers with
their window).

Built from a model (``BudgetedCache(model)``: the attention hook is attached, the dtype is the
model's) it can be handed to the model's own forward and ``generate``; a policy's
`new_cache(model)` makes one set up for its scorer and store. Beside its layers it keeps what a
compression needs of the whole cache: the token ids fed since the last compression (KVzip
repeats them), the peak bytes held, the snapshot of an answer that will be rolled back
(`scratch`), and work a compression left to finish once values it copied to the host arrive
(`defer`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from ..errors import UnsupportedModelError
from .encoded import EncodedEntries
from .hook import attach
from .layer import BudgetedLayer
from .snapshot import LayerSnapshot
from .store import Encoded
from .support import check_supported


def flush_layers(layers: list[BudgetedLayer]) -> None:
    """Encode every store layer's tail entries older than its residual window, in whole chunks
    (KIVI: a group is quantized once it is full), with one encode call for the layers of one shape
    (stacked along the batch) instead of one per layer: per layer, the ~50 small kernels of an
    encode made a 32k KIVI prefill spend a fifth of its time flushing on an H100, bound by the
    host launching them. Encoding is per (sequence, head),
    so stacking changes nothing in the result. Stores that read each layer's queries (ThinK)
    flush layer by layer."""
    groups: dict[tuple, list[BudgetedLayer]] = {}
    # One host sync for every layer's count (one per layer left the GPU idle between them).
    counts = [layer.older_in_tail() for layer in layers]
    pending = [i for i, c in enumerate(counts) if isinstance(c, Tensor)]
    if pending:
        for i, c in zip(pending, torch.stack([counts[i] for i in pending]).tolist()):
            counts[i] = c
    for layer, count in zip(layers, counts):
        if not isinstance(layer.entries, EncodedEntries):
            continue
        older = layer.entries.whole_chunks(count)
        if older <= 0:
            continue
        if layer.store.queries:  # the store reads this layer's queries: alone
            _flush_group([layer], older, layer.observed.queries)
            continue
        key = (id(layer.store), older, tuple(layer.keys.shape), tuple(layer.values.shape), layer.keys.dtype)
        groups.setdefault(key, []).append(layer)
    for (_, older, shape, vshape, dtype), layers_of_shape in groups.items():
        # At most `FLUSH_STACK_BYTES` of keys + values per encode: its float32 temporaries are a
        # few times that, and they add to the prefill's peak memory.
        per_layer = shape[0] * shape[1] * older * (shape[-1] + vshape[-1]) * dtype.itemsize
        step = max(1, FLUSH_STACK_BYTES // per_layer)
        for start in range(0, len(layers_of_shape), step):
            _flush_group(layers_of_shape[start : start + step], older)


# Keys + values encoded in one call by `flush_layers`: 64 MiB is a 2048-token block of 8 layers of
# an 8B model (8 KV heads x 128 channels, K and V, bf16): 4 calls per block instead of 32.
FLUSH_STACK_BYTES = 64 * 2**20


def _flush_group(group: list[BudgetedLayer], older: int, queries: Tensor | None = None) -> None:
    """Encode the ``older`` oldest tail entries of every layer of ``group`` in one call
    (``queries``: a single layer's, for a store that reads them)."""
    b, h = group[0].keys.shape[:2]
    keys = torch.cat([layer.keys[:, :, :older] for layer in group])
    values = torch.cat([layer.values[:, :, :older] for layer in group])
    valid = torch.ones(len(group) * b, h, older, dtype=torch.bool, device=keys.device)
    enc = group[0].store.encode(keys, values, valid, queries)
    for i, layer in enumerate(group):
        part = Encoded({k: t[i * b : (i + 1) * b] for k, t in enc.tokens.items()},
                       {k: c[i * b : (i + 1) * b] for k, c in enc.chunks.items()})
        layer.append_flushed(part, older)


_COPY_STREAMS: dict = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per GPU for host<->device copies of caches (they overlap compute)."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _layer_types(config) -> list[str]:
    """Attention type of each layer, as transformers infers it (the helper's signature changed
    across 5.x, so it is read here from the config the same way)."""
    types = getattr(config, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [kind] * config.num_hidden_layers
    shared = getattr(config, "num_kv_shared_layers", None) or 0
    return list(types[: len(types) - shared])


def _layer_for(layer_type: str, config) -> BudgetedLayer:
    if layer_type == "full_attention":
        return BudgetedLayer()
    if layer_type == "sliding_attention":
        return BudgetedLayer(window=config.sliding_window)
    raise UnsupportedModelError(
        f"{config.model_type}: kvbudget holds full and sliding-window attention layers, this model "
        f"has '{layer_type}' layers"
    )


class BudgetedCache(Cache):
    """A transformers `Cache` for budgeted KV (see the module docstring)."""

    layers: list[BudgetedLayer]

    def __init__(self, model_or_config, dtype: torch.dtype | None = None) -> None:
        config = getattr(model_or_config, "config", model_or_config)
        check_supported(config)
        if isinstance(model_or_config, torch.nn.Module):
            attach(model_or_config)
            dtype = dtype or model_or_config.dtype
        text = config.get_text_config(decoder=True)
        layers = [_layer_for(t, text) for t in _layer_types(text)]
        super().__init__(layers=layers)
        self.config = text
        self.dtype = dtype or torch.float32
        # The resolved budget (tokens per layer, on average) and the layer sensitivities of the
        # session this cache belongs to (a ratio budget depends on its context).
        self.tokens: int | None = None
        # A ratio budget's bytes, for that context (`Policy.target_bytes`): the engine fits the
        # entries kept to it at each compression (`compress.bytefit`). None: the tokens stand.
        self.target_bytes: float | None = None
        self.sensitivity: list[float] | None = None
        self.peak_bytes = 0
        # Key re-rotation (`kv.rerotation`): the model's RoPE frequencies per layer when the policy
        # re-rotates (None: entries keep their positions), and the positions given back so far
        # (tokens fed = next position + ``rolled``).
        self.rotary: list[Tensor] | None = None
        self.rolled = 0
        self.unscored: list[Tensor] = []  # token ids fed since the last compression (KVzip repeats them)
        self._scratch: list = []  # one entry per open `scratch` block: None or a snapshot
        self._snapshot_bytes = 0
        self._pending = None  # (event, device) of a non-blocking `to` in flight
        # Work a compression left to finish once values it copied to the host arrive (`defer`).
        self._unsettled: list = []
        self.defer_settle = False

    # Snapshots of a scratch block (an answer with decode-time compression, rolled back at its
    # end) wait in pinned host memory on a GPU, so an answer does not hold its cache twice on the
    # GPU. The copies are queued behind the work before them and cost one transfer each way.
    host_snapshots: bool = True

    def defer(self, finish) -> None:
        """Run ``finish`` (a store eviction's last step: cutting chunk tables to the widths it
        copied to the host) now, or, while ``defer_settle`` is set, at the next `settle`. Until
        then the layers are complete and correct, with tables wider than needed. `prefill` defers
        during its loop and settles after queueing the next block's forward: reading the widths
        at the end of the compression left the GPU idle while the host queued that forward."""
        self._unsettled.append(finish)
        if not self.defer_settle:
            self.settle()

    @property
    def unsettled(self) -> bool:
        """Whether a compression's last step waits for `settle`."""
        return bool(self._unsettled)

    def settle(self) -> None:
        """Run what compressions deferred (`defer`), oldest first."""
        while self._unsettled:
            self._unsettled.pop(0)()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The position of the next token (tokens fed, less those re-rotation gave back)."""
        return self.layers[0].seen

    @property
    def tokens_fed(self) -> int:
        """Every token fed to this cache (and not rolled back)."""
        return self.get_seq_length() + self.rolled

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].max_entries

    def to(self, device: "torch.device | str", non_blocking: bool = False) -> "BudgetedCache":
        """Move every held tensor to ``device`` (EpiCache keeps idle episode caches on CPU).

        ``non_blocking`` (between CPU and a GPU): the copies run on a side stream, into pinned
        host memory when offloading, and return at once, so they overlap whatever the GPU and
        the host do next. Call `wait` before the cache is used again (the episodic session and
        the session file do)."""
        device = torch.device(device)
        layers = [layer for layer in self.layers if layer.is_initialized and layer.device != device]
        if not layers:
            return self
        gpu = device if device.type == "cuda" else layers[0].device
        if not non_blocking or gpu.type != "cuda":
            self.wait()
            for layer in layers:
                layer.moved(lambda t: t.to(device))
            return self
        self.wait()
        stream = _copy_stream(gpu)
        stream.wait_stream(torch.cuda.current_stream(gpu))  # the data must be final before copying

        def move(t: Tensor) -> Tensor:
            if t.device == device:
                return t
            if device.type == "cpu":
                dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            else:
                dst = torch.empty(t.shape, dtype=t.dtype, device=device)
            with torch.cuda.stream(stream):
                dst.copy_(t, non_blocking=True)
            for x in (t, dst):  # keep the allocator from reusing either before the copy ends
                if x.is_cuda:
                    x.record_stream(stream)
            return dst

        for layer in layers:
            layer.moved(move)
        self._pending = (torch.cuda.Event(), device)
        self._pending[0].record(stream)
        return self

    def wait(self) -> None:
        """Wait for a non-blocking `to`: the GPU's current stream waits for copies to the GPU
        (no host stall), the host waits for copies to the CPU."""
        pending = self._pending
        if pending is None:
            return
        event, device = pending
        if device.type == "cuda":
            torch.cuda.current_stream(device).wait_event(event)
        else:
            event.synchronize()
        self._pending = None

    def layer_bytes(self) -> list[int]:
        """Exact bytes held per layer."""
        return [layer.nbytes() for layer in self.layers]

    def nbytes(self) -> int:
        """Exact bytes held by the whole cache."""
        self.settle()
        return sum(self.layer_bytes())

    def peak_entries(self) -> int:
        """Most entries any layer's fullest head has held."""
        return max((layer.peak_entries for layer in self.layers), default=0)

    def head_entries(self) -> list[Tensor]:
        """Entries held per KV head, one [H] tensor per layer."""
        return [layer.lengths() for layer in self.layers]

    def before_compress(self, appends_only: bool = False) -> None:
        """Called by a policy before it evicts or encodes. Inside `scratch` (decode-time
        compression of an answer that will be rolled back), the layers are first snapshotted,
        because evicted or encoded entries cannot be dropped-last back; the snapshot's bytes
        count toward the peak. ``appends_only``: the compressions of this block only append to
        store bodies (flushes, no eviction), so the snapshot keeps each body's length instead of
        the body (`BodyPrefix`), and only the rest counts."""
        if self._scratch and self._scratch[-1] is None:
            host = self._snapshot_on_host()
            layers = [(layer, LayerSnapshot.of(layer, appends_only, host and layer.is_initialized)) for layer in self.layers]
            self._scratch[-1] = (self.get_seq_length(), self.rolled, layers)
            body_bytes = (lambda e: e.body.nbytes() if appends_only and getattr(e, "body", None) is not None else 0)
            self._snapshot_bytes += sum(layer.nbytes() - body_bytes(layer.entries) for layer in self.layers)

    def _snapshot_on_host(self) -> bool:
        """Whether `before_compress` copies the snapshot to host memory (`host_snapshots`, on a GPU)."""
        return self.host_snapshots and any(layer.is_initialized and layer.device.type == "cuda"
                                           for layer in self.layers)

    def track_peak(self, extra: int = 0) -> int:
        """Record the bytes held now in ``peak_bytes`` (call after each forward, before eviction);
        ``extra``: bytes held for the cache beyond its layers' entries (tokens decoded in a static
        decoder's buffers and never written back). Returns the layers' bytes."""
        held = self.nbytes()
        self.peak_bytes = max(self.peak_bytes, held + extra + self._snapshot_bytes)
        return held

    @property
    def snapshotted(self) -> bool:
        """Whether the innermost `scratch` block took a snapshot (its end puts it back, whatever
        the layers hold then)."""
        return bool(self._scratch) and self._scratch[-1] is not None

    @contextmanager
    def transient(self) -> Iterator[None]:
        """Inside `scratch`: budgeted layers attend to new tokens without storing them."""
        for layer in self.layers:
            layer.transient = True
        try:
            yield
        finally:
            for layer in self.layers:
                layer.transient = False

    @contextmanager
    def scratch(self, keep_queries: bool = False) -> Iterator[None]:
        """Tokens fed inside the block are forgotten at its end (teacher-forced scoring, decoding
        that is replaced, scoring queries). ``keep_queries`` keeps the queries observed inside."""
        seen = self.get_seq_length()
        saved = [layer.observed.saved() for layer in self.layers]
        self._scratch.append(None)
        try:
            yield
        finally:
            snapshot = self._scratch.pop()
            end = self.get_seq_length()
            if snapshot is not None:
                # Back to the state before the first eviction inside the block, then drop the
                # tokens fed between the start of the block and that eviction.
                end, self.rolled, layers = snapshot
                for layer, snap in layers:
                    snap.restore(layer)
                self._snapshot_bytes = 0
            n = end - seen
            for layer, observed in zip(self.layers, saved):
                layer.drop_last(n)
                if not keep_queries:  # back to the same entries as then: their LSE holds again
                    layer.observed = observed
