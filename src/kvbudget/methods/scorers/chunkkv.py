"""ChunkKV (Liu et al. 2025, "ChunkKV: Semantic-Preserving KV Cache Compression"): tokens are
kept in whole chunks, so that what survives reads as phrases rather than scattered tokens.

A base scorer (window attention, SnapKV's, by default) scores the entries; a token's score is
summed over the KV heads of the layer, and a chunk (``chunk`` consecutive positions, by original
position, so chunks stay put across blocks) scores the mean over its tokens. The scores
returned make that choice through the shared per-head top-k: chunks are ranked by their score
and each token scores its chunk's rank, then its rank inside the chunk, so every head keeps the
same whole chunks, best first, and the budget's last slots go to the best tokens of the next
chunk (the paper keeps a whole number of chunks, below the budget).

``chunkkv-entropy`` (the peer library's EntropyGatedChunkKV): chunk size 10; a chunk that is
important (score at or above the median chunk's) but *spiky* (the normalised entropy of its
token scores below the median) keeps only its best ``low`` (4) tokens in its turn; the slots
this frees go to further chunks, and what is left at the end to the best remaining tokens.
"""

import math

import torch
from torch import Tensor

from ...compress import SCORERS, Observation, Scorer, register
from ...errors import KVBudgetError, UnknownPolicyError


