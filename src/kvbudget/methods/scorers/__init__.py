"""Scorers: one short file per method (which entries matter), registered by name on import."""

from . import (  # noqa: F401 - imported to register
    a2sf,
    epicache,
    full,
    h2o,
    keydiff,
    knorm,
    kvzip,
    lazy,
    random,
    scissorhands,
    snapkv,
    streaming,
    tova,
)
