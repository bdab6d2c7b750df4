"""The encoded layout: a store's body (older entries, encoded: `kv.body`) followed by a dense
full-precision tail, where new tokens are appended. Every head holds as many entries (a store
needs it), so the layout is dense: ``positions`` and ``state`` ``[B, H, n]`` cover the body's
entries, then the tail's.

A flush moves the tail's entries older than the residual window into the body, in whole chunks
of the store (KIVI quantizes a group once it is full); an eviction keeps entries of both parts
and rebuilds the body (`body.rebuild_body`): kept body entries are gathered as they are, kept
tail entries that leave the residual window are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .body import Body, append_encoded, prepend_body, rebuild_body
from .entries import Block, Entries, LayerView, extend, gather_entries
from .store import Encoded, Store


@dataclass
class EncodedEntries(Entries):
    store: Store
    body: Body | None
    keys: Tensor  # [B, H, t, d]: the tail
    values: Tensor  # [B, H, t, dv]
    positions: Tensor  # [B, H, n_body + t]
    state: dict[str, Tensor]  # name -> [B, H, n_body + t]

    @property
    def n_body(self) -> int:
        return len(self.body) if self.body is not None else 0

    @property
    def n_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def max_entries(self) -> int:
        return self.n_body + self.keys.shape[2]

    def total_entries(self) -> int:
        return self.max_entries * self.n_heads

    def lengths(self) -> Tensor:
        return torch.full((self.n_heads,), self.max_entries, dtype=torch.long)

    def head_sizes(self) -> tuple[int, ...]:
        return (self.max_entries,) * (self.keys.shape[0] * self.n_heads)

    def nbytes(self) -> int:
        total = self.keys.nbytes + self.values.nbytes + self.positions.nbytes
        total += sum(s.nbytes for s in self.state.values())
        return total + (self.body.nbytes() if self.body is not None else 0)

    def decoded(self, keys: Tensor, values: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``keys`` / ``values`` (the tail's, or the tail's with new tokens) preceded by the
        decoded body (``values`` None: the keys only)."""
        return prepend_body(self.body, self.store, keys, values)

    def view(self) -> LayerView:
        keys, values = self.decoded(self.keys, self.values)
        return LayerView(keys, values, self.positions, dict(self.state), None)

    def tail_view(self) -> LayerView:
        """The full-precision tail only (nothing decoded)."""
        b = self.n_body
        return LayerView(self.keys, self.values, self.positions[..., b:], {k: s[..., b:] for k, s in self.state.items()},
                         None)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor, want_positions: bool,
               decode: bool = True) -> Block:
        """As `Entries.append`; ``decode`` False: the block holds the tail only (a decode step that
        attends to the body as stored, `cache.BodyPlan`)."""
        n_old, old_positions = self.max_entries, self.positions
        extend(self, keys, values, positions)
        all_keys, all_values = self.decoded(self.keys, self.values) if decode else (self.keys, self.values)
        return Block(all_keys, all_values, n_old, key_positions=old_positions if want_positions else None)

    def attend(self, keys: Tensor, values: Tensor, want_positions: bool) -> Block:
        old_keys, old_values = self.decoded(self.keys, self.values)
        return Block(torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2), old_keys.shape[2],
                     key_positions=self.positions if want_positions else None)

    def tail_kept(self, kept_positions: Tensor, seen: int, residual: int, phantom: int,
                  groups: int = 1) -> tuple[int, Tensor | None]:
        """How many of the entries an eviction keeps (``kept_positions`` [B, H, k]) stay in the
        full-precision tail: those of the residual window (positions >= seen - residual), the
        fewest over the heads. Returns it as a Python int, and a 0-d bool on the device that says
        it was right (None when it was read from the device, which is then exact). ``groups``:
        layers alike stacked along the batch, each checked; ``phantom``: tokens attended but
        not stored since the last compression.

        Without phantom tokens the count is known on the host: positions ascend along the
        entries, the newest is ``seen - 1``, and every eviction keeps the positions of its
        protected window, which holds the residual window (`Policy.residual`), so the residual
        window's positions are all held and are the last entries: ``min(residual, tail)`` of them.
        The device check catches a history that broke this (read with the rebuild's other values
        in one host sync, `body.HostValues`), so the GPU never waits for the host here."""
        recent = (kept_positions >= seen - residual).sum(-1).reshape(groups, -1).amin(-1)
        if phantom == 0:
            n = min(residual, self.keys.shape[2])
            return n, (recent == n).all()
        if groups != 1:
            raise ValueError("stacked layers need their tail length known on the host (no phantom tokens)")
        return int(recent), None

    def rebuilt(self, index: Tensor, n_tail: int, state: dict[str, Tensor] | None, queries: Tensor | None,
                check: Tensor | None = None) -> "EncodedEntries":
        """The entries at ``index`` ([B, H, k], body entries first): the last ``n_tail`` of each
        head stay in full precision, the rest are held encoded. ``state``: per-entry state
        updated by a scorer (default: these entries'); ``queries``: the layer's observed queries
        (a store may read them); ``check``: a 0-d bool the caller's rule for ``n_tail`` held."""
        state = self.state if state is None else state
        body, keys, values = rebuild_body(self.store, self.body, self.keys, self.values, index, n_tail, queries, check)
        return EncodedEntries(self.store, body, keys, values, self.positions.gather(2, index),
                              {k: gather_entries(s, index) for k, s in state.items()})

    def flushed(self, enc: Encoded, older: int, room: Body | None = None) -> "EncodedEntries":
        """The tail's ``older`` oldest entries moved, encoded as ``enc``, to the end of the body.
        Every entry keeps its place, so positions and state do not move (a rebuild would gather
        the whole body again at every flush). ``room``: a static decoder's body buffers that
        the body is the start of (the new entries are written there)."""
        body = append_encoded(self.store, self.body, enc, older, room)
        return EncodedEntries(self.store, body, self.keys[:, :, older:], self.values[:, :, older:], self.positions,
                              self.state)

    def older_in_tail(self, seen: int, residual: int) -> Tensor | int:
        """The fewest tail entries older than the residual window over the heads: a Python int
        when known on the host (no tail, or every token seen still held), else a 0-d device
        tensor (read it with the other layers' in one sync: `flush_layers`)."""
        tail = self.keys.shape[2]
        if not tail:
            return 0
        if self.max_entries == seen:
            # Every token seen is held (nothing evicted, nothing transient), so the positions are
            # 0 .. seen-1 in order and the tail's are its last ones: known without reading them.
            # A KIVI prefill's flushes then need no host sync, and the host launches them while
            # the GPU still runs the block.
            return min(max(tail - residual, 0), tail)
        return (self.positions[..., -tail:] < seen - residual).sum(-1).min()

    def whole_chunks(self, older: Tensor | int) -> int:
        """``older`` (`older_in_tail`) cut to whole chunks of the store: what a flush encodes."""
        older = int(older)
        if self.store.chunk:
            older -= older % self.store.chunk
        return max(older, 0)

    def drop_last(self, n: int) -> "EncodedEntries":
        if n > self.keys.shape[2]:
            raise RuntimeError("cannot drop entries that were already encoded by the store")
        return EncodedEntries(self.store, self.body, self.keys[:, :, :-n], self.values[:, :, :-n],
                              self.positions[..., :-n], {k: s[..., :-n] for k, s in self.state.items()})