@register("chunkkv")
class ChunkKV(Scorer):
    paper = "ChunkKV (Liu et al. 2025)"
    summary = "whole chunks of 20 tokens kept, ranked by their mean window attention (heads summed)"

    def __init__(self, window: int = 32, base: str = "snapkv", chunk: int = 20) -> None:
        super().__init__(window)
        if base not in SCORERS or base in ("chunkkv", "chunkkv-entropy", "full"):
            raise UnknownPolicyError(f"{self.name}: unknown base scorer '{base}'")
        if chunk < 1:
            raise KVBudgetError(f"{self.name}: chunk must be >= 1, got {chunk}")
        self.base = SCORERS[base](window=window)
        self.queries, self.state_names = self.base.queries, self.base.state_names
        self.position_state = self.base.position_state
        self.stackable, self.reads_values = self.base.stackable, self.base.reads_values
        self.stackable_padded = self.base.stackable_padded
        self.chunk = chunk

    def reconstruction_ids(self, fed: Tensor, tokenizer) -> Tensor | None:
        return self.base.reconstruction_ids(fed, tokenizer)

    def score(self, obs: Observation) -> Tensor:
        base = self.base.score(obs).float()
        b = base.shape[0]
        held = obs.positions >= 0
        if obs.valid is not None:
            held = held & obs.valid
        # Per position (shared by the heads): the base score summed over the heads holding it.
        slot = torch.where(held, obs.positions, obs.seen).long().flatten(1)  # padding -> a spare slot
        token = base.new_zeros(b, obs.seen + 1).scatter_add_(1, slot, torch.where(held & base.isfinite(), base, 0).flatten(1))
        present = base.new_zeros(b, obs.seen + 1).scatter_add_(1, slot, held.float().flatten(1))[:, :-1] > 0
        token = token[:, :-1]
        priority = self.priority(token, present)
        return priority.gather(1, slot.clamp(max=obs.seen - 1)).view_as(base)

    def priority(self, token: Tensor, present: Tensor) -> Tensor:
        """[B, P] per position: chunks in order of their mean token score, inside a chunk tokens
        in order of their score (higher = kept first)."""
        chunk_mean, _ = self._chunks(token, present)
        return self._order(token, present, chunk_mean)[0]

    def _chunks(self, token: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Each chunk's mean token score [B, C] (-inf: no token held) and each position's chunk [P]."""
        b, p = token.shape
        cid = torch.arange(p, device=token.device) // self.chunk
        c = (p + self.chunk - 1) // self.chunk
        total = token.new_zeros(b, c).index_add_(1, cid, torch.where(present, token, 0))
        count = token.new_zeros(b, c).index_add_(1, cid, present.float())
        return torch.where(count > 0, total / count.clamp(min=1), float("-inf")), cid

    def _order(self, token: Tensor, present: Tensor, chunk_mean: Tensor) -> tuple[Tensor, Tensor]:
        """Priority [B, P] from the chunk ranking, and each position's rank inside its chunk."""
        b, p = token.shape
        cid = torch.arange(p, device=token.device) // self.chunk
        c = chunk_mean.shape[1]
        chunk_rank = chunk_mean.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # 0 = best
        # Positions grouped by chunk, best token first: a stable sort by score, then by chunk.
        by_score = torch.where(present, token, float("-inf")).argsort(dim=1, descending=True, stable=True)
        grouped = by_score.gather(1, cid[by_score].argsort(dim=1, stable=True))
        starts = (cid[grouped] != torch.cat([cid.new_full((b, 1), -1), cid[grouped][:, :-1]], dim=1)).long()
        first = torch.cummax(starts * torch.arange(p, device=token.device), dim=1).values
        inner = torch.empty_like(grouped).scatter_(1, grouped, torch.arange(p, device=token.device) - first)
        priority = ((c - chunk_rank.gather(1, cid.expand(b, p))) * (self.chunk + 1) - inner).float()
        return priority, inner


@register("chunkkv-entropy")
class EntropyGatedChunkKV(ChunkKV):
    paper = "ChunkKV (Liu et al. 2025), entropy gate of the peer library (kvpress)"
    summary = "ChunkKV (chunks of 10) whose important but spiky chunks keep only their best 4 tokens"

    def __init__(self, window: int = 32, base: str = "snapkv", chunk: int = 10, low: int = 4) -> None:
        super().__init__(window, base, chunk)
        if not 1 <= low < chunk:
            raise KVBudgetError(f"{self.name}: need 1 <= low < chunk, got low={low}, chunk={chunk}")
        self.low = low

    def priority(self, token: Tensor, present: Tensor) -> Tensor:
        chunk_mean, cid = self._chunks(token, present)
        priority, inner = self._order(token, present, chunk_mean)
        entropy = self.entropy(token, present)
        gated = (chunk_mean >= _median(chunk_mean)) & (entropy < _median(entropy))
        # Tokens a gated chunk gives up come after every chunk's kept tokens, best score first.
        rest = gated.gather(1, cid.expand_as(token)) & (inner >= self.low)
        leftover = -1.0 - torch.where(present, token, float("-inf")).argsort(dim=1, descending=True, stable=True).argsort(dim=1).float()
        return torch.where(rest, leftover, priority)

    def entropy(self, token: Tensor, present: Tensor) -> Tensor:
        """Normalised entropy of each chunk's token scores [B, C] (in [0, 1]; NaN: empty chunk).
        Negative scores are shifted so that the chunk's smallest is 0."""
        b, p = token.shape
        cid = torch.arange(p, device=token.device) // self.chunk
        c = (p + self.chunk - 1) // self.chunk
        lowest = token.new_full((b, c), float("inf")).scatter_reduce(1, cid.expand(b, p), torch.where(present, token, float("inf")), "amin")
        shifted = torch.where(present, token - lowest.clamp(max=0).gather(1, cid.expand(b, p)), 0)
        total = token.new_zeros(b, c).index_add_(1, cid, shifted)
        count = token.new_zeros(b, c).index_add_(1, cid, present.float())
        share = shifted / (total.gather(1, cid.expand(b, p)) + 1e-8)
        h = token.new_zeros(b, c).index_add_(1, cid, torch.where(present, -share * (share + 1e-8).log(), 0))
        norm = count.clamp(min=2).log()
        return torch.where(count > 1, (h / norm).clamp(0, 1), torch.where(count > 0, 0.0, float("nan")))


def _median(x: Tensor) -> Tensor:
    """Per row [B, 1]: the lower median of the finite values (the others left out)."""
    return torch.where(x.isfinite(), x, float("nan")).nanmedian(dim=1, keepdim=True).values
