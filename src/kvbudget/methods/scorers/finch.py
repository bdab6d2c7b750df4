"""FINCH (Corallo & Papotti 2024, "FINCH: Prompt-guided Key-Value Cache Compression"):
query-aware. The document goes through the model chunk by chunk; after each chunk the prompt's
(the question's) queries score the cache and only the top entries stay.

Block-wise prefill in query-aware mode is that loop: after each block the question runs as
scoring queries (their KV discarded), and this scorer ranks the cached entries by the attention
those queries give them, each query's row multiplied by the number of entries it sees (FINCH's
normalisation, which makes rows over different numbers of keys comparable), averaged over the
queries and the query heads of each KV head. Report it as OPTIMISTIC (`--mode query-aware`):
the question is known while the context is compressed.

What differs from `snapkv` in that mode: every query of the prompt scores (not the last 32), no
max-pooling, and the per-row normalisation. Without a question (multi-turn and multi-request
modes) the queries are those of the tokens fed since the last compression. The paper also
re-rotates the kept keys to contiguous positions; here they keep their original positions (the
project's rule).
"""

from torch import Tensor

from ...compress import Observation, Scorer, register


@register("finch")
class Finch(Scorer):
    paper = "FINCH (Corallo & Papotti 2024)"
    summary = "query-aware (OPTIMISTIC): the prompt's attention, rows scaled by keys seen, after each block"
    queries = -1

    def score(self, obs: Observation) -> Tensor:
        held = obs.positions >= 0 if obs.valid is None else obs.valid
        qpos = obs.query_positions.to(obs.positions.device)
        scores = obs.zeros()
        m = 0
        for start, attn in obs.attention_chunks():  # [B, H, mc, n]
            mc = attn.shape[2]
            seen = (held[:, :, None, :] & (obs.positions[:, :, None, :] <= qpos[start : start + mc, None])).sum(-1)
            scores += (attn * seen[..., None]).sum(2)
            m += mc
        return scores / max(m, 1)
