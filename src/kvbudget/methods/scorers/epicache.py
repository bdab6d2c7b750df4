"""EpiCache (Kim et al. 2025): the policy side of episodic caches (the rest is `episodic.py`).

Scores are SnapKV's — attention summed over the scoring queries, max-pooled (kernel 7) — but the
scoring queries are the episode's *patched prompt* (its medoid windows), run after every block
and discarded, instead of the block's own tail. Layer budgets come from the `sensitivity`
allocator (profiled per model, sharpness ``alpha``); within a layer the heads share the budget
(Ada-KV style, ``heads="adaptive"``, the paper's default) unless ``heads="uniform"``.
`kb.Session` with this policy becomes an `EpisodicSession`.

``prompt_share``: the patched prompts together hold at most this share of the context's tokens
(each cut at its end by the same factor). Their forward is the main cost beyond one block-wise
prefill; in a long conversation the medoid windows are a small part of it and nothing is cut.
"""

from ...compress import register
from ...errors import KVBudgetError
from .snapkv import SnapKV


@register("epicache")
class EpiCache(SnapKV):
    paper = "EpiCache (Kim et al. 2025)"
    summary = "per-episode caches scored by the episode's medoid windows; questions routed by centroid"
    episodic = True
    default_allocator = "sensitivity"
    default_heads = "adaptive"

    def __init__(self, window: int = 32, episodes: int = 4, medoids: int = 4, conv_window: int = 4,
                 embedder: str = "minilm", kernel: int = 7, prompt_share: float = 0.25) -> None:
        super().__init__(window, kernel)
        if not 0 < prompt_share <= 1:
            raise KVBudgetError(f"epicache: prompt_share must be in (0, 1], got {prompt_share}")
        self.queries = -1  # every query of the patched prompt
        self.episodes, self.medoids, self.conv_window, self.embedder = episodes, medoids, conv_window, embedder
        self.prompt_share = prompt_share
