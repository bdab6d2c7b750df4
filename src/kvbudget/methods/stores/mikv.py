"""MiKV — "No Token Left Behind" (Yang et al. 2024): mixed-precision KV instead of eviction.

The scorer (H2O's accumulated attention by default) picks the important entries, which stay in
full precision; the entries it would have evicted are kept at low precision (2 bits) instead of
dropped, so a later question can still find them. Outlier channels of the keys are handled by
per-channel scaling: demoted keys are quantized per channel (a scale and zero point per channel,
shared by a group of 32 demoted tokens), values per token — KIVI's encoding, reused. Entries
demoted once stay at low precision (their full-precision values are gone).

Measured on the default model (docs/benchmarks.md), per-channel key scales give about half the
attention error of dividing channels by their maximum and then quantizing per token.
"""

from ...kv.store import register_store
from .kivi import KIVI


@register_store("mikv")
class MiKV(KIVI):
    paper = "MiKV (Yang et al. 2024)"
    summary = "entries a scorer would evict kept at 2 bits; important ones at full precision"
    saves = "bits of unimportant entries (16 -> 2), nothing dropped"
    demotes = True
    fused_decode = False  # its body mixes demoted entries: decoded by `decode`, not the kernel
    default_scorer = "h2o"

    def __init__(self, bits: int = 2, group: int = 32) -> None:
        super().__init__(bits=bits, group=group, residual=0)

    def describe(self) -> str:
        return f"mikv{self.bits}"
