"""`LayerSnapshot`: a layer's state taken before a compression inside `BudgetedCache.scratch`,
restored at the end of the block (evicted or encoded entries cannot be dropped-last back)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor

from ..transfer import host_copy
from .body import BodyPrefix
from .encoded import EncodedEntries
from .layer import BudgetedLayer


@dataclass
class LayerSnapshot:
    """What `restore` puts back: the layer's attributes but its observed queries (queries observed
    since the snapshot stay)."""

    attrs: dict

    @classmethod
    def of(cls, layer: BudgetedLayer, appends_only: bool = False, host: bool = False) -> "LayerSnapshot":
        """``layer``'s state. Tensors borrowed from a static decoder are copied: the decoder
        overwrites its buffers at its next reload. ``appends_only``: the body is kept as its
        length (`BodyPrefix`), taken back from the body there is at the end. ``host``: the
        entries are copied to host memory (`host_copy`), so the snapshot takes no GPU memory
        while the block runs; `restore` moves them back."""
        attrs = dict(vars(layer))
        del attrs["observed"]
        # A copy of the entries object: appends after the snapshot reassign the layer's fields.
        entries = copy.copy(layer.entries)
        body = getattr(entries, "body", None)
        if appends_only and body is not None:
            entries = EncodedEntries(**{**vars(entries), "body": BodyPrefix.of(body)})
        if entries is not None and (layer.borrowed or host):
            entries = entries.apply(host_copy if host else Tensor.clone)  # a BodyPrefix is not copied
            attrs["borrowed"], attrs["room"] = False, None
        attrs["entries"] = entries
        return cls(attrs)

    def restore(self, layer: BudgetedLayer) -> None:
        """Put ``layer`` back to this snapshot."""
        body = getattr(layer.entries, "body", None)
        vars(layer).update(self.attrs)
        entries = layer.entries
        if entries is not None and entries.positions.device != layer.device:  # a snapshot held on the host
            entries = entries.apply(lambda t: t.to(layer.device, non_blocking=True))
        if isinstance(getattr(entries, "body", None), BodyPrefix):
            entries = EncodedEntries(**{**vars(entries), "body": entries.body.taken_from(body)})
        layer.entries = entries
