"""`Scorer`: one KV-cache method's notion of importance, and the registry of scorers.

A method file (`methods/scorers/*.py`) subclasses `Scorer`, overrides `score` and registers
itself with `register`; the top-k, the protected window, order, positions and byte accounting
live in the engine and the cache, never in a scorer.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .observation import Observation


class Scorer:
    """One KV-cache method's notion of importance. Subclasses override `score` only."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    saves: ClassVar[str] = "tokens (evicted entries are freed)"
    # Which observed queries `score` needs: 0 none, k > 0 the latest k, -1 every query since the
    # last compression (accumulating scorers such as H2O).
    queries: ClassVar[int] = 0
    # Names of per-entry float state kept by the cache between compressions.
    state_names: ClassVar[tuple[str, ...]] = ()
    # Those of them that hold positions: key re-rotation moves them with the entries.
    position_state: ClassVar[tuple[str, ...]] = ()
    evicts: ClassVar[bool] = True
    # Decode-time compression interval this method prefers (LazyEviction's lag); None: the policy's.
    decode_interval: int | None = None
    # Whether `score` treats the batch dimension as independent rows, so that the layers of a
    # cache can be scored together, stacked along it (`Policy.compress`). A scorer that depends
    # on the layer (its index, a per-layer seed) sets this to False.
    stackable: ClassVar[bool] = True
    # Whether layers of different budgets and entry counts (PyramidKV) can be scored together:
    # stacked padded to the longest, padding at the end of each row and marked by `obs.valid`,
    # `obs.budget` the largest of their budgets. False for a scorer that reads `obs.budget` or
    # whose scores of real entries would change with padding beyond the attention's masking
    # (a mean over entries sums in a different order).
    stackable_padded: ClassVar[bool] = True
    # Whether `score` reads `obs.values`; when it does not, layers stacked padded are scored
    # without their values stacked (`Observation.values` is None there: a copy saved).
    reads_values: ClassVar[bool] = False

    def __init__(self, window: int = 32) -> None:
        self.window = window

    @property
    def needs_attention(self) -> bool:
        return self.queries != 0

    def score(self, obs: Observation) -> Tensor:
        """[B, H, n] importance per entry: higher = keep."""
        raise NotImplementedError

    def reconstruction_ids(self, fed: Tensor, tokenizer) -> Tensor | None:
        """Tokens to run (and forget) before scoring, given the tokens ``fed`` ([1, t]) since the
        last compression and the model's tokenizer; their queries are what `score` observes.
        None: score with the queries of the fed tokens themselves (or the question's, in
        query-aware mode)."""
        return None


SCORERS: dict[str, type[Scorer]] = {}
# Named combinations: pyramidkv = snapkv scores with the pyramid allocator, adakv = with head-adaptive.
PRESETS: dict[str, tuple[str, dict]] = {}


def register(name: str):
    """Class decorator: make a scorer available as ``kb.policy(name)``."""

    def deco(cls: type[Scorer]) -> type[Scorer]:
        cls.name = name
        SCORERS[name] = cls
        return cls

    return deco
