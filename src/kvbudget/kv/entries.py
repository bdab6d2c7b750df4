"""What every storage layout of a layer's entries offers (`DenseEntries`, `RaggedEntries`,
`EncodedEntries`), and the two views of them the rest of kvbudget reads.

A layer's entries are its kept keys and values, each with its original position (RoPE is
applied once, when the model computes a key; nothing is re-rotated) and per-entry float state a
scorer keeps between compressions (H2O's accumulated attention). The layout decides how they
lie in memory:

* dense: ``[B, H, n, d]``, every head n entries (heads may hold different tokens);
* ragged (batch 1): ``[N, d]``, head after head, ``N = sum(lengths)``: heads hold different
  numbers of entries and only those are allocated (Ada-KV);
* encoded: a store's body (older entries, encoded) followed by a dense full-precision tail.

Each layout appends the tokens of a forward pass (`append`, returning the `Block` the attention
call reads), lets tokens attend without storing them (`attend`), shows its entries padded to
``[B, H, n]`` (`view`: free in the dense layout) and drops its newest tokens (`drop_last`). What
a compression keeps is built as new entries, possibly of another layout (a dense layer whose
heads keep different numbers of entries becomes ragged: `RaggedEntries.kept`), and handed to the
layer (`BudgetedLayer.hold`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

POSITION_DTYPE = torch.int32


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


@dataclass
class Block:
    """What one forward pass's attention call reads from a layer: the keys and values of the old
    entries followed by the new tokens, padded per head ``[B, H, n_old + q, d]``, and what a mask
    needs to know about that layout."""

    keys: Tensor
    values: Tensor
    n_old: int  # entries before the new tokens (the widest head's)
    head_lens: Tensor | None = None  # [H] entries of each head before the new tokens; None: all n_old
    # [H, n_old + q] bool: which slots hold an entry (ragged: padding between a head's entries
    # and the new tokens does not).
    visible: Tensor | None = None
    # A ragged layer's storage after the update (flat keys, values and per-head lengths on the
    # host): the layout of varlen flash attention.
    segments: tuple[Tensor, Tensor, tuple[int, ...]] | None = None
    # Positions of the old slots [B, H, n_old] (padding outside every window), for a
    # sliding-window layer's mask.
    key_positions: Tensor | None = None


class Entries:
    """The protocol of a storage layout (see the module docstring). Fields are tensors or dicts
    of tensors, so moving them (`apply`) is generic."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    state: dict[str, Tensor]

    @property
    def n_heads(self) -> int:
        raise NotImplementedError

    @property
    def max_entries(self) -> int:
        """Entries held by the fullest head."""
        raise NotImplementedError

    def total_entries(self) -> int:
        """Entries held over all KV heads (batch 0)."""
        raise NotImplementedError

    def lengths(self) -> Tensor:
        """Entries held per KV head, [H] (batch 0)."""
        raise NotImplementedError

    def head_sizes(self) -> tuple[int, ...]:
        """Entries held per (sequence, KV head), B*H of them, known on the host: what sizes a
        buffer without reading lengths back from the device (which waits for the queued work)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Exact bytes held: keys, values, positions, state and whatever the layout adds."""
        raise NotImplementedError

    def token_bytes(self) -> int:
        """Bytes one more token adds: an entry (key, value, position, state) in every (sequence,
        KV head); a store's tail takes new tokens at full precision."""
        keys, values = self.keys, self.values
        entry = (keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
                 + self.positions.element_size() + sum(s.element_size() for s in self.state.values()))
        return len(self.head_sizes()) * entry

    def view(self) -> LayerView:
        raise NotImplementedError

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, want_positions: bool) -> Block:
        """Store the tokens ``keys`` / ``values`` [B, H, q, d] at ``positions`` [q] (zeroed state)
        and return what the attention call reads (``want_positions``: with the old slots'
        positions, for a sliding window)."""
        raise NotImplementedError

    def attend(self, keys: Tensor, values: Tensor, want_positions: bool) -> Block:
        """The `Block` of ``keys`` / ``values`` attended after the entries, without storing them."""
        raise NotImplementedError

    def drop_last(self, n: int) -> "Entries":
        """Without the ``n`` most recently appended tokens (they are last in every head)."""
        raise NotImplementedError

    def apply(self, fn) -> "Entries":
        """A copy of these entries with ``fn`` applied to every tensor (a move, a clone)."""

        def each(value):
            if isinstance(value, Tensor):
                return fn(value)
            if isinstance(value, dict):
                return {k: each(v) for k, v in value.items()}
            if hasattr(value, "apply"):  # a store's body
                return value.apply(fn)
            return value

        return type(self)(**{f.name: each(getattr(self, f.name)) for f in fields(self)})


def extend(entries, keys: Tensor, values: Tensor, positions: Tensor) -> None:
    """Append a block (``[B, H, Q, D]`` keys and values, its positions broadcast to every head) to
    the full-precision ``keys``, ``values``, ``positions`` and per-entry ``state`` of ``entries``
    (a dense layout or an encoded layout's tail); the new entries' state starts at zero."""
    b, h, q = keys.shape[:3]
    entries.keys = torch.cat([entries.keys, keys], dim=2)
    entries.values = torch.cat([entries.values, values], dim=2)
    entries.positions = torch.cat([entries.positions, positions.expand(b, h, q)], dim=2)
    entries.state = {k: torch.cat([s, s.new_zeros(b, h, q)], dim=2) for k, s in entries.state.items()}


def gather_entries(t: Tensor, index: Tensor) -> Tensor:
    """The entries at ``index`` ([B, H, k]) of ``t`` ([B, H, n] or [B, H, n, d])."""
    idx = index if t.dim() == 3 else index[..., None].expand(*index.shape, t.shape[-1])
    return t.gather(2, idx)
