"""`BudgetedLayer`: one attention layer's cache under a budget (a transformers cache layer).

It holds its entries in one storage layout (`DenseEntries`, `RaggedEntries` or, with a store,
`EncodedEntries`), which changes as entries are kept: a dense layer whose heads keep different
numbers of entries becomes ragged, and back. Around them it keeps what every layout shares:

* ``seen``: every token ever fed, so `get_seq_length` gives the next position and the model's
  own forward and generate place new tokens right after eviction;
* the plan handed to the attention call after each update (`kv.plan`), and the queries the hook
  hands back (`ObservedQueries`), which the policy's scorer reads;
* a sliding window (Gemma, Mistral, GPT-OSS...): the plan masks by position, and `trim_window`
  drops the entries no later token can see;
* transient mode (`BudgetedCache.transient`): tokens attended but not stored (scoring passes);
  ``phantom`` counts them so that `drop_last` forgets them first;
* lending: while a static decoder (`runtime.static`) lends the layer views of its buffers,
  ``borrowed`` is set and ``room`` holds those buffers, so that a compression writes in place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from .body import Body
from .dense import DenseEntries
from .encoded import EncodedEntries
from .entries import POSITION_DTYPE, Entries, LayerView
from .observed import ObservedQueries
from .plan import AttentionPlan, Extras, set_plan
from .ragged import RaggedEntries
from .store import Store

# On CUDA, decode steps over a store's encoded body attend through the fused dequantise-and-attend
# kernel (`kernels.kivi_decode_attention`) instead of decoding the whole body first.
# KVBUDGET_FUSED_KIVI: "auto" (default) on CUDA only, since on CPU the kernel's torch path decodes
# the body anyway; "1" everywhere (tests run that torch path on CPU); "0" never.
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
        from ..kernels import kivi_decode_attention  # imports triton

        layer = self.layer
        layer.observe(query, scaling)
        e = layer.entries
        out = kivi_decode_attention(query[:, :, 0], e.body, e.store, e.keys, e.values, scaling,
                                    softcap=extras.softcap, sinks=extras.sinks)
        return out[:, None]


class BudgetedLayer(CacheLayerMixin):
    """One attention layer's KV under a budget: variable per-head lengths, positions, exact bytes."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, window: int | None = None) -> None:
        self.is_initialized = False
        self.window = window  # a sliding window: a query at p sees the keys at p - window < pos <= p
        self.entries: Entries | None = None
        self.store: Store | None = None  # set by the policy: older entries held encoded
        self.residual = 0  # the store's full-precision tail, as the policy sets it per compression
        self.observed = ObservedQueries()
        self.seen = 0
        self.peak_entries = 0
        self.transient = False
        self.phantom = 0
        self.borrowed = False
        self.room: Body | tuple[Tensor, Tensor] | None = None

    @property
    def keys(self) -> Tensor | None:
        """The layout's keys: dense ``[B, H, n, d]``, ragged ``[N, d]``, encoded: the tail's."""
        return None if self.entries is None else self.entries.keys

    @property
    def values(self) -> Tensor | None:
        return None if self.entries is None else self.entries.values

    # --- transformers' layer protocol -------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = DenseEntries.empty(key_states, value_states)
        self.entries = empty if self.store is None else EncodedEntries(self.store, None, **vars(empty))
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append the new tokens to every head; return keys/values padded for this attention call."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        start, windowed = self.seen, self.window is not None
        self.seen += q
        if self.transient:  # attended, never stored: adds nothing to the entries held
            self.phantom += q
            block = self.entries.attend(key_states, value_states, windowed)
            set_plan(self._plan(block, start))
            return block.keys, block.values
        positions = torch.arange(start, start + q, dtype=POSITION_DTYPE, device=self.device)
        if q == 1 and self._fused_step(key_states):
            block = self.entries.append(key_states, value_states, positions, False, decode=False)
            set_plan(BodyPlan(block.keys, self))  # attends to the body as stored: nothing decoded
        else:
            block = self.entries.append(key_states, value_states, positions, windowed)
            set_plan(self._plan(block, start))
        self.peak_entries = max(self.peak_entries, self.max_entries)
        return block.keys, block.values

    def _fused_step(self, key_states: Tensor) -> bool:
        """Whether a one-token step attends to the encoded body through the fused kernel."""
        return (isinstance(self.entries, EncodedEntries) and self.entries.body is not None and self.window is None
                and (FUSED_KIVI == "1" or (FUSED_KIVI == "auto" and key_states.is_cuda)))

    def _plan(self, block, start: int) -> AttentionPlan:
        window = {} if self.window is None else {"window": self.window, "key_positions": block.key_positions,
                                                 "start": start}
        return AttentionPlan(keys=block.keys, head_lens=block.head_lens, n_old=block.n_old, layer=self,
                             visible=block.visible, segments=block.segments, **window)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_entries + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (the position of the next token), not entries held."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        store, residual, keep = self.store, self.residual, self.observed.keep
        self.__init__(self.window)
        self.store, self.residual, self.observed.keep = store, residual, keep

    # --- what is held -------------------------------------------------------------------------
    @property
    def max_entries(self) -> int:
        """Entries held by the fullest head."""
        return 0 if self.entries is None else self.entries.max_entries

    def total_entries(self) -> int:
        """Entries held over all KV heads (batch 0)."""
        return self.entries.total_entries()

    @property
    def n_heads(self) -> int:
        return self.entries.n_heads

    def lengths(self) -> Tensor:
        """Entries held per KV head, [H] (batch 0)."""
        return self.entries.lengths()

    def nbytes(self) -> int:
        """Exact bytes held: keys, values, positions, per-entry state, and what the layout adds
        (the ragged length table, a store's encoded body)."""
        return 0 if self.entries is None else self.entries.nbytes()

    def view(self, tail_only: bool = False) -> LayerView:
        """The entries as padded [B, H, n, ...] tensors (free in the dense layout). ``tail_only``:
        only the full-precision tail of a store (nothing decoded)."""
        if tail_only and isinstance(self.entries, EncodedEntries):
            return self.entries.tail_view()
        return self.entries.view()

    # --- keeping entries ----------------------------------------------------------------------
    def keep(self, index: Tensor, lens: Tensor | None = None, view: LayerView | None = None) -> None:
        """Keep only the entries at ``index`` ([B, H, k], positions in `view()` order, ascending).

        With ``lens`` ([H]) head h keeps only its first ``lens[h]`` indices: different heads keep
        different numbers of entries and storage becomes ragged (batch 1 only). ``view`` passes a
        view already built (with updated state) to avoid building it twice.
        """
        view = view or self.view()
        if not isinstance(self.entries, EncodedEntries):
            self.hold(DenseEntries.gathered(view, index) if lens is None else RaggedEntries.kept(view, index, lens))
            return
        if lens is not None and not bool((lens == index.shape[-1]).all()):
            raise ValueError(f"store '{self.store.name}' needs every head to keep the same number of entries "
                             "(combine it with a uniform or pyramid allocator, not head-adaptive)")
        kept = view.positions.gather(2, index)
        n_tail, check = self.entries.tail_kept(kept, self.seen, self.residual, self.phantom)
        self.rebuild(index, n_tail, view.state, check)

    def hold(self, entries: Entries) -> None:
        """Hold ``entries``, what a compression kept. Dense entries are written into the buffers a
        static decoder lends this layer, if any, so that they are not held twice."""
        if self.store is not None and isinstance(entries, RaggedEntries):
            raise ValueError(f"store '{self.store.name}' needs every head to keep the same number of entries")
        if isinstance(entries, DenseEntries) and self.borrowed and isinstance(self.room, tuple):
            entries = entries.held_in(self.room)
        self._set(entries)

    def rebuild(self, index: Tensor, n_tail: int, state: dict[str, Tensor] | None = None,
                check: Tensor | None = None) -> None:
        """Keep the entries at ``index`` ([B, H, k], body entries first): the last ``n_tail`` of
        each head stay in full precision, the rest are held encoded by the store. ``state``:
        per-entry state updated by the scorer (default: the layer's own); ``check``: `EncodedEntries.tail_kept`'s."""
        self._set(self.entries.rebuilt(index, n_tail, state, self.observed.queries, check))

    def set_state(self, state: dict[str, Tensor]) -> None:
        """The scorer's per-entry state, updated without evicting (in the layer's layout)."""
        self.entries = replace(self.entries, state=state)

    def _set(self, entries: Entries) -> None:
        """Hold ``entries``. Queries kept across a compression (a window) lose their LSE: it was
        taken over the entries before."""
        self.observed.drop_lse()
        self.entries = entries

    def older_in_tail(self) -> Tensor | int:
        """`EncodedEntries.older_in_tail` (0 without a store)."""
        if not isinstance(self.entries, EncodedEntries):
            return 0
        return self.entries.older_in_tail(self.seen, self.residual)

    def append_flushed(self, enc, older: int) -> None:
        """Move the tail's ``older`` oldest entries, encoded as ``enc``, to the end of the body
        (written into the lent body buffers while a static decoder lends them)."""
        room = self.room if isinstance(self.room, Body) else None
        self._set(self.entries.flushed(enc, older, room))

    def trim_window(self) -> None:
        """A sliding-window layer keeps at most its newest ``window - 1`` entries per head: any
        older entry of a head has ``window - 1`` newer ones, at distinct positions below the next
        token's, so it lies outside every later query's window. Dropping them changes no output."""
        keep = None if self.window is None else self.window - 1
        if not self.is_initialized or keep is None or self.max_entries <= keep:
            return
        if isinstance(self.entries, EncodedEntries):  # the newest of every head: the tail's and the body's last
            n, (b, h) = self.max_entries, self.entries.positions.shape[:2]
            self.keep(torch.arange(n - keep, n, device=self.device).expand(b, h, keep))
        else:
            self.hold(self.entries.newest(keep))

    def drop_last(self, n: int) -> None:
        """Forget the ``n`` most recently appended tokens (they are last in every head)."""
        if n <= 0:
            return
        self.seen -= n
        phantom = min(n, self.phantom)
        self.phantom -= phantom
        n -= phantom
        if n > 0:  # queries observed meanwhile attended to the entries dropped: their LSE goes
            self._set(self.entries.drop_last(n))

    # --- devices ---------------------------------------------------------------------------------
    def moved(self, move) -> None:
        """Move every tensor held (entries and observed queries) with ``move(tensor)``."""
        if self.entries is not None:
            self.entries = self.entries.apply(move)
            self.device = self.entries.positions.device
        self.observed.moved(move)

    # --- queries for the scorer -----------------------------------------------------------------
    def observe(self, query: Tensor, scaling: float | None, lse: Tensor | None = None) -> None:
        """Receive the queries of the tokens just processed (from the attention hook), and with
        ``lse`` each one's log-sum-exp (`ObservedQueries.observe`). Transient tokens attended to
        their own keys, which are never stored: the scoring's softmax differs from theirs."""
        self.observed.observe(query, scaling, self.seen, None if self.transient else lse)

    def wants_lse(self) -> bool:
        """Whether the attention call should compute the LSE for `observe`."""
        return not self.transient and self.observed.wants_lse()

    def clear_queries(self) -> None:
        self.observed.clear()
