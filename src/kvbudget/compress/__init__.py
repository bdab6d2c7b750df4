"""The compression engine and what a method plugs into it.

A method is a `Scorer` (one `score`, registered with `register`); a `Policy` composes a scorer
with an allocator, a store and a budget; `compress` applies a policy to a cache.
"""

from .engine import compress
from .observation import Observation
from .policy import Policy
from .scorer import PRESETS, SCORERS, Scorer, register

__all__ = ["PRESETS", "SCORERS", "Observation", "Policy", "Scorer", "compress", "register"]
