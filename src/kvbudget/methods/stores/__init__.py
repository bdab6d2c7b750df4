"""Stores: one short file per method (how kept entries are held), registered by name on import."""

from . import kivi, mikv, minicache, rotate, think  # noqa: F401 - imported to register
