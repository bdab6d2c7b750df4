"""BudgetedCache: a transformers `Cache` whose layers hold per-head, variable-length KV with positions.

Storage of one `BudgetedLayer` comes in two layouts, chosen by what was last kept:

* dense: ``keys``/``values`` ``[B, H, n, d]`` and ``positions`` ``[B, H, n]`` (every head holds n
  entries; heads may hold *different* tokens);
* ragged (batch 1): ``keys``/``values`` ``[N, d]`` with ``N = sum(head_lens)``, head after head,
  ``positions`` ``[N]`` and ``head_lens`` ``[H]`` — heads hold different numbers of entries and
  only those are allocated: no padding, no masked-out entries kept in memory.

Every entry keeps its original position (RoPE is already applied to cached keys, nothing is
re-rotated). ``seen`` counts all tokens ever fed, so `get_seq_length` gives the next position and
the model's own forward/generate place new tokens correctly after eviction. What the attention
call needs to mask padding and causality is handed over through `attention.set_plan`.

Per-entry float state that a scorer keeps between compressions (H2O's accumulated attention)
lives in ``state`` in the same layout and is gathered with the entries.

Sliding-window layers (Mistral, Gemma 2/3, GPT-OSS, Cohere 2, OLMo 3...) are budgeted layers
too, with a ``window``: their attention is masked by position (a query at p sees p - window <
pos <= p), their entries beyond every later window are dropped at each compression, and the
policy gives them at most ``window - 1`` entries per head, so the budget binds every layer.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import NO_POSITION, AttentionPlan, Extras, attach, set_plan
from .errors import UnsupportedModelError
from .support import check_supported
from .store import Body, Encoded, Store, append_encoded, prepend_body, rebuild_body
from .transfer import host_copy

POSITION_DTYPE = torch.int32

# On CUDA, decode steps over a store's encoded body attend through the fused dequantise-and-attend
# kernel (kvbudget.kernels.kivi_decode_attention) instead of decoding the whole body first (checked
# and timed on an H100: docs/benchmarks.md, "GPU performance", table 5). KVBUDGET_FUSED_KIVI:
# "auto" (default) on CUDA only, since on CPU the kernel's torch path decodes the body anyway;
# "1" everywhere (tests run that torch path on CPU); "0" never.
FUSED_KIVI = os.environ.get("KVBUDGET_FUSED_KIVI", "auto").strip().lower()
if FUSED_KIVI not in ("auto", "1", "0"):
    raise ValueError(f"KVBUDGET_FUSED_KIVI must be auto, 1 or 0, got '{FUSED_KIVI}'")


@dataclass
class BodyPlan:
    """A one-token step over an encoded body: attention runs on the body as stored (packed codes,
    scales) plus the full-precision tail, never decoding the body into memory."""

    keys: Tensor  # the tail keys update() returned (identity check in the attention hook)
    layer: "BudgetedLayer"

    def attend(self, query: Tensor, scaling: float, extras: Extras) -> Tensor:
        """``query [B, Hq, 1, d]`` -> ``[B, 1, Hq, dv]``."""
        from .kernels import kivi_decode_attention

        layer = self.layer
        layer.observe(query, scaling)
        out = kivi_decode_attention(query[:, :, 0], layer.body, layer.store, layer.keys, layer.values, scaling,
                                    softcap=extras.softcap, sinks=extras.sinks)
        return out[:, None]


def _valid_mask(lens: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lens.device)[None, :] < lens[:, None]


# Ragged <-> padded moves are gathers with computed indices, never boolean-mask indexing: a
# boolean mask's result size is read back from the device (``nonzero``: a host<->device sync on a
# GPU, six of them per Ada-KV layer and compression before). The sizes they need (the widest head,
# the total) are known on the host: `BudgetedLayer.host_lens` keeps the per-head lengths there.


def true_indices(mask: Tensor, count: int) -> Tensor:
    """Indices of the True entries of a 1-D bool ``mask``, ascending, given how many there are
    (``mask.nonzero()[:, 0]`` without reading its size back from the device). ``count`` must be
    exact: nothing checks it (that would be the read this avoids)."""
    rank = mask.cumsum(0)  # 1-based rank of each True entry
    # Every False entry writes to slot 0, a scratch slot dropped after.
    slot = torch.where(mask, rank, 0)
    out = torch.empty(count + 1, dtype=torch.long, device=mask.device)
    out.scatter_(0, slot, torch.arange(mask.numel(), device=mask.device))
    return out[1:]


def _padded_index(lens: Tensor, width: int, total: int) -> tuple[Tensor, Tensor]:
    """For a [H, width] padded layout of ragged entries (``lens`` per head, ``total`` in all):
    each slot's row in the ragged storage, and which slots hold an entry (a padding slot's row is
    some stored row: mask what is gathered there)."""
    offs = torch.arange(width, device=lens.device)
    rows = ((lens.cumsum(0) - lens)[:, None] + offs).clamp_(max=max(total - 1, 0))
    return rows, offs < lens[:, None]


def _block_index(lens: Tensor, n_old: int, q: int, total: int) -> tuple[Tensor, Tensor]:
    """A block of ``q`` new tokens over ragged entries (``lens`` per head, ``total`` in all, the
    widest ``n_old``), laid out [old entries | padding | new tokens], [H, n_old + q]: the rows of
    its old slots in the storage ([H, n_old], as `_padded_index`) and which slots hold an entry."""
    offs = torch.arange(n_old + q, device=lens.device)
    rows = ((lens.cumsum(0) - lens)[:, None] + offs[:n_old]).clamp_(max=max(total - 1, 0))
    return rows, (offs < lens[:, None]) | (offs >= n_old)


def _take_padded(flat: Tensor, rows: Tensor, valid: Tensor, fill: float = 0) -> Tensor:
    """``flat``'s rows at ``rows`` ([H, W]), ``fill`` where not ``valid``: [H, W, ...]."""
    out = flat.index_select(0, rows.flatten()).view(*rows.shape, *flat.shape[1:])
    return torch.where(valid.view(*valid.shape, *[1] * (flat.dim() - 1)), out, fill)


