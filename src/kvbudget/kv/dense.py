"""The dense layout: ``[B, H, n, d]``, every KV head holding n entries (heads may hold different
tokens, each with its own positions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .entries import POSITION_DTYPE, Block, Entries, LayerView, extend, gather_entries


@dataclass
class DenseEntries(Entries):
    keys: Tensor  # [B, H, n, d]
    values: Tensor  # [B, H, n, dv]
    positions: Tensor  # [B, H, n]
    state: dict[str, Tensor]  # name -> [B, H, n]

    @classmethod
    def empty(cls, keys: Tensor, values: Tensor) -> "DenseEntries":
        """No entries, shaped after the first ``keys`` / ``values`` [B, H, q, d] a layer sees."""
        b, h = keys.shape[:2]
        return cls(keys.new_empty(b, h, 0, keys.shape[-1]), values.new_empty(b, h, 0, values.shape[-1]),
                   torch.empty(b, h, 0, dtype=POSITION_DTYPE, device=keys.device), {})

    @property
    def n_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def max_entries(self) -> int:
        return self.keys.shape[2]

    def total_entries(self) -> int:
        return self.max_entries * self.n_heads

    def lengths(self) -> Tensor:
        return torch.full((self.n_heads,), self.max_entries, dtype=torch.long)

    def head_sizes(self) -> tuple[int, ...]:
        return (self.max_entries,) * (self.keys.shape[0] * self.n_heads)

    def nbytes(self) -> int:
        return (self.keys.nbytes + self.values.nbytes + self.positions.nbytes
                + sum(s.nbytes for s in self.state.values()))

    def view(self) -> LayerView:
        return LayerView(self.keys, self.values, self.positions, dict(self.state), None)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, want_positions: bool) -> Block:
        n_old, old_positions = self.max_entries, self.positions
        extend(self, keys, values, positions)
        return Block(self.keys, self.values, n_old, key_positions=old_positions if want_positions else None)

    def attend(self, keys: Tensor, values: Tensor, want_positions: bool) -> Block:
        return Block(torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2), self.max_entries,
                     key_positions=self.positions if want_positions else None)

    @classmethod
    def gathered(cls, view: LayerView, index: Tensor) -> "DenseEntries":
        """The entries of a padded ``view`` at ``index`` ([B, H, k], ascending): as many per head."""
        return cls(*(gather_entries(t, index) for t in (view.keys, view.values, view.positions)),
                   {k: gather_entries(s, index) for k, s in view.state.items()})

    def drop_last(self, n: int) -> "DenseEntries":
        return DenseEntries(self.keys[:, :, :-n], self.values[:, :, :-n], self.positions[..., :-n],
                            {k: s[..., :-n] for k, s in self.state.items()})

    def newest(self, keep: int) -> "DenseEntries":
        """Each head's newest ``keep`` entries (positions ascend along the entries), copied: the
        older entries' memory is freed, and the copy may be written into a static decoder's
        buffers (`held_in`)."""
        return DenseEntries(self.keys[:, :, -keep:].clone(), self.values[:, :, -keep:].clone(),
                            self.positions[..., -keep:].clone(), {k: s[..., -keep:].clone() for k, s in self.state.items()})

    def held_in(self, room: tuple[Tensor, Tensor] | None) -> "DenseEntries":
        """These entries with their keys and values written into the front of ``room`` (a static
        decoder's lent buffers [B, H, width, d]) when they fit, so they are not held twice until
        the decoder reloads; as they are otherwise."""
        if room is None or self.keys.shape[:2] != room[0].shape[:2] or self.max_entries > room[0].shape[2]:
            return self
        n = self.max_entries
        room[0][:, :, :n].copy_(self.keys)
        room[1][:, :, :n].copy_(self.values)
        return DenseEntries(room[0][:, :, :n], room[1][:, :, :n], self.positions, self.state)
