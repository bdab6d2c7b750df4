"""A store layer's body: its encoded entries, their chunk table, and the operations that keep,
append and decode them (`EncodedEntries` holds one).

Each body entry records its chunk, so eviction from the body is a plain gather: nothing is
re-quantized, and chunks no entry uses any more are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..transfer import host_copy
from .store import Encoded, Store


def at_start(t: Tensor | None, buf: Tensor | None) -> bool:
    """Whether ``t`` is a view of ``buf`` that starts where it does, with its strides (a prefix
    of a larger buffer along some dims, such as a static decoder's lent views)."""
    return t is not None and buf is not None and t.data_ptr() == buf.data_ptr() and t.stride() == buf.stride()


def _new_chunk_ids(store: Store, first: int, m: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[m] chunk ids of ``m`` entries encoded together after ``first`` chunks: one per store chunk."""
    return (first + torch.arange(m, device=device) // (store.chunk or m)).to(dtype)


def chunk_dtype(n: int) -> torch.dtype:
    return torch.int16 if n < 2**15 else torch.int32


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t`` [B, H, n, ...] gathered along dim 2 with ``index`` [B, H, k]."""
    idx = index.view(*index.shape, *([1] * (t.dim() - 3))).expand(*index.shape, *t.shape[3:])
    return t.gather(2, idx)


@dataclass
class Body:
    """The encoded entries of one layer, [B, H, n] in the layer's entry order."""

    tokens: dict[str, Tensor]
    chunk_id: Tensor | None  # [B, H, n] which chunk each entry belongs to (None: no chunk data)
    chunks: dict[str, Tensor]  # [B, H, C, ...]

    def __len__(self) -> int:
        return next(iter(self.tokens.values())).shape[2]

    def nbytes(self) -> int:
        total = sum(t.nbytes for t in self.tokens.values()) + sum(t.nbytes for t in self.chunks.values())
        return total + (self.chunk_id.nbytes if self.chunk_id is not None else 0)

    def clone(self) -> "Body":
        """A copy owning its memory."""
        return self.apply(Tensor.clone)

    def apply(self, fn) -> "Body":
        """This body with ``fn`` applied to each of its tensors (a copy, a move to a device)."""
        return Body({k: fn(t) for k, t in self.tokens.items()},
                    None if self.chunk_id is None else fn(self.chunk_id),
                    {k: fn(c) for k, c in self.chunks.items()})

    def decode(self, store: Store, dtype: torch.dtype, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        return store.decode_body(self, dtype, out)

    def decode_keys(self, store: Store, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        return store.decode_body_keys(self, dtype, out)

    def per_token(self) -> dict[str, Tensor]:
        """Each entry's row of the chunk data."""
        return {k: _gather(c, self.chunk_id.long()) for k, c in self.chunks.items()} if self.chunks else {}


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


def prepend_body(body, store: Store, keys: Tensor, values: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``keys`` / ``values`` ([B, H, t, d], a full-precision tail) preceded by ``body`` decoded,
    each built in one buffer: the body is decoded straight into its front, so no body-sized
    temporary is made. ``values`` None: the keys only (a scorer that does not read values)."""
    if body is None:
        return keys, values
    n = len(body)

    def buffer(t: Tensor) -> Tensor:
        whole = t.new_empty(*t.shape[:2], n + t.shape[2], t.shape[3])
        whole[:, :, n:] = t
        return whole

    all_keys = buffer(keys)
    if values is None:
        body.decode_keys(store, keys.dtype, out=all_keys[:, :, :n])
        return all_keys, None
    all_values = buffer(values)
    body.decode(store, keys.dtype, out=(all_keys[:, :, :n], all_values[:, :, :n]))
    return all_keys, all_values


def rebuild_body(
    store: Store,
    body: Body | None,
    tail_keys: Tensor,
    tail_values: Tensor,
    index: Tensor,
    n_tail: int,
    queries: Tensor | None,
    check: Tensor | None = None,
) -> tuple[Body | None, Tensor, Tensor]:
    """Rebuild a layer from the entries at ``index`` ([B, H, k], in entry order: body entries
    first, then tail entries): the last ``n_tail`` chosen entries of every head stay in the
    full-precision tail, the others form the new body. Chosen tail entries that fall into the
    body part are encoded (heads may encode different numbers of them), chosen body entries are
    gathered as they are. ``check``: a 0-d bool the caller's assumptions hold (read in the same
    host sync as the chunk table's width). Returns (body, tail keys, tail values)."""
    rebuilt = _rebuild(store, body, tail_keys, tail_values, index, n_tail, queries, 1, check)
    (new_body,) = HostValues([rebuilt]).cut([rebuilt.body])
    return new_body, rebuilt.keys, rebuilt.values


@dataclass
class Rebuilt:
    """What `_rebuild` gives before its one host read: the body with every head's live chunks
    packed to the front of a table as wide as before the compaction, and on the device what
    `HostValues` reads: the widest head's live chunks in each row range (``widths`` [groups],
    None without chunk data) and whether the new tail took only tail entries and the caller's
    check held (``ok``, 0-d bool)."""

    body: Body | None
    keys: Tensor
    values: Tensor
    widths: Tensor | None
    ok: Tensor


def rebuild_stacked(
    store: Store, body: Body | None, tail_keys: Tensor, tail_values: Tensor, index: Tensor, n_tail: int, groups: int,
    check: Tensor | None = None,
) -> tuple[list[Body | None], Tensor, Tensor, Rebuilt]:
    """`rebuild_body` for ``groups`` layers stacked along the batch (equal rows each), the body
    split back per layer. Nothing is read on the host here: each layer's chunk table is cut to
    its own widest head by `HostValues`, which reads the widths of any number of these calls in
    one sync (so the host launches a whole compression while the GPU still runs the block before
    it). Returns the bodies, tail keys and values, and the `Rebuilt` for `HostValues`."""
    rebuilt = _rebuild(store, body, tail_keys, tail_values, index, n_tail, None, groups, check)
    if rebuilt.body is None:
        return [None] * groups, rebuilt.keys, rebuilt.values, rebuilt
    new_body = rebuilt.body
    batch = tail_keys.shape[0] // groups
    rows = [slice(i * batch, (i + 1) * batch) for i in range(groups)]
    bodies = [Body({k: t[r] for k, t in new_body.tokens.items()},
                   None if new_body.chunk_id is None else new_body.chunk_id[r],
                   {k: c[r] for k, c in new_body.chunks.items()})
              for r in rows]
    return bodies, rebuilt.keys, rebuilt.values, rebuilt


class HostValues:
    """What rebuilds left on the device (`Rebuilt`: widths, checks), copied to the host without
    waiting for them: on CUDA into pinned memory behind an event, so the host can queue more work
    (the next block's forward) before `cut` reads them; the event is then usually long passed,
    and waiting on it never leaves the GPU without queued work, as a stream sync right after the
    rebuild would."""

    def __init__(self, rebuilt: list[Rebuilt]) -> None:
        self.n = len(rebuilt)
        values = torch.cat([torch.stack([r.ok for r in rebuilt]).long(),
                            *[r.widths for r in rebuilt if r.widths is not None]])
        self.event = None
        if values.is_cuda:
            device = values.device
            values = host_copy(values)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(device))  # the copy's stream, on any GPU
        self.values = values

    def cut(self, bodies: list[Body | None]) -> list[Body | None]:
        """Check the rebuilds (raises when a new tail took an encoded entry: the caller's rule for
        the tail length did not hold, a bug, not bad input) and cut each body's chunk table to its
        widest head (``bodies`` in order, ``len(widths)`` of them per rebuild with chunk data)."""
        if self.event is not None:
            self.event.synchronize()
        values = self.values.tolist()
        if not all(values[: self.n]):
            raise RuntimeError("an encoded entry cannot return to the full-precision tail")
        widths_host = iter(values[self.n:])
        out = []
        for body in bodies:
            if body is None or body.chunk_id is None:
                out.append(body)
                continue
            w = next(widths_host)
            ids = body.chunk_id if body.chunk_id.dtype == chunk_dtype(w) else body.chunk_id.to(chunk_dtype(w))
            out.append(Body(body.tokens, ids, {k: c[:, :, :w].contiguous() for k, c in body.chunks.items()}))
        return out


def _rebuild(
    store: Store, body: Body | None, tail_keys: Tensor, tail_values: Tensor, index: Tensor, n_tail: int,
    queries: Tensor | None, groups: int, check: Tensor | None = None,
) -> Rebuilt:
    """`rebuild_body` without its host read (`Rebuilt`), ``groups`` equal row ranges."""
    b = len(body) if body is not None else 0
    k = index.shape[-1]
    n_body = k - n_tail
    tail_index = index[..., n_body:] - b
    ok = (tail_index >= 0).all()
    ok = ok if check is None else ok & check
    tail_index = tail_index.clamp(min=0)  # gathered before `ok` is read: never out of range
    new_keys, new_values = _gather(tail_keys, tail_index), _gather(tail_values, tail_index)
    if n_body == 0:
        return Rebuilt(None, new_keys, new_values, None, ok)
    chosen = index[..., :n_body]
    is_old = chosen < b
    n_old = is_old.sum(-1, keepdim=True)  # [B, H, 1]
    n_new = n_body - n_old
    # The most tail entries a head can move into the body, known on the host: the new entries are
    # encoded in that many slots per head, padding past each head's own count (the exact count
    # would need a host sync; chunks that only padding fills are dropped with the unused ones).
    width = min(n_body, tail_keys.shape[2] - n_tail)
    tokens: dict[str, Tensor] = {}
    chunk_id: Tensor | None = None
    chunks: dict[str, Tensor] = {}
    if body is not None:
        old_index = chosen.clamp(max=max(b - 1, 0))
        tokens = {name: _gather(t, old_index) for name, t in body.tokens.items()}
        chunk_id = _gather(body.chunk_id, old_index).long() if body.chunk_id is not None else None
        chunks = dict(body.chunks)
    if width > 0:
        # The new entries of each head, moved to the front: [B, H, width], padding beyond n_new.
        rank = torch.arange(width, device=index.device)
        src = chosen.gather(-1, (n_old + rank).clamp(max=n_body - 1)) - b
        valid = rank < n_new
        src = src.clamp(min=0)
        enc = store.encode(_gather(tail_keys, src), _gather(tail_values, src), valid, queries)
        # Back to slot order: slot s of a head holds its new entry number s - n_old.
        slot_rank = (torch.arange(n_body, device=index.device) - n_old).clamp(0, width - 1)
        fresh = ~is_old
        for name, t in enc.tokens.items():
            t = _gather(t, slot_rank)
            if name in tokens:
                mask = fresh.view(*fresh.shape, *([1] * (t.dim() - 3)))
                t = torch.where(mask, t, tokens[name])
            tokens[name] = t
        if enc.chunks:
            first = next(iter(chunks.values())).shape[2] if chunks else 0
            per_chunk = store.chunk or width
            new_id = first + slot_rank // per_chunk
            chunk_id = new_id if chunk_id is None else torch.where(fresh, new_id, chunk_id)
            chunks = {name: torch.cat([chunks[name], c], dim=2) if name in chunks else c for name, c in enc.chunks.items()}
    widths = None
    if chunk_id is not None:
        chunk_id, chunks, widths = _drop_unused(chunk_id, chunks, groups)
    return Rebuilt(Body(tokens, chunk_id, chunks), new_keys, new_values, widths, ok)


def append_encoded(store: Store, body: Body | None, enc: Encoded, m: int, room: Body | None = None) -> Body:
    """``body`` followed by ``m`` entries encoded together (``enc``): what `rebuild_body` gives
    when every entry is kept and the tail's oldest ``m`` move into the body (a flush), without
    gathering the old body again. The old chunk table is compact (`_drop_unused` ran when it was
    built) and no entry leaves, so the new chunks just follow the old ones. The result owns its
    memory (``enc`` may be a slice of a larger batch), or, with ``room`` (buffers of a larger
    capacity that ``body`` is the start of: a static decoder's, `kvbudget.static_store`), is a
    longer view of ``room`` with the new entries written in place."""
    grown = _append_in_place(store, body, enc, m, room) if room is not None and body is not None else None
    if grown is not None:
        return grown

    def join(old: dict[str, Tensor] | None, new: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: t.clone() if old is None else torch.cat([old[k], t], dim=2) for k, t in new.items()}

    tokens = join(body.tokens if body is not None else None, enc.tokens)
    if not enc.chunks:
        return Body(tokens, None, {})
    first = 0 if body is None else next(iter(body.chunks.values())).shape[2]
    chunks = join(body.chunks if body is not None else None, enc.chunks)
    total = next(iter(chunks.values())).shape[2]
    b, h = next(iter(tokens.values())).shape[:2]
    device = next(iter(tokens.values())).device
    dtype = chunk_dtype(total)
    new_id = _new_chunk_ids(store, first, m, device, dtype).expand(b, h, m)
    chunk_id = new_id.contiguous() if body is None else torch.cat([body.chunk_id.to(dtype), new_id], dim=2)
    return Body(tokens, chunk_id, chunks)


def _append_in_place(store: Store, body: Body, enc: Encoded, m: int, room: Body) -> Body | None:
    """`append_encoded` into ``room``, or None when ``body`` does not lie at its start or the
    grown body would not fit. A flush while a static decoder holds the body then needs no copy of
    the whole body (with every layer flushed before the decoder reloads, those copies were a
    second cache at once)."""
    n, first = len(body), next(iter(body.chunks.values())).shape[2] if body.chunks else 0
    c = next(iter(enc.chunks.values())).shape[2] if enc.chunks else 0
    pairs = [(body.tokens[k], room.tokens.get(k)) for k in enc.tokens]
    pairs += [(body.chunks.get(k), room.chunks.get(k)) for k in enc.chunks]
    if enc.chunks:
        if body.chunk_id is None or room.chunk_id is None or room.chunk_id.dtype != chunk_dtype(first + c):
            return None
        pairs.append((body.chunk_id, room.chunk_id))
    if not all(at_start(part, buf) for part, buf in pairs):
        return None
    if n + m > len(room) or (enc.chunks and first + c > next(iter(room.chunks.values())).shape[2]):
        return None
    for k, t in enc.tokens.items():
        room.tokens[k][:, :, n : n + m].copy_(t)
    if not enc.chunks:
        return Body({k: t[:, :, : n + m] for k, t in room.tokens.items()}, None, {})
    for k, t in enc.chunks.items():
        room.chunks[k][:, :, first : first + c].copy_(t)
    ids = _new_chunk_ids(store, first, m, room.chunk_id.device, room.chunk_id.dtype)
    room.chunk_id[:, :, n : n + m].copy_(ids.expand_as(room.chunk_id[:, :, n : n + m]))
    return Body({k: t[:, :, : n + m] for k, t in room.tokens.items()}, room.chunk_id[:, :, : n + m],
                {k: t[:, :, : first + c] for k, t in room.chunks.items()})


def _drop_unused(chunk_id: Tensor, chunks: dict[str, Tensor], groups: int = 1) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """Free the chunks no entry refers to any more, head by head: each head's live chunks are
    packed to the front of its table, in order (heads evict independently, so a chunk often
    lives on in one head only). The table keeps its width here; `HostValues.cut` cuts it to the
    widest head of each of ``groups`` equal batch row ranges (stacked layers), returned [groups]
    on the device, so that a layer's table does not depend on which layers it was batched with."""
    ids = chunk_id.long()
    n = next(iter(chunks.values())).shape[2]
    used = torch.zeros(*ids.shape[:2], n, dtype=torch.bool, device=ids.device)
    used.scatter_(2, ids, True)
    widths = used.sum(-1).reshape(groups, -1).amax(-1)
    remap = used.long().cumsum(-1) - 1  # [B, H, C]: new slot of each live chunk
    ids = remap.gather(2, ids)
    live = (~used).to(torch.uint8).argsort(dim=-1, stable=True)  # live ones first, in order
    chunks = {name: _gather(c, live) for name, c in chunks.items()}
    # The ids' dtype follows the width, which is at most n: int16 is known here when n is small
    # (one conversion for all stacked layers, none per layer in `HostValues.cut`).
    return (ids.to(torch.int16) if n < 2**15 else ids), chunks, widths
