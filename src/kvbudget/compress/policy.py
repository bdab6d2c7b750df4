"""`Policy`: one method as configuration: a scorer, an allocator, a store and a budget.

A policy is immutable once made (`methods.make_policy` builds one from a name such as
``snapkv+pyramid+kivi4``) and shared by every session that uses it; what depends on a session's
context (a ratio budget resolved to tokens, the layer sensitivities EpiCache's allocator reads)
is kept on that session's cache. `compress.engine.compress` applies a policy to a cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import BudgetError
from ..kv.cache import BudgetedCache
from ..kv.entries import POSITION_DTYPE
from ..kv.rerotation import rotary_frequencies
from ..kv.store import Store
from .allocation import HEAD_ADAPTIVE, get_allocator, sensitivity_budgets
from .budget import Budget
from .merger import Merger
from .scorer import Scorer

HEADS = ("uniform", "adaptive")


@dataclass(frozen=True)
class Policy:
    """A scorer + an allocator + a store + a budget, and optionally a merger (what becomes of
    evicted entries: folded into kept ones, `compress.merger`, instead of dropped).

    ``window``: the most recent tokens always kept (at most half the budget); ``decode_interval``:
    during generation the cache is compressed every that many new tokens (0 = never), so long
    answers stay inside the budget too; ``heads``: "adaptive" lets the heads of a layer share its
    budget (Ada-KV); ``alpha`` and ``profile``: the sensitivity allocator's sharpness and the
    profile file it reads (default: the model's shipped or cached profile); ``rerotate``: after
    each eviction the kept keys move to contiguous positions (`kv.rerotation`, StreamingLLM), so
    the conversation never runs out of the model's positions (default: every entry keeps the
    position it was computed at).
    """

    scorer: Scorer
    budget: Budget | None
    allocator: str = "uniform"
    store: Store | None = None
    window: int = 32
    seed: int = 0
    decode_interval: int = 64
    heads: str = "uniform"
    alpha: float = 1.2
    profile: str | None = None
    merger: Merger | None = None
    rerotate: bool = False
    name: str = ""
    # How `make_policy` was called (name, budget, keyword arguments): what a session file records
    # to rebuild this exact policy. None for a policy built by hand.
    spec: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.budget is None and self.evicts:
            raise BudgetError(f"policy '{self.scorer.name}' needs a budget (tokens, bytes like 24MiB, or a ratio like 4x)")
        if self.decode_interval < 0:
            raise BudgetError(f"decode interval must be >= 0, got {self.decode_interval}")
        if self.heads not in HEADS:
            raise BudgetError(f"heads must be 'uniform' or 'adaptive', got '{self.heads}'")
        get_allocator(self.allocator)  # a clear error for an unknown one
        if self.allocator in HEAD_ADAPTIVE:
            object.__setattr__(self, "heads", "adaptive")
        if self.merger is not None and not self.scorer.evicts:
            raise BudgetError(f"merger '{self.merger.name}' folds evicted entries: '{self.scorer.name}' evicts none")
        if self.merger is not None and self.store is not None:
            # Merging rewrites kept keys and values; a store's body is encoded (and a demoting
            # store evicts nothing), so merging policies hold their entries at full precision.
            raise BudgetError(f"merger '{self.merger.name}' cannot be combined with store '{self.store.name}' "
                              "(merged entries are held at full precision)")
        if self.rerotate and not self.scorer.evicts:
            raise BudgetError(f"key re-rotation moves kept keys after an eviction; '{self.scorer.name}' evicts nothing")
        if self.rerotate and self.store is not None:
            raise BudgetError(f"key re-rotation needs keys at full precision; store '{self.store.name}' encodes them "
                              "(their rotation would not be exact): use rerotate without a store")
        if not self.name:
            parts = [self.scorer.name] + [self.allocator] * (self.allocator != "uniform")
            parts += [self.merger.name] if self.merger else []
            name = "+".join(parts + ["rerotate"] * self.rerotate)
            object.__setattr__(self, "name", name)

    def __repr__(self) -> str:
        return f"Policy({self.name}, budget={self.budget})"

    @property
    def evicts(self) -> bool:
        """Whether entries are removed (or, for a demoting store, moved to low precision)."""
        return self.scorer.evicts or (self.store is not None and self.store.demotes)

    @property
    def queries(self) -> int:
        """Observed queries a layer records for this policy: the latest k, -1 every one since the
        last compression, 0 none (the most that its scorer, store and merger ask for)."""
        wanted = [self.scorer.queries, self.store.queries if self.store else 0,
                  self.merger.queries if self.merger else 0]
        return -1 if -1 in wanted else max(wanted)

    @property
    def state_names(self) -> tuple[str, ...]:
        """Per-entry float state the cache keeps for this policy (its scorer's and merger's)."""
        return self.scorer.state_names + (self.merger.state_names if self.merger else ())

    @property
    def head_adaptive(self) -> bool:
        """Whether the heads of a layer share its budget (Ada-KV: variable per-head lengths)."""
        return self.heads == "adaptive"

    # --- budget ---------------------------------------------------------------------------------
    @staticmethod
    def entry_bytes(cache: BudgetedCache) -> int:
        """Bytes of one token in one layer (all KV heads): K, V and its position."""
        cfg = cache.config
        return cfg.num_key_value_heads * (2 * _head_dim(cfg) * cache.dtype.itemsize + POSITION_DTYPE.itemsize)

    def stored_entry_bytes(self, cache: BudgetedCache) -> int:
        """`entry_bytes` as this policy's store holds an entry (encoded, on average)."""
        if self.store is None or self.store.demotes:
            return self.entry_bytes(cache)
        cfg = cache.config
        per_head = self.store.entry_bytes(_head_dim(cfg), cache.dtype) + POSITION_DTYPE.itemsize
        return max(1, round(cfg.num_key_value_heads * per_head))

    def resolve(self, cache: BudgetedCache, context_tokens: int | None = None, block_size: int | None = None) -> int | None:
        """The budget in tokens per layer for this cache (bytes and ratios need it); None for a
        policy without a budget.

        A ratio budget is a byte ratio: ``4x`` holds at most a quarter of the bytes the full
        cache holds for the same context (`full_bytes`), whatever the store. It resolves to the
        most tokens whose `held_bytes` fit, so a 4-bit store keeps more entries than full
        precision at the same ratio. ``block_size``: the prefill's (a bound on how many partial
        chunks a store's evictions leave; default: one store chunk, the most pessimistic). That
        bound assumes the worst chunk layout; at each compression the engine fits the budget's
        bytes again to the cache's own layout (`compress.bytefit`), so a store's cache holds
        close to the bytes asked, never more.

        A fraction of the tokens seen (``0.25seen``) resolves the same way, the full cache's bytes
        times the fraction, against every token seen so far (``context_tokens``: the engine passes
        the cache's length at each compression); at least one token."""
        budget = self.budget
        if budget is None:
            return None
        if budget.ratio is None and budget.seen is None:
            return budget.resolve(self.stored_entry_bytes(cache), len(cache.layers), context_tokens)
        target = self.target_bytes(cache, context_tokens)
        lo, hi = 0, context_tokens  # the most tokens that fit: held_bytes grows with them
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.held_bytes(cache, mid, context_tokens, block_size) <= target:
                lo = mid
            else:
                hi = mid - 1
        if lo < 1 and budget.seen is not None:
            return 1  # a few tokens seen: one entry per head
        if lo < 1:
            raise BudgetError(f"policy '{self.name}' cannot hold {self.budget} fewer bytes than the full cache of "
                              f"{context_tokens} tokens (even one token per layer is more)")
        return lo

    def target_bytes(self, cache: BudgetedCache, context_tokens: int | None) -> float | None:
        """The bytes a ratio (or a fraction seen) allows for a context of ``context_tokens``: the
        full cache's bytes over the ratio (times the fraction); None for a budget in tokens or bytes."""
        budget = self.budget
        if budget is None or (budget.ratio is None and budget.seen is None):
            return None
        if context_tokens is None:
            raise BudgetError(f"budget {budget}: a ratio budget needs the context length")
        full = self.full_bytes(cache, context_tokens)
        return full * budget.seen if budget.seen is not None else full / budget.ratio

    @staticmethod
    def full_bytes(cache: BudgetedCache, context_tokens: int) -> int:
        """Bytes the full cache holds for a context of ``context_tokens`` (a sliding-window layer
        at most its window): the reference of a ratio budget."""
        held = sum(context_tokens if layer.window is None else min(context_tokens, layer.window - 1)
                   for layer in cache.layers)
        return held * Policy.entry_bytes(cache)

    def held_bytes(self, cache: BudgetedCache, tokens: int | None, context_tokens: int,
                   block_size: int | None = None) -> int:
        """An upper bound on the bytes this policy's cache holds after a context of
        ``context_tokens``, at ``tokens`` per layer (None: every token kept).

        Counts what the cache counts (`BudgetedCache.nbytes`): full-precision entries (K, V,
        position), a store's encoded entries, its full-precision tail (the residual window plus
        up to one chunk waiting to be encoded), its per-chunk metadata, and the scorer's per-entry
        state. Chunk metadata is bounded by the chunks an eviction can leave alive: one per body
        entry at most, and no more than the context's whole chunks plus one partial chunk per
        compression (one per block)."""
        cfg = cache.config
        d, heads = _head_dim(cfg), cfg.num_key_value_heads
        full_entry = 2 * d * cache.dtype.itemsize + POSITION_DTYPE.itemsize
        state = 4 * len(self.state_names)  # float32 per entry and state (scorer's, merger's)
        store = self.store
        n_layers = len(cache.layers)
        if tokens is None or not self.evicts or tokens >= context_tokens:  # a context that fits is kept whole
            budgets: list[int | None] = [None] * n_layers
        else:
            budgets = self.layer_budgets(tokens, n_layers, cache.sensitivity)
        total = 0.0
        for layer, budget in zip(cache.layers, budgets):
            seen = context_tokens if layer.window is None else min(context_tokens, layer.window - 1)
            kept = seen if budget is None else min(budget, seen)
            if store is None:
                total += kept * (full_entry + state)
                continue
            if store.demotes:  # `kept` stay at full precision, every other entry seen is encoded
                tail, body = kept, seen - kept
            else:  # an eviction leaves the residual window; a flush, up to a chunk more
                tail = min(kept, self.residual(budget) + (0 if kept < seen else (store.chunk or 1) - 1))
                body = kept - tail
            chunk_bytes = store.chunk_bytes(d, cache.dtype)
            payload = store.entry_bytes(d, cache.dtype) - (chunk_bytes / store.chunk if store.chunk else 0)
            compressions = -(-seen // (block_size or store.chunk or 1))
            chunks = min(body, (-(-seen // store.chunk) if store.chunk else 0) + compressions)
            total += (tail * full_entry + body * (payload + POSITION_DTYPE.itemsize) + chunks * chunk_bytes
                      + (tail + body) * state)
        return math.ceil(total * heads)

    def layer_budgets(self, tokens: int, n_layers: int, sensitivity: list[float] | None = None) -> list[int]:
        """Entries per head kept in each layer, for a budget of ``tokens`` per layer."""
        if self.allocator == "sensitivity":
            if sensitivity is None:
                raise BudgetError("the sensitivity allocator needs the model's profile (a Session loads it)")
            return sensitivity_budgets(tokens, sensitivity, self.alpha, self.protected(tokens))
        return get_allocator(self.allocator)(tokens, n_layers, self.protected(tokens))

    def protected(self, budget: int) -> int:
        """How many of the most recent tokens are always kept: the observation window, but never
        more than half the budget, so the scorer still chooses at small budgets."""
        return min(self.window, budget // 2)

    def residual(self, budget: int | None) -> int:
        """Full-precision tail of a store. With eviction it is at most the protected window:
        every head keeps that window, so every head's tail holds the same entries."""
        if self.store is None:
            return 0
        if self.scorer.evicts and budget is not None:
            return min(self.store.residual, self.protected(budget))
        return self.store.residual

    # --- the cache ------------------------------------------------------------------------------
    def new_cache(self, model, sensitivity: list[float] | None = None) -> BudgetedCache:
        """An empty cache for ``model`` (its attention hook attached), set up to record the
        queries this policy's scorer and store need. ``sensitivity``: the model's layer
        sensitivities, for the sensitivity allocator."""
        cache = BudgetedCache(model)
        cache.sensitivity = sensitivity
        if self.rerotate:  # refuses a model whose keys cannot be re-rotated, before any token
            cache.rotary = rotary_frequencies(model, cache.layers)
        for layer in cache.layers:
            layer.observed.keep = self.queries
            layer.store = self.store
        return cache


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
