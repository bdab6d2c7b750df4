"""Reaching a Ray cluster: the optional import, and joining (or starting) a cluster."""

from __future__ import annotations

import logging

from ..errors import KVBudgetError

INSTALL = "pip install 'kvbudget[ray]'"


def require_ray(what: str = "this command"):
    """The ``ray`` module; a `KVBudgetError` saying what to install where Ray is missing."""
    try:
        import ray
    except ImportError:
        raise KVBudgetError(f"{what} needs Ray: {INSTALL}") from None
    return ray


def connect(address: str | None, what: str = "this command") -> bool:
    """Join the Ray cluster at ``address`` ("auto": the one this machine belongs to), or start a
    local one (None or ""); True if this call started it (the caller then shuts it down). A
    process already connected stays on its cluster. The workers of a local cluster inherit this
    process's environment (its ``PYTHONPATH`` and so its kvbudget); every node of another
    cluster needs kvbudget installed."""
    ray = require_ray(what)
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise KVBudgetError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
    return True
