"""Mergers: one short file per method (what becomes of evicted entries), registered by name on import."""

from . import cam, merge_on_evict  # noqa: F401 - imported to register
