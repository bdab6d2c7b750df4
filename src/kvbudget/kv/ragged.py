"""The ragged layout (batch 1): ``[N, d]`` head after head, KV head h holding ``lens[h]`` entries.

Heads that keep different numbers of entries (Ada-KV, a head-adaptive allocator) allocate only
those: no padding, no masked entries kept in memory. The per-head lengths live on the device
(``head_lens``) and, mirrored, on the host (``sizes``), so tensors are sized without reading them
back.

Ragged <-> padded moves are gathers with computed indices, never boolean-mask indexing: a
boolean mask's result size is read back from the device (``nonzero``: a host<->device sync on a
GPU, six of them per Ada-KV layer and compression). The sizes they need (the widest head, the
total) come from ``sizes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dense import DenseEntries
from .entries import Block, Entries, LayerView
from .plan import NO_POSITION


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


def padded_index(lens: Tensor, width: int, total: int) -> tuple[Tensor, Tensor]:
    """For a [H, width] padded layout of ragged entries (``lens`` per head, ``total`` in all):
    each slot's row in the ragged storage, and which slots hold an entry (a padding slot's row is
    some stored row: mask what is gathered there)."""
    offs = torch.arange(width, device=lens.device)
    rows = ((lens.cumsum(0) - lens)[:, None] + offs).clamp_(max=max(total - 1, 0))
    return rows, offs < lens[:, None]


def block_index(lens: Tensor, n_old: int, q: int, total: int) -> tuple[Tensor, Tensor]:
    """A block of ``q`` new tokens over ragged entries (``lens`` per head, ``total`` in all, the
    widest ``n_old``), laid out [old entries | padding | new tokens], [H, n_old + q]: the rows of
    its old slots in the storage ([H, n_old], as `padded_index`) and which slots hold an entry."""
    offs = torch.arange(n_old + q, device=lens.device)
    rows = ((lens.cumsum(0) - lens)[:, None] + offs[:n_old]).clamp_(max=max(total - 1, 0))
    return rows, (offs < lens[:, None]) | (offs >= n_old)


def take_padded(flat: Tensor, rows: Tensor, valid: Tensor, fill: float = 0) -> Tensor:
    """``flat``'s rows at ``rows`` ([H, W]), ``fill`` where not ``valid``: [H, W, ...]."""
    out = flat.index_select(0, rows.flatten()).view(*rows.shape, *flat.shape[1:])
    return torch.where(valid.view(*valid.shape, *[1] * (flat.dim() - 1)), out, fill)


def grown(flat: Tensor, new: Tensor, rows: Tensor, kept: Tensor) -> Tensor:
    """Ragged storage ``flat`` with ``new[h]`` ([H, q, ...]) after head h's entries: gathered
    through a block's padded layout (`block_index`'s ``rows``; ``kept``: its slots that hold an
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
    rows, valid = padded_index(lens, width, flat.shape[0])
    return take_padded(flat, rows, valid, fill)


def padded_to_ragged(padded: Tensor, lens: Tensor, total: int | None = None) -> Tensor:
    """[H, W, ...] -> [N, ...] keeping the first ``lens[h]`` entries of each head. ``total``:
    sum(lens) when the caller knows it (otherwise it is read from the device)."""
    if total is None:
        total = int(lens.sum())
    width = padded.shape[1]
    rows = true_indices((torch.arange(width, device=lens.device)[None, :] < lens[:, None]).flatten(), total)
    return padded.flatten(0, 1).index_select(0, rows)


def take_rows(view: LayerView, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The slots ``rows`` ([N]) of a batch-1 padded view flattened over its heads: keys, values,
    positions and state, one gather per field."""

    def take(t: Tensor) -> Tensor:
        return t[0].flatten(0, 1).index_select(0, rows)

    return take(view.keys), take(view.values), take(view.positions), {k: take(s) for k, s in view.state.items()}


