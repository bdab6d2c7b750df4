"""How kvbudget calls a transformers model with its cache.

transformers 5.x renames the forward argument ``past_key_values`` to ``cache``; the old name
still works in the releases between, with a FutureWarning on every call. Which name a model
takes is read from its forward's signature (once per model class), so the cache goes under the
name the installed transformers expects.
"""

from __future__ import annotations

import functools
import inspect

from torch import Tensor

from ..errors import UnsupportedModelError
from ..kv.cache import BudgetedCache
from ..kv.plan import check_taken, discard_plan


@functools.cache
def _cache_argument(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes a cache: ``cache`` or ``past_key_values``."""
    return _cache_argument(type(model))


def run(model, cache, input_ids: Tensor, **kwargs):
    """``model(input_ids, <cache>=cache, use_cache=True, **kwargs)`` under the right argument
    name; then checks that the model fed a `BudgetedCache` the tokens and that every layer's
    attention took its plan (`kv.plan.check_taken`): a model that bypasses either raises
    `UnsupportedModelError` instead of silently keeping every entry."""
    name = cache_argument(model)
    before = cache.get_seq_length() if isinstance(cache, BudgetedCache) else None
    try:
        out = model(input_ids=input_ids, use_cache=True, **{name: cache}, **kwargs)
    except BaseException:
        discard_plan()
        raise
    check_taken()
    if before is not None and cache.get_seq_length() != before + input_ids.shape[1]:
        raise UnsupportedModelError(
            f"{model.config.model_type}: the model did not store its keys and values in the cache handed "
            f"to it as '{name}' (kvbudget's cache must be the one its attention layers update)"
        )
    return out
