"""DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads"): a few *retrieval* heads need the whole context; the others are
*streaming* heads, which attend almost only to the first tokens (sinks) and the most recent ones,
so they keep only those.

The paper learns a gate per KV head (kvpress downloads them for six models); here the split is
estimated from the context, nothing downloaded. At a layer's first compression over its budget,
each KV head's streaming mass is the attention its last ``window`` (32) queries, averaged over the
head's query group, give to the entries a streaming head would keep; the heads with the largest
mass stream. The pattern is then fixed, as the paper's is for a model: it is kept as per-entry
state (+1 on a streaming head's entries, -1 on a retrieval head's; 4 bytes an entry, counted), so
it survives session save/load, rollbacks and the batching engine.

``streaming`` (0.5, the paper's share for GQA models, 0.75 for MHA ones; kvpress's
head_compression_ratio, default 0) is the share of streaming heads. The paper and kvpress rank the heads of all layers
together; a scorer sees one layer, so layer l gets floor(s H (l+1)) - floor(s H l) of its H heads
and the model's share is exact even where s H is not whole (the default model, 3 KV heads: layers
alternate 1 and 2 streaming heads).

A streaming head keeps ``sinks`` (128) + ``recent`` (256) entries (the released patterns' config,
and kvpress's on-the-fly values), both scaled down to at most half the layer's average per-head
budget so that the retrieval heads always hold more than the average, and never fewer recent than
the protected window every head keeps. It scores +inf there and -inf elsewhere; a retrieval head
scores as SnapKV. So `duo` is this scorer + the head-adaptive allocation, no core change: the
heads share the layer's budget (Ada-KV's one top-k over the layer,
`compress.select.pick_across_heads`): streaming heads hold exactly their sinks + recent, retrieval
heads the rest of the budget by SnapKV score, or all they have where it fits; the layer is stored
ragged, so its bytes are the entries held. Unlike the paper, a context under the budget is kept
whole (no head streams before its layer is over budget), and a hard budget binds the retrieval
heads too.
"""

import math

import torch
from torch import Tensor

from ...compress import Observation, register
from ...errors import KVBudgetError
from .snapkv import SnapKV


@register("duo")
class DuoAttention(SnapKV):
    paper = "DuoAttention (Xiao et al. 2024)"
    summary = "heads split on the fly: streaming heads keep sinks + recent, retrieval heads the rest (ragged)"
    state_names = ("duo",)
    # The heads share the layer's budget (per-head lengths differ), with any layer allocator.
    default_allocator, default_heads = "head-adaptive", "adaptive"
    stackable = False  # the number of streaming heads depends on the layer's index

    def __init__(self, window: int = 32, streaming: float = 0.5, sinks: int = 128, recent: int = 256) -> None:
        super().__init__(window)
        if not 0 <= streaming <= 1 or sinks < 0 or recent < 1:
            raise KVBudgetError(f"duo: need 0 <= streaming <= 1, sinks >= 0, recent >= 1; got {streaming}, {sinks}, {recent}")
        self.streaming, self.sinks, self.recent = streaming, sinks, recent

    def sizes(self, budget: int) -> tuple[int, int]:
        """(sinks, recent) a streaming head keeps at a per-head ``budget``."""
        cap = max(budget // 2, 1)
        sinks, recent = self.sinks, self.recent
        if sinks + recent > cap:
            sinks = sinks * cap // (sinks + recent)
            recent = cap - sinks
        return sinks, max(recent, min(self.window, budget // 2))

    def quota(self, layer: int, heads: int) -> int:
        """Streaming heads of budgeted layer ``layer`` (of ``heads`` KV heads)."""
        share = self.streaming * heads
        return math.floor(share * (layer + 1) + 1e-9) - math.floor(share * layer + 1e-9)

    def split(self, obs: Observation, kept: Tensor) -> Tensor:
        """[B, H] bool: the heads that stream, from the window's attention on ``kept`` [B, H, n]."""
        mass = (obs.attention * kept[:, :, None]).sum(-1).mean(-1)  # [B, H]
        top = mass.topk(self.quota(obs.layer_idx, mass.shape[1]), dim=-1).indices
        return torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)

    def score(self, obs: Observation) -> Tensor:
        sinks, recent = self.sizes(obs.budget)
        kept = (obs.positions >= 0) & ((obs.positions < sinks) | (obs.positions >= obs.seen - recent))
        if obs.valid is not None:
            kept = kept & obs.valid
        verdict = obs.state.get("duo", obs.zeros())
        decided = (verdict != 0).flatten(1).any(-1)  # [B]
        streams = verdict.amax(-1) > 0  # [B, H]
        fresh = ~decided & (obs.positions.shape[-1] > obs.budget)
        if not (decided | fresh).any():  # under its budget, undecided: nothing to score yet
            obs.state["duo"] = verdict
            return verdict
        if fresh.any():
            streams = torch.where(fresh[:, None], self.split(obs, kept), streams)
            decided = decided | fresh
        mark = torch.where(streams, 1.0, -1.0) * decided[:, None]
        obs.state["duo"] = mark[:, :, None].expand(obs.positions.shape).contiguous()
        streaming = torch.where(kept, torch.inf, -torch.inf)
        return torch.where((streams & decided[:, None])[:, :, None], streaming, super().score(obs))