@dataclass
class RaggedEntries(Entries):
    keys: Tensor  # [N, d], head after head
    values: Tensor  # [N, dv]
    positions: Tensor  # [N]
    state: dict[str, Tensor]  # name -> [N]
    head_lens: Tensor  # [H] int64 on the entries' device
    sizes: tuple[int, ...]  # the same on the host

    @classmethod
    def held(cls, keys: Tensor, values: Tensor, positions: Tensor, state: dict[str, Tensor], lens: Tensor,
             sizes: tuple[int, ...]) -> "Entries":
        """Exactly these entries, already gathered head after head (``keys`` [N, d], ...,
        ``lens`` [H] on the device and ``sizes`` the same on the host): ragged, or dense (a view)
        when every head holds as many; nothing is read back from the device."""
        if len(set(sizes)) != 1:
            return cls(keys, values, positions, state, lens, tuple(sizes))
        shape = (1, len(sizes), sizes[0])
        return DenseEntries(keys.view(*shape, keys.shape[-1]), values.view(*shape, values.shape[-1]),
                            positions.view(shape), {k: s.view(shape) for k, s in state.items()})

    @classmethod
    def from_padded(cls, view: LayerView, lens: Tensor, sizes: tuple[int, ...]) -> "RaggedEntries":
        """The first ``lens[h]`` entries of each head of a batch-1 padded view."""
        width = view.keys.shape[2]
        rows = true_indices((torch.arange(width, device=lens.device)[None, :] < lens[:, None]).flatten(), sum(sizes))
        return cls(*take_rows(view, rows), lens, tuple(sizes))

    @classmethod
    def chosen(cls, view: LayerView, chosen: Tensor, lens: Tensor, sizes: tuple[int, ...]) -> "Entries":
        """The entries of a batch-1 ``view`` where ``chosen`` ([H, n] bool) is True, in their order
        (``lens`` / ``sizes`` of them per head): ragged, or dense when every head keeps as many."""
        return cls.held(*take_rows(view, true_indices(chosen.flatten(), sum(sizes))), lens, sizes)

    @property
    def n_heads(self) -> int:
        return self.head_lens.shape[0]

    @property
    def max_entries(self) -> int:
        return max(self.sizes)

    def total_entries(self) -> int:
        return sum(self.sizes)

    def lengths(self) -> Tensor:
        return self.head_lens.clone()

    def head_sizes(self) -> tuple[int, ...]:
        return self.sizes

    def nbytes(self) -> int:
        return (self.keys.nbytes + self.values.nbytes + self.positions.nbytes + self.head_lens.nbytes
                + sum(s.nbytes for s in self.state.values()))

    def view(self) -> LayerView:
        # One index, from the host lengths, gathers every field (no size read back).
        rows, valid = padded_index(self.head_lens, max(self.sizes), sum(self.sizes))
        return LayerView(
            keys=take_padded(self.keys, rows, valid)[None],
            values=take_padded(self.values, rows, valid)[None],
            positions=take_padded(self.positions, rows, valid, fill=-1)[None],
            state={k: take_padded(s, rows, valid)[None] for k, s in self.state.items()},
            valid=valid[None],
            sizes=self.sizes,
        )

    def _padded_positions(self) -> Tensor:
        """Positions as [1, H, widest], padding at `NO_POSITION` (outside every window)."""
        rows, valid = padded_index(self.head_lens, max(self.sizes), sum(self.sizes))
        return take_padded(self.positions, rows, valid, fill=NO_POSITION)[None]

    def _block(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A block of q new tokens over the entries: the keys and values the attention call sees,
        [1, H, n_old + q, d] = [old entries | padding (zeros) | new tokens] per head, each a
        gather sized from ``sizes``; and that layout (`block_index`: the rows of its old slots,
        which slots hold an entry)."""
        n_old = max(self.sizes)
        rows, visible = block_index(self.head_lens, n_old, keys.shape[2], sum(self.sizes))
        old = visible[:, :n_old]
        all_keys = torch.cat([take_padded(self.keys, rows, old), keys[0]], dim=1)
        all_values = torch.cat([take_padded(self.values, rows, old), values[0]], dim=1)
        return all_keys[None], all_values[None], rows, visible

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, want_positions: bool) -> Block:
        h, q = keys.shape[1:3]
        old_lens, sizes = self.head_lens, self.sizes
        old_positions = self._padded_positions() if want_positions else None
        # The attention call sees [old entries | padding | new tokens] per head ...
        all_keys, all_values, rows, visible = self._block(keys, values)
        # ... while storage stays ragged: each head's segment grows by q. In the padded order
        # the stored one is the visible slots: gathered with their index (size known).
        kept = true_indices(visible.flatten(), sum(sizes) + h * q)
        self.keys = all_keys[0].flatten(0, 1).index_select(0, kept)
        self.values = all_values[0].flatten(0, 1).index_select(0, kept)
        self.positions = grown(self.positions, positions.expand(h, q), rows, kept)
        self.state = {k: grown(s, s.new_zeros(h, q), rows, kept) for k, s in self.state.items()}
        self.head_lens, self.sizes = old_lens + q, tuple(n + q for n in sizes)
        return Block(all_keys, all_values, max(sizes), head_lens=old_lens, visible=visible,
                     segments=(self.keys, self.values, self.sizes), key_positions=old_positions)

    def attend(self, keys: Tensor, values: Tensor, want_positions: bool) -> Block:
        old_positions = self._padded_positions() if want_positions else None
        all_keys, all_values, _, visible = self._block(keys, values)
        return Block(all_keys, all_values, max(self.sizes), head_lens=self.head_lens, visible=visible,
                     key_positions=old_positions)

    def append_rows(self, flat: Tensor, new: Tensor) -> Tensor:
        """``flat`` (a field in this layout) with ``new[h]`` ([H, q, ...]) inserted after head h's
        segment."""
        h, q = new.shape[:2]
        rows, visible = block_index(self.head_lens, max(self.sizes), q, sum(self.sizes))
        return grown(flat, new, rows, true_indices(visible.flatten(), sum(self.sizes) + h * q))

    @classmethod
    def kept(cls, view: LayerView, index: Tensor, lens: Tensor) -> Entries:
        """The entries of a padded batch-1 ``view`` at ``index`` ([1, H, k], ascending), head h
        keeping its first ``lens[h]`` ([H]): ragged, or dense when every head keeps all k."""
        kept = DenseEntries.gathered(view, index)
        sizes = tuple(lens.tolist())  # read once; sizes all that follows
        return keep_padded(LayerView(kept.keys, kept.values, kept.positions, kept.state, None),
                           lens.to(index.device, torch.long), sizes)

    def newest(self, keep: int) -> Entries:
        """Each head's newest ``keep`` entries (a sliding window's: `BudgetedLayer.trim_window`)."""
        view = self.view()
        lens = self.head_lens.clamp(max=keep)
        slot = torch.arange(view.keys.shape[2], device=lens.device)
        chosen = (slot >= self.head_lens[:, None] - lens[:, None]) & (slot < self.head_lens[:, None])
        return RaggedEntries.chosen(view, chosen, lens, tuple(min(n, keep) for n in self.sizes))

    def drop_last(self, n: int) -> "RaggedEntries":
        sizes = tuple(k - n for k in self.sizes)
        return RaggedEntries.from_padded(self.view(), self.head_lens - n, sizes)


def keep_padded(kept: LayerView, lens: Tensor, sizes: tuple[int, ...]) -> Entries:
    """Entries gathered into a padded batch-1 view of which head h keeps its first ``lens[h]``
    (``sizes`` on the host): dense when every head keeps them all, else ragged."""
    if all(n == kept.keys.shape[2] for n in sizes):
        return DenseEntries(kept.keys, kept.values, kept.positions, kept.state)
    if kept.keys.shape[0] != 1:
        raise ValueError("per-head variable lengths need batch size 1")
    return RaggedEntries.from_padded(kept, lens, sizes)