def _grown(flat: Tensor, new: Tensor, rows: Tensor, kept: Tensor) -> Tensor:
    """Ragged storage ``flat`` with ``new[h]`` ([H, q, ...]) after head h's entries: gathered
    through a block's padded layout (`_block_index`'s ``rows``; ``kept``: its slots that hold an
    entry, in order). Padding is gathered but never kept, so it is not masked."""
    h, n_old = rows.shape
    old = flat.index_select(0, rows.flatten()).view(h, n_old, *flat.shape[1:])
    return torch.cat([old, new], dim=1).flatten(0, 1).index_select(0, kept)


def ragged_to_padded(flat: Tensor, lens: Tensor, fill: float = 0, width: int | None = None) -> Tensor:
    """[N, ...] head-after-head -> [H, max(lens), ...] (padding = ``fill``). ``width``: max(lens)
    when the caller knows it (otherwise it is read from the device)."""
    if width is None:
        width = int(lens.max()) if lens.numel() else 0
    if flat.shape[0] == 0:
        return flat.new_full((lens.shape[0], width, *flat.shape[1:]), fill)
    rows, valid = _padded_index(lens, width, flat.shape[0])
    return _take_padded(flat, rows, valid, fill)


def padded_to_ragged(padded: Tensor, lens: Tensor, total: int | None = None) -> Tensor:
    """[H, W, ...] -> [N, ...] keeping the first ``lens[h]`` entries of each head. ``total``:
    sum(lens) when the caller knows it (otherwise it is read from the device)."""
    if total is None:
        total = int(lens.sum())
    rows = true_indices(_valid_mask(lens, padded.shape[1]).flatten(), total)
    return padded.flatten(0, 1).index_select(0, rows)


