"""`BatchCache`: the budgeted caches of several sessions as one transformers `Cache`, so that one
forward decodes a token for each of them, or feeds each a block of its own length (right-padded
to the longest: a row's padding goes to no cache and is attended by nothing).

Row ``i`` of the batch is one session with its own `BudgetedCache`: its own policy, budget,
store, length and per-head lengths. The model's projections, MLPs and head run once over the
batch; at each attention layer `BatchLayer.update` appends every row's new token to that row's
own `BudgetedLayer` (which makes the row's attention plan, as a forward of the session alone
would) and hands the attention hook a `RowPlans`, with which it attends each row with its own
plan (`kv.hook`). Nothing is copied between the sessions' caches: a session joins or leaves a
batch by being in the list of the next step or not.
"""

from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache import BudgetedCache
from .layer import BudgetedLayer
from .plan import RowPlans, set_plan, take_plan


class BatchLayer(CacheLayerMixin):
    """One attention layer of a batch: each row's new tokens go to that row's own layer."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, rows: list[BudgetedLayer], lengths: list[int]) -> None:
        super().__init__()
        self.rows = rows
        self.lengths = lengths
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # pragma: no cover
        raise RuntimeError("a BatchLayer is built from the rows' layers")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append row ``i`` of ``key_states`` / ``value_states`` ``[B, H, q, d]`` (its first
        ``lengths[i]`` tokens) to the ``i``-th layer; the attention call gets every row's plan,
        keys and values."""
        rows = []
        for i, (layer, n) in enumerate(zip(self.rows, self.lengths)):
            keys, values = layer.update(key_states[i : i + 1, :, :n], value_states[i : i + 1, :, :n])
            rows.append((take_plan(keys), keys, values))
        set_plan(RowPlans(key_states, rows, self.lengths))
        return key_states, value_states

    def get_seq_length(self) -> int:  # positions are passed explicitly, per row
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # the hook masks each row by its plan
        return max(layer.max_entries for layer in self.rows) + query_length, 0

    def get_max_length(self) -> int:
        return -1


class BatchCache(Cache):
    """Several sessions' caches, one per batch row, for one forward (see the module docstring)."""

    def __init__(self, caches: list[BudgetedCache], lengths: list[int] | None = None) -> None:
        """``lengths``: each row's new tokens in the forward (default: one each, decoding)."""
        if not caches:
            raise ValueError("a batch needs at least one cache")
        n = len(caches[0].layers)
        if any(len(c.layers) != n for c in caches):
            raise ValueError("every cache of a batch must belong to the same model")
        lengths = [1] * len(caches) if lengths is None else list(lengths)
        if len(lengths) != len(caches) or min(lengths) < 1:
            raise ValueError("one length of at least one token per cache")
        super().__init__(layers=[BatchLayer([c.layers[i] for c in caches], lengths) for i in range(n)])
        self.caches = caches

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
