"""The KV cache: layers by storage layout (dense, ragged, encoded), `BudgetedCache` (a
transformers `Cache`), and the attention hook where the cache meets the model."""

from .cache import BudgetedCache
from .hook import attach
from .layer import BudgetedLayer

__all__ = ["BudgetedCache", "BudgetedLayer", "attach"]