def _take_rows(view: "LayerView", rows: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The slots ``rows`` ([N]) of a batch-1 padded view flattened over its heads: keys, values,
    positions and state, one gather per field."""

    def take(t: Tensor) -> Tensor:
        return t[0].flatten(0, 1).index_select(0, rows)

    return take(view.keys), take(view.values), take(view.positions), {k: take(s) for k, s in view.state.items()}


def gather_entries(t: Tensor, index: Tensor) -> Tensor:
    """The entries at ``index`` ([B, H, k]) of ``t`` ([B, H, n] or [B, H, n, d])."""
    idx = index if t.dim() == 3 else index[..., None].expand(*index.shape, t.shape[-1])
    return t.gather(2, idx)


@dataclass
class LayerView:
    """A layer's entries as padded tensors (no copy in the dense layout)."""

    keys: Tensor  # [B, H, n, d]
    values: Tensor  # [B, H, n, dv]
    positions: Tensor  # [B, H, n]
    state: dict[str, Tensor]  # name -> [B, H, n]
    valid: Tensor | None  # [B, H, n] bool, None = all valid
    # Entries per head (batch 0) on the host when the layer knows them (ragged layout): lets
    # selection size its tensors without reading `lengths` back from the device.
    sizes: tuple[int, ...] | None = None

    @property
    def lengths(self) -> Tensor:
        """Entries held per head, [B, H]."""
        if self.valid is None:
            b, h, n = self.positions.shape
            return torch.full((b, h), n, dtype=torch.long, device=self.positions.device)
        return self.valid.sum(-1)


class BudgetedLayer(CacheLayerMixin):
    """One attention layer's KV under a budget: variable per-head lengths, positions, exact bytes."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, window: int | None = None) -> None:
        super().__init__()
        # A sliding-window layer's window (a query at p sees the keys at p - window < pos <= p).
        self.window = window
        self.positions: Tensor | None = None
        self.head_lens = None  # ragged layout when set (a property: also kept on the host)
        self.state: dict[str, Tensor] = {}
        self.seen = 0
        self.peak_entries = 0
        # Observation queries: how many of the latest queries the scorer wants (0: none, -1: all
        # since the last compression), the buffer, and the attention scaling of this layer.
        self.query_keep = 0
        self.queries: Tensor | None = None
        self.query_positions: Tensor | None = None
        self.scaling: float | None = None
        # Each kept query's log-sum-exp over the keys it attended to ([B, Hq, m] float32, natural
        # log, aligned with ``queries``), from the attention call itself: the scoring reuses it
        # instead of recomputing it. Only valid while those keys are exactly the layer's entries
        # (keys are only appended, visibility is causal by position): anything that removes or
        # re-encodes entries drops it (`_drop_lse`), and so does any observed chunk without one,
        # until `clear_queries` starts a new interval, or (a window of the latest queries, kept
        # across compressions) until the rows observed since with one fill the window again.
        self.lse: Tensor | None = None
        # The LSE of the latest observed rows that came with one while ``lse`` is None: fewer
        # rows than ``queries`` ([B, Hq, r]); it becomes ``lse`` when it covers them all.
        self.lse_tail: Tensor | None = None
        # With a store, older entries live encoded in ``body`` and ``keys``/``values`` hold only
        # the full-precision tail (the most recent ``residual`` entries and new tokens).
        self.store: Store | None = None
        self.residual = 0
        self.body: Body | None = None
        # Set while a static decoder (`kvbudget.static`) has lent this layer views of its buffers
        # as keys / values / body: whatever keeps them past the next reload must copy them.
        self.borrowed = False
        # While borrowed from a static decoder: its capacity buffers, so that a compression writes
        # in place instead of building a second copy until the reload. A store layer's: a `Body`
        # that ``body`` is the start of (a flush appends there: `store.append_encoded`); a dense
        # layer's: keys and values [B, H, width, d] (eviction keeps its entries there: `hold`).
        self.room: Body | tuple[Tensor, Tensor] | None = None
        # Transient mode (`BudgetedCache.transient`): tokens are attended but not stored;
        # ``phantom`` counts them so that `drop_last` forgets them first.
        self.transient = False
        self.phantom = 0

    @property
    def head_lens(self) -> Tensor | None:
        """Entries per head, [H] int64 on the layer's device, in the ragged layout; None when
        dense. Assign a new tensor to change it, never modify it in place: `host_lens` mirrors it."""
        return self._head_lens

    @head_lens.setter
    def head_lens(self, lens: Tensor | None) -> None:
        self._head_lens, self._host_lens = lens, None

    def _set_head_lens(self, lens: Tensor, sizes: tuple[int, ...]) -> None:
        """`head_lens` together with its host copy, known by the caller (nothing read back)."""
        self._head_lens, self._host_lens = lens, tuple(sizes)

    def host_lens(self) -> tuple[int, ...]:
        """`head_lens` as Python ints. The layer's own code keeps it up to date as it appends and
        keeps entries, so sizing tensors from it costs no host<->device sync; set from outside
        (a session file, static decoding), it is read from the device once."""
        if self._host_lens is None:
            self._host_lens = tuple(self._head_lens.tolist())
        return self._host_lens

    # --- transformers' layer protocol -------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.positions = torch.empty(b, h, 0, dtype=POSITION_DTYPE, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens to every head; return keys/values padded for this attention call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        new_pos = torch.arange(self.seen, self.seen + q, dtype=POSITION_DTYPE, device=self.device)
        self.seen += q
        if self.transient:
            return self._attend_without_storing(key_states, value_states)
        plan = visible = None
        start = self.seen - q
        if self.head_lens is None:
            n_old = self.max_entries
            old_positions = self.positions
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.positions = torch.cat([self.positions, new_pos.expand(b, h, q)], dim=-1)
            for name, s in self.state.items():
                self.state[name] = torch.cat([s, s.new_zeros(b, h, q)], dim=-1)
            if (q == 1 and self.body is not None and self.window is None
                    and (FUSED_KIVI == "1" or (FUSED_KIVI == "auto" and key_states.is_cuda))):
                plan = BodyPlan(self.keys, self)  # attends to the body as stored: nothing decoded
                keys, values, old_lens = self.keys, self.values, None
            else:
                keys, values, old_lens = self._with_body(self.keys, self.values) + (None,)
        else:
            old_lens, sizes = self.head_lens, self.host_lens()
            n_old = max(sizes)
            old_positions = self._padded_positions()
            # The attention call sees [old entries | padding | new tokens] per head ...
            keys, values, rows, visible = self._ragged_block(key_states, value_states)
            # ... while storage stays ragged: each head's segment grows by q. In the padded order
            # the stored one is the visible slots: gathered with their index (size known).
            kept = true_indices(visible.flatten(), sum(sizes) + h * q)
            self.keys = keys[0].flatten(0, 1).index_select(0, kept)
            self.values = values[0].flatten(0, 1).index_select(0, kept)
            self.positions = _grown(self.positions, new_pos.expand(h, q), rows, kept)
            for name, s in self.state.items():
                self.state[name] = _grown(s, s.new_zeros(h, q), rows, kept)
            self._set_head_lens(old_lens + q, tuple(n + q for n in sizes))
            plan = AttentionPlan(keys=keys, head_lens=old_lens, n_old=n_old, layer=self, visible=visible,
                                 segments=(self.keys, self.values, self.host_lens()), **self._window_plan(old_positions, start))
        self.peak_entries = max(self.peak_entries, self.max_entries)
        set_plan(plan or AttentionPlan(keys=keys, head_lens=old_lens, n_old=n_old, layer=self, visible=visible,
                                       **self._window_plan(old_positions, start)))
        return keys, values

    def _window_plan(self, old_positions: Tensor | None, start: int) -> dict:
        """A sliding-window layer's part of its plan: window, positions of the old slots
        ([B, H, n_old], padding at `NO_POSITION`), position of the first new token."""
        if self.window is None:
            return {}
        return {"window": self.window, "key_positions": old_positions, "start": start}

    def _padded_positions(self) -> Tensor | None:
        """A ragged sliding-window layer's positions as [1, H, widest], padding at `NO_POSITION`."""
        if self.window is None:
            return None
        sizes = self.host_lens()
        rows, valid = _padded_index(self.head_lens, max(sizes), sum(sizes))
        return _take_padded(self.positions, rows, valid, fill=NO_POSITION)[None]

    def _attend_without_storing(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """Scoring passes (query-aware question, KVzip's repetition, EpiCache's patched prompt):
        the tokens attend to the cache and to each other, their queries are observed, but their
        KV is never stored, so they add nothing to the entries held."""
        q = key_states.shape[2]
        self.phantom += q
        if self.head_lens is None:
            old_keys, old_values = self._with_body(self.keys, self.values)
            keys = torch.cat([old_keys, key_states], dim=2)
            values = torch.cat([old_values, value_states], dim=2)
            set_plan(AttentionPlan(keys=keys, head_lens=None, n_old=old_keys.shape[2], layer=self,
                                   **self._window_plan(self.positions, self.seen - q)))
            return keys, values
        old_positions = self._padded_positions()
        keys, values, _, visible = self._ragged_block(key_states, value_states)
        set_plan(AttentionPlan(keys=keys, head_lens=self.head_lens, n_old=max(self.host_lens()), layer=self,
                               visible=visible, **self._window_plan(old_positions, self.seen - q)))
        return keys, values

    def _ragged_block(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A block of q new tokens over ragged entries: the keys and values the attention call
        sees, [1, H, n_old + q, d] = [old entries | padding (zeros) | new tokens] per head, each a
        gather sized from `host_lens` (nothing read back); and that layout (`_block_index`: the
        rows of its old slots, which slots hold an entry)."""
        sizes = self.host_lens()
        n_old = max(sizes)
        rows, visible = _block_index(self.head_lens, n_old, key_states.shape[2], sum(sizes))
        old = visible[:, :n_old]
        keys = torch.cat([_take_padded(self.keys, rows, old), key_states[0]], dim=1)
        values = torch.cat([_take_padded(self.values, rows, old), value_states[0]], dim=1)
        return keys[None], values[None], rows, visible

    def _with_body(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Full-precision tail keys/values preceded by the decoded body (if any)."""
        return prepend_body(self.body, self.store, keys, values)

    def _append_ragged(self, flat: Tensor, new: Tensor) -> Tensor:
        """Insert ``new[h]`` ([H, q, ...]) after head h's segment of ``flat``."""
        sizes = self.host_lens()
        h, q = new.shape[:2]
        rows, visible = _block_index(self.head_lens, max(sizes), q, sum(sizes))
        return _grown(flat, new, rows, true_indices(visible.flatten(), sum(sizes) + h * q))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_entries + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (the position of the next token), not entries held."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        store, residual, query_keep = self.store, self.residual, self.query_keep
        self.__init__(self.window)
        self.store, self.residual, self.query_keep = store, residual, query_keep

    # --- what kvbudget adds -----------------------------------------------------------------
    @property
    def max_entries(self) -> int:
        """Entries held by the fullest head."""
        if not self.is_initialized:
            return 0
        if self.head_lens is not None:
            return max(self.host_lens())
        return self.keys.shape[-2] + (len(self.body) if self.body is not None else 0)

    def total_entries(self) -> int:
        """Entries held over all KV heads (batch 0)."""
        if self.head_lens is not None:
            return sum(self.host_lens())
        return self.max_entries * self.n_heads

    @property
    def n_heads(self) -> int:
        return self.keys.shape[1] if self.head_lens is None else self.head_lens.shape[0]

    def lengths(self) -> Tensor:
        """Entries held per KV head, [H] (batch 0)."""
        if self.head_lens is not None:
            return self.head_lens.clone()
        return torch.full((self.keys.shape[1],), self.max_entries, dtype=torch.long)

    def nbytes(self) -> int:
        """Exact bytes held: keys, values, positions, per-entry state, and the ragged length table."""
        if not self.is_initialized:
            return 0
        total = self.keys.nbytes + self.values.nbytes + self.positions.nbytes
        total += sum(s.nbytes for s in self.state.values())
        if self.head_lens is not None:
            total += self.head_lens.nbytes
        if self.body is not None:
            total += self.body.nbytes()
        return total

    def view(self, tail_only: bool = False) -> LayerView:
        """The entries as padded [B, H, n, ...] tensors (free in the dense layout). ``tail_only``:
        only the full-precision tail of a store (nothing decoded)."""
        if tail_only and self.body is not None:
            b = len(self.body)
            state = {k: s[..., b:] for k, s in self.state.items()}
            return LayerView(self.keys, self.values, self.positions[..., b:], state, None)
        if self.head_lens is None:
            keys, values = self._with_body(self.keys, self.values)
            return LayerView(keys, values, self.positions, dict(self.state), None)
        # One index, from the host lengths, gathers every field (no size read back).
        sizes = self.host_lens()
        rows, valid = _padded_index(self.head_lens, max(sizes), sum(sizes))
        return LayerView(
            keys=_take_padded(self.keys, rows, valid)[None],
            values=_take_padded(self.values, rows, valid)[None],
            positions=_take_padded(self.positions, rows, valid, fill=-1)[None],
            state={k: _take_padded(s, rows, valid)[None] for k, s in self.state.items()},
            valid=valid[None],
            sizes=sizes,
        )

    def keep(self, index: Tensor, lens: Tensor | None = None, view: LayerView | None = None) -> None:
        """Keep only the entries at ``index`` ([B, H, k], positions in `view()` order, ascending).

        With ``lens`` ([H]) head h keeps only its first ``lens[h]`` indices: different heads keep
        different numbers of entries and storage becomes ragged (batch 1 only). ``view`` passes a
        view already built (with updated state) to avoid building it twice.
        """
        view = view or self.view()
        self._drop_lse()
        if self.store is not None:
            if lens is not None and not bool((lens == index.shape[-1]).all()):
                raise ValueError(
                    f"store '{self.store.name}' needs every head to keep the same number of entries "
                    "(combine it with a uniform or pyramid allocator, not head-adaptive)"
                )
            n_tail, check = self.tail_kept(view.positions.gather(2, index))
            self.rebuild(index, n_tail, view.state, check)
            return

        keys, values, positions = (gather_entries(t, index) for t in (view.keys, view.values, view.positions))
        state = {k: gather_entries(s, index) for k, s in view.state.items()}
        sizes = None if lens is None else tuple(lens.tolist())  # read once; sizes all that follows
        if sizes is None or all(n == index.shape[-1] for n in sizes):
            self.hold(keys, values)
            self.positions, self.state, self.head_lens = positions, state, None
            return
        if index.shape[0] != 1:
            raise ValueError("per-head variable lengths need batch size 1")
        self._store_ragged(LayerView(keys, values, positions, state, None), lens.to(index.device, torch.long), sizes)

    def hold(self, keys: Tensor, values: Tensor) -> None:
        """Hold these dense ``keys`` / ``values`` (entries kept by an eviction, gathered into new
        tensors). While a dense static decoder lends this layer its buffers, they are written
        into them, so the kept entries are not held a second time until the decoder reloads (with
        every layer compressed before any reloads, those copies were a second cache). Queries
        kept across it (a window) lose their LSE: it was taken over the entries before."""
        self._drop_lse()
        room = self.room
        if (isinstance(room, tuple) and self.borrowed and keys.shape[:2] == room[0].shape[:2]
                and keys.shape[2] <= room[0].shape[2]):
            n = keys.shape[2]
            room[0][:, :, :n].copy_(keys)
            room[1][:, :, :n].copy_(values)
            keys, values = room[0][:, :, :n], room[1][:, :, :n]
        self.keys, self.values = keys, values

    def keep_chosen(self, chosen: Tensor, lens: Tensor, sizes: tuple[int, ...], view: LayerView) -> None:
        """Keep the entries of a batch-1 ``view`` where ``chosen`` ([H, n] bool) is True, in their
        order: ``lens`` ([H], on the layer's device) and ``sizes`` (the same as Python ints) of them
        per head. Ragged storage, or dense when every head keeps as many (as `keep`). One gather
        per field, sized from ``sizes``: nothing is read back from the device."""
        self.keep_entries(*_take_rows(view, true_indices(chosen.flatten(), sum(sizes))), lens, sizes)

    def keep_entries(self, keys: Tensor, values: Tensor, positions: Tensor, state: dict[str, Tensor],
                     lens: Tensor, sizes: tuple[int, ...]) -> None:
        """Hold exactly these entries, already gathered: ``keys`` [N, d], ``values`` [N, dv],
        ``positions`` [N] and ``state`` (name -> [N]), head after head, ``lens`` ([H], on the
        layer's device) and ``sizes`` (the same as Python ints) of them per head. Ragged storage,
        or dense when every head holds as many (as `keep`); nothing is read back from the device.
        Stacked Ada-KV compression gathers every layer's kept entries at once and hands each
        layer its part here."""
        if self.store is not None:
            raise ValueError(f"store '{self.store.name}' needs every head to keep the same number of entries")
        self._hold_ragged(keys, values, positions, state, lens, sizes)
        if len(set(sizes)) == 1:  # head after head, equal lengths: the dense layout is a view
            shape = (1, len(sizes), sizes[0])
            self.keys = self.keys.view(*shape, self.keys.shape[-1])
            self.values = self.values.view(*shape, self.values.shape[-1])
            self.positions = self.positions.view(shape)
            self.state = {k: s.view(shape) for k, s in self.state.items()}
            self.head_lens = None

    def rebuild(self, index: Tensor, n_tail: int, state: dict[str, Tensor] | None = None,
                check: Tensor | None = None) -> None:
        """Keep the entries at ``index`` ([B, H, k], body entries first): the last ``n_tail`` of
        each head stay in full precision, the rest are held encoded by the store. ``state``:
        per-entry state updated by the scorer (default: the layer's own); ``check``: `tail_kept`'s."""
        state = self.state if state is None else state
        self._drop_lse()
        self.positions = self.positions.gather(2, index)
        self.state = {k: s.gather(2, index) for k, s in state.items()}
        self.body, self.keys, self.values = rebuild_body(
            self.store, self.body, self.keys, self.values, index, n_tail, self.queries, check
        )
        self.head_lens = None

    def tail_kept(self, kept_positions: Tensor, groups: int = 1) -> tuple[int, Tensor | None]:
        """How many of the entries an eviction keeps (``kept_positions`` [B, H, k]) stay in the
        full-precision tail: those of the residual window (positions >= seen - residual), the
        fewest over the heads. Returns it as a Python int, and a 0-d bool on the device that says
        it was right (None when it was read from the device, which is then exact). ``groups``:
        layers alike to this one stacked along the batch (`kvbudget.stacked_store`), each checked.

        Without phantom tokens the count is known on the host: positions ascend along the
        entries, the newest is ``seen - 1``, and every eviction keeps the positions of its
        protected window, which holds the residual window (`Policy.residual`), so the residual
        window's positions are all held and are the last entries: ``min(residual, tail)`` of them.
        The device check catches a history that broke this (read with the rebuild's other values
        in one host sync, `store.HostValues`); reading the count here instead was a host sync
        per compression in which the GPU waited for the host (docs/benchmarks.md, "Ninth session")."""
        recent = (kept_positions >= self.seen - self.residual).sum(-1).reshape(groups, -1).amin(-1)
        if self.phantom == 0 and self.head_lens is None:
            n = min(self.residual, self.keys.shape[-2])
            return n, (recent == n).all()
        if groups != 1:
            raise ValueError("stacked layers need their tail length known on the host (no phantom tokens)")
        return int(recent), None

    def flush(self) -> None:
        """Encode tail entries older than the residual window, in whole chunks (KIVI: a group is
        quantized once it is full; the most recent ``residual`` entries stay in full precision)."""
        older = self.flushable()
        if older > 0:
            _flush_group([self], older, self.queries)

    def flushable(self) -> int:
        """How many of the tail's oldest entries a flush encodes now (0: none)."""
        return self.whole_chunks(self.older_in_tail())

    def older_in_tail(self) -> Tensor | int:
        """The fewest tail entries older than the residual window over the heads: a Python int
        when known on the host (no tail, or every token seen still held), else a 0-d device
        tensor (read it with the other layers' in one sync: `flush_layers`)."""
        if self.store is None or not self.is_initialized or not self.keys.shape[-2]:
            return 0
        tail = self.keys.shape[-2]
        if self.head_lens is None and self.max_entries == self.seen:
            # Every token seen is held (nothing evicted, nothing transient), so the positions are
            # 0 .. seen-1 in order and the tail's are its last ones: known without reading them.
            # A KIVI prefill's flushes then need no host sync, and the host launches them while
            # the GPU still runs the block (docs/benchmarks.md, "Eighth session").
            return min(max(tail - self.residual, 0), tail)
        return (self.positions[..., -tail:] < self.seen - self.residual).sum(-1).min()

    def whole_chunks(self, older: Tensor | int) -> int:
        """``older`` (`older_in_tail`) cut to whole chunks of the store: what a flush encodes."""
        older = int(older)
        if self.store is not None and self.store.chunk:
            older -= older % self.store.chunk
        return max(older, 0)

    def append_flushed(self, enc: Encoded, older: int) -> None:
        """Move the tail's ``older`` oldest entries, encoded as ``enc``, to the end of the body.
        Every entry keeps its place, so positions and state do not move (a rebuild would gather
        the whole body again at every flush)."""
        self._drop_lse()
        self.body = append_encoded(self.store, self.body, enc, older, self.room if isinstance(self.room, Body) else None)
        self.keys, self.values = self.keys[..., older:, :], self.values[..., older:, :]

    def _store_ragged(self, view: LayerView, lens: Tensor, sizes: tuple[int, ...] | None = None) -> None:
        """Keep the first ``lens[h]`` entries of each head of a padded view, ragged. ``sizes``:
        ``lens`` as Python ints when the caller knows them (otherwise read once)."""
        sizes = tuple(lens.tolist()) if sizes is None else sizes
        rows = true_indices(_valid_mask(lens, view.keys.shape[2]).flatten(), sum(sizes))
        self._store_rows(view, rows, lens, sizes)

    def _store_rows(self, view: LayerView, rows: Tensor, lens: Tensor, sizes: tuple[int, ...]) -> None:
        """Keep the slots ``rows`` of a batch-1 padded view flattened over its heads ([N], head
        after head, ``sizes[h]`` in head h), ragged: one gather per field."""
        self._hold_ragged(*_take_rows(view, rows), lens, sizes)

    def _hold_ragged(self, keys: Tensor, values: Tensor, positions: Tensor, state: dict[str, Tensor],
                     lens: Tensor, sizes: tuple[int, ...]) -> None:
        """Hold these ragged fields ([N, ...], head after head) as the layer's entries."""
        self._drop_lse()
        self.keys, self.values, self.positions, self.state = keys, values, positions, state
        self._set_head_lens(lens, sizes)

    def trim_window(self) -> None:
        """A sliding-window layer keeps at most its newest ``window - 1`` entries per head: any
        older entry of a head has ``window - 1`` newer ones, at distinct positions below the next
        token's, so it lies outside every later query's window. Dropping them changes no output."""
        if self.window is None or not self.is_initialized:
            return
        keep = self.window - 1
        if self.head_lens is None:
            n = self.max_entries
            if n > keep:
                b, h = self.positions.shape[:2]
                self.keep(torch.arange(n - keep, n, device=self.device).expand(b, h, keep))
            return
        sizes = self.host_lens()
        if max(sizes) <= keep:
            return
        view = self.view()
        lens = self.head_lens.clamp(max=keep)
        slot = torch.arange(view.keys.shape[2], device=self.device)
        chosen = (slot >= self.head_lens[:, None] - lens[:, None]) & (slot < self.head_lens[:, None])
        self.keep_chosen(chosen, lens, tuple(min(n, keep) for n in sizes), view)

    def drop_last(self, n: int) -> None:
        """Forget the ``n`` most recently appended tokens (they are last in every head)."""
        if n <= 0:
            return
        self.seen -= n
        phantom = min(n, self.phantom)
        self.phantom -= phantom
        n -= phantom
        if n <= 0:
            return
        if self.body is not None and n > self.keys.shape[-2]:
            raise RuntimeError("cannot drop entries that were already encoded by the store")
        self._drop_lse()  # queries observed meanwhile attended to the entries dropped
        if self.head_lens is None:
            self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
            self.positions = self.positions[..., :-n]
            self.state = {k: s[..., :-n] for k, s in self.state.items()}
            return
        self._store_ragged(self.view(), self.head_lens - n, tuple(k - n for k in self.host_lens()))

    def snapshot(self, appends_only: bool = False, host: bool = False) -> dict:
        """The layer's attributes, to restore later. Tensors borrowed from a static decoder are
        copied: the decoder overwrites its buffers at its next reload. ``appends_only``: the body
        is kept as its length (`BodyPrefix`), taken back from the body there is at the end.
        ``host``: the keys, values and body are copied to host memory (`host_copy`), so the
        snapshot takes no GPU memory while the block runs; `restore` moves them back."""
        attrs = dict(self.__dict__)
        if appends_only and self.body is not None:
            attrs["body"] = BodyPrefix.of(self.body)
        if self.borrowed or host:
            copy = host_copy if host else Tensor.clone
            attrs["keys"], attrs["values"] = copy(self.keys), copy(self.values)
            if isinstance(attrs["body"], Body):
                attrs["body"] = self.body.apply(copy)
            attrs["borrowed"], attrs["room"] = False, None
        return attrs

    def restore(self, attrs: dict) -> None:
        """Back to a `snapshot` (the queries observed since stay)."""
        observed, body = self.observed(), self.body
        self.__dict__.clear()
        self.__dict__.update(attrs)
        if self.keys is not None and self.keys.device != self.device:  # a snapshot held on the host

            def back(t: Tensor) -> Tensor:
                return t.to(self.device, non_blocking=True)

            self.keys, self.values = back(self.keys), back(self.values)
            if isinstance(self.body, Body):
                self.body = self.body.apply(back)
        if isinstance(self.body, BodyPrefix):
            self.body = self.body.taken_from(body)
        self.restore_observed(observed)

    def observe(self, query: Tensor, scaling: float | None, lse: Tensor | None = None) -> None:
        """Receive the queries of the tokens just processed (from the attention hook), and with
        ``lse`` ([B, Hq, q] float32, natural log) each one's log-sum-exp over the keys it
        attended to. The LSE is kept only while every query of the interval came with one."""
        self.scaling = scaling
        if self.query_keep == 0:
            return
        q_len = query.shape[2]
        pos = torch.arange(self.seen - q_len, self.seen, device=query.device)
        query = query.detach()
        # Transient tokens attended to their own keys, which are never stored: the scoring's
        # softmax (over stored entries) differs from theirs.
        lse = None if lse is None or self.transient else lse.detach()
        if self.queries is not None:
            query = torch.cat([self.queries, query], dim=2)
            pos = torch.cat([self.query_positions, pos])
            # The rows with an LSE are the latest ones since the last chunk without: a chunk
            # without one drops it for every row before it.
            before = self.lse if self.lse is not None else self.lse_tail
            lse = lse if lse is None or before is None else torch.cat([before, lse], dim=2)
        if self.query_keep > 0:
            query, pos = query[:, :, -self.query_keep :], pos[-self.query_keep :]
            lse = None if lse is None else lse[:, :, -self.query_keep :]
        # Never a mix of rows with and without LSE for the scoring: ``lse`` covers every row.
        whole = lse is not None and lse.shape[2] == query.shape[2]
        self.queries, self.query_positions = query, pos
        self.lse, self.lse_tail = (lse, None) if whole else (None, lse)

    def wants_lse(self) -> bool:
        """Whether the attention call should compute the LSE for `observe`: queries are kept,
        the tokens are stored, and the rows kept can all come with one: a window of the latest
        queries (SnapKV and its kin) always can, every query of the interval (accumulating
        scorers) only while no chunk of it lacked one."""
        if self.query_keep == 0 or self.transient:
            return False
        return self.query_keep > 0 or self.queries is None or self.lse is not None

    def clear_queries(self) -> None:
        self.queries = self.query_positions = self.lse = self.lse_tail = None

    def _drop_lse(self) -> None:
        self.lse = self.lse_tail = None

    def observed(self) -> tuple[Tensor | None, ...]:
        """The observed queries, their positions and their LSE (for `restore_observed`)."""
        return self.queries, self.query_positions, self.lse, self.lse_tail

    def restore_observed(self, observed: tuple[Tensor | None, ...]) -> None:
        self.queries, self.query_positions, self.lse, self.lse_tail = observed


@dataclass(frozen=True)
class BodyPrefix:
    """A body in a snapshot, by its size: appends (flushes) leave its first ``entries`` entries,
    ``chunks`` chunk-table rows and chunk ids as they were, so those are the body it stands for."""

    entries: int
    chunks: int
    id_dtype: torch.dtype | None

    @classmethod
    def of(cls, body: Body) -> "BodyPrefix":
        chunks = next(iter(body.chunks.values())).shape[2] if body.chunks else 0
        return cls(len(body), chunks, None if body.chunk_id is None else body.chunk_id.dtype)

    def taken_from(self, body: Body) -> Body:
        """The prefix of ``body`` (the same body, grown by appends since)."""
        n, c = self.entries, self.chunks
        tokens = {k: t[:, :, :n] for k, t in body.tokens.items()}
        if body.chunk_id is None:
            return Body(tokens, None, {})
        return Body(tokens, body.chunk_id[:, :, :n].to(self.id_dtype), {k: t[:, :, :c] for k, t in body.chunks.items()})


def flush_layers(layers: list[BudgetedLayer]) -> None:
    """`BudgetedLayer.flush` for every layer, with one encode call for the layers of one shape
    (stacked along the batch) instead of one per layer: per layer, the ~50 small kernels of an
    encode made a 32k KIVI prefill spend a fifth of its time flushing on an H100, bound by the
    host launching them (docs/benchmarks.md, "Seventh session"). Encoding is per (sequence, head),
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
        older = layer.whole_chunks(count)
        if older <= 0:
            continue
        if layer.store.queries or layer.head_lens is not None:
            layer.flush()
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
    keys = torch.cat([layer.keys[..., :older, :] for layer in group])
    values = torch.cat([layer.values[..., :older, :] for layer in group])
    valid = torch.ones(len(group) * b, h, older, dtype=torch.bool, device=keys.device)
    enc = group[0].store.encode(keys, values, valid, queries)
    for i, layer in enumerate(group):
        part = Encoded({k: t[i * b : (i + 1) * b] for k, t in enc.tokens.items()},
                       {k: c[i * b : (i + 1) * b] for k, c in enc.chunks.items()})
        layer.append_flushed(part, older)


def _move_tensors(obj, device: torch.device, move=None) -> None:
    """Move the tensors held by ``obj``'s attributes (also inside dicts and dataclasses) in place;
    ``move(tensor)`` does the copy (default: ``tensor.to(device)``)."""
    move = move or (lambda t: t.to(device))

    def moved(value):
        if isinstance(value, Tensor):
            return move(value)
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(moved(v) for v in value)
        if hasattr(value, "__dataclass_fields__"):
            _move_tensors(value, device, move)
        return value

    for name, value in list(vars(obj).items()):
        setattr(obj, name, moved(value))
    if hasattr(obj, "device") and isinstance(getattr(obj, "device", None), torch.device):
        obj.device = device


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
    """A transformers `Cache` for budgeted KV: every attention layer is a `BudgetedLayer`
    (sliding-window layers with their window). Built from a model (``BudgetedCache(model)``:
    the attention hook is attached, the dtype is the model's) or from its config.
    """

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
        dtype = dtype or torch.float32
        self.dtype = dtype
        self.budgeted = [i for i, layer in enumerate(layers) if isinstance(layer, BudgetedLayer)]
        self.peak_bytes = 0
        self.unscored: list[Tensor] = []  # token ids fed since the last compression (KVzip repeats them)
        self._scratch: list = []  # one entry per open `scratch` block: None or a snapshot
        self._snapshot_bytes = 0
        self._pending = None  # (event, device) of a non-blocking `to` in flight
        # Work a compression left to finish once values it copied to the host arrive (`defer`).
        self._unsettled: list = []
        self.defer_settle = False

    # Snapshots of a scratch block (an answer with decode-time compression, rolled back at its
    # end) wait in pinned host memory on a GPU: on the 8B shape at 32k a SnapKV 2048 answer held
    # its 0.27 GB cache a second time on the GPU for the whole answer (docs/benchmarks.md, "Ninth
    # session"). The copies are queued behind the work before them and cost one transfer each way.
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
        return self.layers[self.budgeted[0]].seen if self.budgeted else super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if isinstance(layer, BudgetedLayer):
            return layer.max_entries
        return super().get_query_offset(layer_idx)

    def to(self, device: "torch.device | str", non_blocking: bool = False) -> "BudgetedCache":
        """Move every held tensor to ``device`` (EpiCache keeps idle episode caches on CPU).

        ``non_blocking`` (between CPU and a GPU): the copies run on a side stream, into pinned
        host memory when offloading, and return at once, so they overlap whatever the GPU and
        the host do next. Call `wait` before the cache is used again (the episodic session and
        the session file do)."""
        device = torch.device(device)
        layers = [layer for layer in self.layers
                  if layer.is_initialized and layer.keys is not None and layer.keys.device != device]
        if not layers:
            return self
        gpu = device if device.type == "cuda" else layers[0].keys.device
        if not non_blocking or gpu.type != "cuda":
            self.wait()
            for layer in layers:
                _move_tensors(layer, device)
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
            _move_tensors(layer, device, move)
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

    def budgeted_layers(self) -> list[BudgetedLayer]:
        return [self.layers[i] for i in self.budgeted]

    def layer_bytes(self) -> list[int]:
        """Exact bytes held per layer."""
        return [layer.nbytes() for layer in self.layers]

    def nbytes(self) -> int:
        """Exact bytes held by the whole cache."""
        self.settle()
        return sum(self.layer_bytes())

    def peak_entries(self) -> int:
        """Most entries any budgeted layer's fullest head has held."""
        return max((layer.peak_entries for layer in self.budgeted_layers()), default=0)

    def entries(self) -> list[Tensor]:
        """Entries held per KV head, one [H] tensor per budgeted layer."""
        return [layer.lengths() for layer in self.budgeted_layers()]

    def before_compress(self, appends_only: bool = False) -> None:
        """Called by a policy before it evicts or encodes. Inside `scratch` (decode-time
        compression of an answer that will be rolled back), the layers are first snapshotted,
        because evicted or encoded entries cannot be dropped-last back; the snapshot's bytes
        count toward the peak. ``appends_only``: the compressions of this block only append to
        store bodies (flushes, no eviction), so the snapshot keeps each body's length instead of
        the body (`BodyPrefix`), and only the rest counts."""
        if self._scratch and self._scratch[-1] is None:
            host = self._snapshot_on_host()
            layers = [(layer, layer.snapshot(appends_only, host and layer.is_initialized)) for layer in self.budgeted_layers()]
            self._scratch[-1] = (self.get_seq_length(), layers)
            held = sum(layer.nbytes() - (layer.body.nbytes() if appends_only and layer.body is not None else 0)
                       for layer in self.budgeted_layers())
            self._snapshot_bytes += held

    def _snapshot_on_host(self) -> bool:
        """Whether `before_compress` copies the snapshot to host memory (`host_snapshots`, on a GPU)."""
        return self.host_snapshots and any(layer.is_initialized and layer.device.type == "cuda"
                                           for layer in self.budgeted_layers())

    def track_peak(self) -> int:
        """Record the bytes held now in ``peak_bytes`` (call after each forward, before eviction)."""
        held = self.nbytes()
        self.peak_bytes = max(self.peak_bytes, held + self._snapshot_bytes)
        return held

    @contextmanager
    def transient(self) -> Iterator[None]:
        """Inside `scratch`: budgeted layers attend to new tokens without storing them."""
        for layer in self.budgeted_layers():
            layer.transient = True
        try:
            yield
        finally:
            for layer in self.budgeted_layers():
                layer.transient = False

    @contextmanager
    def scratch(self, keep_queries: bool = False) -> Iterator[None]:
        """Tokens fed inside the block are forgotten at its end (teacher-forced scoring, decoding
        that is replaced, scoring queries). ``keep_queries`` keeps the queries observed inside."""
        seen = self.get_seq_length()
        saved = [layer.observed() for layer in self.budgeted_layers()]
        self._scratch.append(None)
        try:
            yield
        finally:
            snapshot = self._scratch.pop()
            end = self.get_seq_length()
            if snapshot is not None:
                # Back to the state before the first eviction inside the block, then drop the
                # tokens fed between the start of the block and that eviction.
                end, layers = snapshot
                for layer, attrs in layers:
                    layer.restore(attrs)
                self._snapshot_bytes = 0
            n = end - seen
            for layer, observed in zip(self.budgeted_layers(), saved):
                layer.drop_last(n)
                if not keep_queries:  # back to the same entries as then: their LSE holds again
                    layer.restore_observed(observed)
