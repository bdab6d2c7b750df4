"""The policy protocol and the machinery every policy shares.

A policy = a *scorer* (which entries matter: one short file per method) + an *allocator* (how
the budget is split over layers) (+ later a *store*). Everything else lives here, once:
building the `Observation` a scorer looks at, protecting the observation window, the top-k per
head, keeping kept entries in their original order with their original positions, and handing
the result to the cache, which really frees what is dropped.
"""

from __future__ import annotations

import inspect
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch
from torch import Tensor

from .. import scoring
from ..allocation import HEAD_ADAPTIVE, get_allocator
from ..budget import Budget, parse_budget
from ..cache import (POSITION_DTYPE, BudgetedCache, BudgetedLayer, _padded_index, _take_padded, flush_layers,
                     gather_entries, padded_to_ragged, true_indices)
from ..errors import BudgetError, UnknownPolicyError
from ..sensitivity import budgets as sensitivity_budgets
from ..sensitivity import load_scores
from ..store import STORE_VARIANTS, STORES, Store
from ..transfer import to_device


@dataclass
class Observation:
    """What a scorer may look at for one layer. Tensors are padded [B, H, n, ...] views."""

    layer_idx: int  # index among the budgeted layers
    n_layers: int  # number of budgeted layers
    keys: Tensor  # [B, H, n, d], RoPE applied
    values: Tensor | None  # [B, H, n, dv]; None for stacked padded (or Ada-KV) layers unless `Scorer.reads_values`
    positions: Tensor  # [B, H, n] original token positions (-1 on padding)
    valid: Tensor | None  # [B, H, n] bool, None = no padding (padding is at the end of a row)
    queries: Tensor | None  # [B, Hq, m, d] latest queries (after RoPE), as many as the scorer asked
    query_positions: Tensor | None  # [m]
    scaling: float  # the layer's attention scaling
    budget: int  # entries per head this layer keeps (stacked layers of several budgets: the largest)
    seen: int  # tokens seen so far (position of the next token)
    seed: int  # for seeded random choices
    state: dict[str, Tensor] = field(default_factory=dict)  # per-entry running state, [B, H, n]
    # [B, Hq, m] float32, natural log: each query's log-sum-exp of the scaled logits over exactly
    # the keys visible to it here, from the model's own attention call (`BudgetedLayer.lse`);
    # None: the reductions compute it. Never set for only some of the queries.
    lse: Tensor | None = None
    # Stacked layers: their queries, one [B, Hq, m, d] part per layer, left unconcatenated (the
    # Triton reductions read each where it lies); `queries` is None until a torch path asks.
    query_parts: list[Tensor] | None = None
    # A sliding-window layer's window: entries at positions <= seen - window are visible to no
    # later token, and are never kept over visible ones.
    window: int | None = None

    @cached_property
    def attention(self) -> Tensor:
        """softmax(Q K^T * scaling) of the observed queries, causal by position, averaged over the
        query heads of each KV head: [B, H, m, n] (float32). Materialises the whole matrix: for
        scorers with few queries (a window); reductions over many queries use `attention_sum`,
        `attention_max` or `attention_chunks`."""
        return self.group_attention().mean(2)

    def group_attention(self) -> Tensor:
        """The same attention before averaging the query heads of each group: [B, H, g, m, n].
        Softmax is over the cached entries (tokens the queries belong to are not in the cache)."""
        q = self._queries()
        return scoring.group_probs(q, self.keys, scoring.key_positions(self.positions, self.valid),
                                   self.query_positions, self.scaling)

    def attention_sum(self, weights: Tensor | None = None) -> Tensor:
        """``attention.sum(2)`` without the [m, n] matrix: the attention each entry received,
        summed over the queries (each times ``weights[i]``, [m], when given): [B, H, n] float32.
        Triton on CUDA, query chunks elsewhere (`kvbudget.scoring`)."""
        if "attention" in self.__dict__:  # already materialised: reuse it
            a = self.attention
            return (a if weights is None else a * weights.to(a)[:, None]).sum(2)
        return self._reduce("sum", weights)

    def attention_max(self) -> Tensor:
        """``group_attention().amax(dim=(2, 3))`` without the matrix: the largest attention each
        entry received from any query head of its group and any query: [B, H, n] float32."""
        return self._reduce("max")

    def attention_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """``attention`` a chunk of queries at a time, for per-query logic: (index of the chunk's
        first query, [B, H, mc, n] float32), in query order."""
        if "attention" in self.__dict__:  # already materialised: one chunk
            return iter([(0, self.attention)])
        q = self._queries()
        kpos = scoring.key_positions(self.positions, self.valid)
        return scoring.attention_chunks(q, self.keys, kpos, self.query_positions.to(self.keys.device), self.scaling)

    def attention_lazy(self, last: Tensor, gap: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """LazyEviction's scan of the queries in order (`scoring.lazy_scan`), from the state
        ``last`` / ``gap`` [B, H, n] so far: (attention received, summed over the queries; when
        each entry was last important; the longest interval between two such moments), each
        [B, H, n] float32. Triton on CUDA, query chunks elsewhere."""
        if "attention" in self.__dict__:  # already materialised: one chunk
            return scoring.lazy_scan([(0, self.attention)], self.positions, self.valid, self.query_positions, last, gap)
        return scoring.attention_lazy(self._query_input(), self.keys, self.positions, self.valid,
                                      self.query_positions, self.scaling, last, gap, lse=self.lse)

    def _reduce(self, mode: str, weights: Tensor | None = None) -> Tensor:
        return scoring.attention_reduce(self._query_input(), self.keys, self.positions, self.valid,
                                        self.query_positions, self.scaling, mode, weights, lse=self.lse)

    def _query_input(self) -> scoring.Queries:
        return self.query_parts if self.queries is None and self.query_parts is not None else self._queries()

    def _queries(self) -> Tensor:
        if self.queries is None and self.query_parts is not None:
            self.queries = torch.cat(self.query_parts)
        if self.queries is None:
            raise RuntimeError("this scorer needs queries but none were observed")
        return self.queries

    def zeros(self) -> Tensor:
        """A [B, H, n] float tensor of zeros, for scorers that build a score step by step."""
        return torch.zeros(self.positions.shape, dtype=torch.float32, device=self.keys.device)


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

    def bind(self, tokenizer) -> None:
        """Called with the session's tokenizer (scorers that build prompts tokenize them here)."""

    def reconstruction_ids(self, fed: Tensor) -> Tensor | None:
        """Tokens to run (and forget) before scoring, given the tokens ``fed`` ([1, t]) since the
        last compression; their queries are what `score` observes. None: score with the queries
        of the fed tokens themselves (or the question's, in query-aware mode)."""
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


def _ranked(scores: Tensor, obs: Observation, window: int | Tensor) -> Tensor:
    """Scores with the protected window at +inf and padding at -inf. ``window``: one length, or
    one per batch row ([B, 1, 1], stacked layers of different budgets)."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    scores = scores.masked_fill(obs.positions >= obs.seen - window, float("inf"))
    if obs.window is not None:
        scores = scores.masked_fill(obs.positions <= obs.seen - obs.window, float("-inf"))
    if obs.valid is not None:
        scores = torch.where(obs.valid, scores, float("-inf"))
    return scores


def select(scores: Tensor, obs: Observation, window: int) -> tuple[Tensor, Tensor | None]:
    """Every head keeps its own top ``budget``: indices [B, H, k] ascending (+ per-head lengths
    when some heads hold fewer entries than k)."""
    scores = _ranked(scores, obs, window)
    k = min(obs.budget, scores.shape[-1])
    # Padding scores -inf, so it sorts last among a short head's picks and stays beyond its length.
    index = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    lens = None if obs.valid is None else obs.valid[0].sum(-1).clamp(max=k)
    return index, lens


def select_across_heads(scores: Tensor, obs: Observation, window: int, floor: float = 0.2) -> tuple[Tensor, Tensor]:
    """Ada-KV (Feng et al. 2024): the best ``budget * heads`` entries over all heads of the layer,
    each head first guaranteed its best ``floor * budget``: heads keep different numbers of
    entries and the cache stores exactly those (ragged, batch 1). Ties go to the lower index
    (`_choose`). Returns indices [1, H, max kept] (ascending; a head's first ``lens[h]`` are its
    picks) and ``lens`` [H]; the policy itself keeps `pick_across_heads`'s mask, without this
    padded index."""
    chosen, lens, kept = pick_across_heads(scores, obs, window, floor)
    h, n = chosen.shape
    order = torch.arange(n, device=chosen.device).expand(h, n)
    # Chosen entries first, in their original order; the rest pushed behind them.
    index = torch.where(chosen, order, order + n).argsort(dim=-1)[:, : max(kept)]
    return index[None], lens


def pick_across_heads(scores: Tensor, obs: Observation, window: int,
                      floor: float = 0.2) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """`select_across_heads`'s choice as a mask: chosen [H, n] bool, kept per head [H] (on the
    device) and the same as Python ints, read back in the one host<->device sync (the cache
    needs them on the host). The per-layer loop's choice; the stacked path (`_choose_adaptive`)
    makes the same one for many layers at once."""
    chosen = _choose(_ranked(scores, obs, window), int(floor * obs.budget), obs.budget)[0]  # [H, n]
    lens = chosen.sum(-1)
    return chosen, lens, tuple(lens.tolist())


def _choose(scores: Tensor, guaranteed: int, budget: int) -> Tensor:
    """Ada-KV's choice for each of L layers of ranked scores ([L, H, W], padding at the end of
    each head at -inf): chosen [L, H, W] bool. Each head first keeps its best ``guaranteed``
    entries, then the layer its best entries among the rest over all heads (flattened head
    after head), up to ``budget * H`` in all; an entry at -inf (padding, a NaN score) is never
    kept, so a layer with fewer others keeps fewer.

    "Best" is by score, ties to the lower index: a stable descending sort, not `torch.topk`
    (which of tied entries a top-k returns depends on the whole row, so on its padding). With
    this rule and padding last, a layer's picks are the same whatever width it is padded to,
    so layers of any widths are chosen together: one sort per step for all of them, and each
    layer's count to add applied on the device (nothing read back here). Ties go differently
    than with the top-k used before."""
    n_layers, h, w = scores.shape
    g = min(guaranteed, w)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if g:
        best, order = scores.sort(dim=-1, descending=True, stable=True)
        chosen.scatter_(-1, order[..., :g], best[..., :g] > float("-inf"))
    # The rest ranked over all heads; a layer adds its first budget * H - (guaranteed kept) of
    # them that score above -inf (chosen entries are put at -inf: never picked twice).
    rest, order = scores.masked_fill(chosen, float("-inf")).flatten(1).sort(dim=-1, descending=True, stable=True)
    room = budget * h - chosen.flatten(1).sum(-1, keepdim=True)  # [L, 1]
    picked = (torch.arange(h * w, device=scores.device) < room) & (rest > float("-inf"))
    return chosen | torch.empty_like(picked).scatter_(-1, order, picked).view(n_layers, h, w)


class Policy:
    """A scorer + an allocator + a store + a budget; `compress` cuts a cache back to the budget.

    ``decode_interval``: during generation the cache is compressed every that many new tokens
    (0 = never), so long answers stay inside the budget too.
    """

    def __init__(
        self,
        scorer: Scorer,
        budget: int | str | Budget | None,
        allocator: str = "uniform",
        window: int = 32,
        block_size: int = 256,
        seed: int = 0,
        name: str | None = None,
        store: Store | None = None,
        decode_interval: int | None = None,
        heads: str = "uniform",
        alpha: float = 1.2,
        profile: str | None = None,
    ) -> None:
        if block_size <= 0:
            raise BudgetError(f"block size must be positive, got {block_size}")
        self.scorer = scorer
        self.store = store
        self.budget = None if budget is None else parse_budget(budget)
        if self.budget is None and self.evicts:
            raise BudgetError(f"policy '{scorer.name}' needs a budget (tokens, bytes like 24MiB, or a ratio like 4x)")
        if decode_interval is None:
            decode_interval = scorer.decode_interval or 64
        if decode_interval < 0:
            raise BudgetError(f"decode interval must be >= 0, got {decode_interval}")
        self.decode_interval = decode_interval
        if heads not in ("uniform", "adaptive"):
            raise BudgetError(f"heads must be 'uniform' or 'adaptive', got '{heads}'")
        self.heads = "adaptive" if allocator in HEAD_ADAPTIVE else heads
        self.alpha, self.profile = alpha, profile
        self.sensitivity: list[float] | None = None  # per-layer scores of the `sensitivity` allocator
        self.allocator = allocator
        self._allocate = get_allocator(allocator)
        self.window = window
        self.block_size = block_size
        self.seed = seed
        self.name = name or (scorer.name if allocator == "uniform" else f"{scorer.name}+{allocator}")
        self.tokens: int | None = self.budget.tokens if self.budget is not None else None
        # How `make_policy` was called (name, budget, keyword arguments): what a session file
        # records to rebuild this exact policy. None for a policy built by hand.
        self.spec: dict | None = None

    def __repr__(self) -> str:
        return f"Policy({self.name}, budget={self.budget}, block_size={self.block_size})"

    @property
    def evicts(self) -> bool:
        """Whether entries are removed (or, for a demoting store, moved to low precision)."""
        return self.scorer.evicts or (self.store is not None and self.store.demotes)

    # --- budget ---------------------------------------------------------------------------------
    @staticmethod
    def entry_bytes(cache: BudgetedCache) -> int:
        """Bytes of one token in one budgeted layer (all KV heads): K, V and its position."""
        cfg = cache.config
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = cache.dtype.itemsize
        return heads * (2 * head_dim * elem + POSITION_DTYPE.itemsize)

    def stored_entry_bytes(self, cache: BudgetedCache) -> int:
        """`entry_bytes` as this policy's store holds an entry (encoded, on average)."""
        if self.store is None or self.store.demotes:
            return self.entry_bytes(cache)
        cfg = cache.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        per_head = self.store.entry_bytes(head_dim, cache.dtype) + POSITION_DTYPE.itemsize
        return max(1, round(cfg.num_key_value_heads * per_head))

    def resolve(self, cache: BudgetedCache, context_tokens: int | None = None) -> int | None:
        """Fix the budget in tokens per layer for this cache (bytes and ratios need it)."""
        if self.budget is None:
            return None
        if self.tokens is None:
            self.tokens = self.budget.resolve(self.stored_entry_bytes(cache), len(cache.budgeted), context_tokens)
        return self.tokens

    @property
    def head_adaptive(self) -> bool:
        """Whether the heads of a layer share its budget (Ada-KV: variable per-head lengths)."""
        return self.heads == "adaptive"

    def layer_budgets(self, n_layers: int) -> list[int]:
        """Entries per head kept in each budgeted layer."""
        if self.allocator == "sensitivity":
            if self.sensitivity is None:
                raise BudgetError("the sensitivity allocator needs the model's profile: create the cache with new_cache(model)")
            return sensitivity_budgets(self.tokens, self.sensitivity, self.alpha, self.protected(self.tokens))
        return self._allocate(self.tokens, n_layers, self.protected(self.tokens))

    def protected(self, budget: int) -> int:
        """How many of the most recent tokens are always kept: the observation window, but never
        more than half the budget, so the scorer still chooses at small budgets."""
        return min(self.window, budget // 2)

    # --- the cache ------------------------------------------------------------------------------
    def new_cache(self, model) -> BudgetedCache:
        """An empty cache set up to record the queries this policy's scorer needs."""
        cache = BudgetedCache(model)  # attaches the attention hook to the model
        if self.allocator == "sensitivity" and self.sensitivity is None:
            self.sensitivity = load_scores(model, self.profile)
        wanted = [self.scorer.queries, self.store.queries if self.store else 0]
        for layer in cache.budgeted_layers():
            layer.query_keep = -1 if -1 in wanted else max(wanted)
            layer.store = self.store
        return cache

    def residual(self, budget: int | None) -> int:
        """Full-precision tail of a store. With eviction it is at most the protected window:
        every head keeps that window, so every head's tail holds the same entries."""
        if self.store is None:
            return 0
        if self.scorer.evicts and budget is not None:
            return min(self.store.residual, self.protected(budget))
        return self.store.residual

    def compress(self, cache: BudgetedCache) -> None:
        """Cut every budgeted layer back to its budget (no-op for layers under budget). Sliding-
        window layers first drop the entries no later token can see (`BudgetedLayer.trim_window`),
        whatever the policy, and keep at most ``window - 1`` entries per head."""
        layers = cache.budgeted_layers()
        windowed = [layer for layer in layers if layer.window is not None and layer.max_entries >= layer.window]
        if not self.evicts and self.store is None and not windowed:
            return  # nothing to do, and no reason for `before_compress` to snapshot the cache
        cache.settle()
        # Without eviction a store's body only grows at its end (flush by append), so a snapshot
        # need not hold it (MiniCache's cross-layer merge rewrites it: not that case).
        appends = not self.evicts and not windowed and self.store is not None and not self.store.cross_layer
        cache.before_compress(appends_only=appends)
        budgets = self.layer_budgets(len(layers)) if self.evicts else [None] * len(layers)
        budgets = [b if layer.window is None or b is None else min(b, layer.window - 1) for b, layer in zip(budgets, layers)]
        for layer, budget in zip(layers, budgets):
            # A sliding-window layer's tail is at most its window: it never holds more.
            residual = self.residual(budget)
            layer.residual = residual if layer.window is None else min(residual, layer.window - 1)
        for layer in windowed:
            layer.trim_window()
        if not self.evicts:
            if self.store is None or self.store.flush_cache(cache):
                return
            flush_layers(layers)
            return
        # While the whole context fits in the average budget nothing is evicted, whatever the
        # allocator says for single layers (as PyramidKV: contexts under the budget stay whole).
        fits = cache.get_seq_length() <= self.tokens
        # Layers of one window (full attention, or one sliding window) are compressed together.
        for window in dict.fromkeys(layer.window for layer in layers):
            index = [i for i, layer in enumerate(layers) if layer.window == window]
            self._compress_group(cache, [layers[i] for i in index], [budgets[i] for i in index], index, fits)

    def _compress_group(self, cache: BudgetedCache, layers: list[BudgetedLayer], budgets: list[int],
                        index: list[int], fits: bool) -> None:
        """`compress` for ``layers`` of one window (``index``: their places among the budgeted
        layers): stacked where they allow it, else layer by layer."""
        if not fits and self._stack(cache, layers, budgets):
            return
        if fits and self._stack_state(layers, budgets):
            return
        shared = self.head_adaptive
        demotes = self.store is not None and self.store.demotes
        n_layers = len(cache.budgeted)
        for i, layer, budget in zip(index, layers, budgets):
            if demotes:
                held = layer.keys.shape[-2]  # entries still at full precision
            else:
                held = layer.total_entries() if shared else layer.max_entries
            over = not fits and held > budget * (layer.n_heads if shared else 1)
            if over or self.scorer.state_names:
                self._compress_layer(layer, i, n_layers, budget, evict=over)
            if not over and not demotes:
                layer.flush()
            if self.scorer.queries < 0:
                layer.clear_queries()

    # Score every layer in one pass when they allow it (set False to compare with the loop).
    stack_layers: bool = True

    def _stack(self, cache: BudgetedCache, layers: list[BudgetedLayer], budgets: list[int]) -> bool:
        """Compress the budgeted layers together, stacked along the batch dimension: the same
        scores and picks as layer by layer, in a few large operations instead of ~24 kernel
        launches per layer (on a GPU the per-layer loop is bound by the host launching them:
        docs/benchmarks.md, "GPU performance"). Layers of different budgets (PyramidKV), which
        also hold different numbers of entries after their first compression, are padded to the
        longest when the scorer allows it (`Scorer.stackable_padded`). Only when every layer is
        dense and unencoded with the same heads, tokens seen, state and observed queries; returns
        False (nothing done) otherwise."""
        if not (self.stack_layers and self.scorer.stackable and len(layers) > 1):
            return False
        if self.store is not None:  # layers with encoded bodies: `kvbudget.stacked_store`
            from .. import stacked_store

            if not stacked_store.stackable(self, layers, budgets):
                return False
            stacked_store.finish(cache, [(layers[group], stacked_store.compress(self, layers[group], budgets[0]))
                                         for group in self._groups(layers, self.STORE_STACK_BYTES)])
            return True
        if self.head_adaptive:
            return self._stack_adaptive(layers, budgets)
        if not _alike(layers):
            return False
        lengths = [layer.keys.shape[2] for layer in layers]
        if all(n <= k for n, k in zip(lengths, budgets)):
            return False  # nothing to evict: the loop only updates the scorer's state, if any
        if (len(set(budgets)) > 1 or len(set(lengths)) > 1) and not self.scorer.stackable_padded:
            return False
        for group in self._groups(layers):
            self._compress_stacked(layers[group], budgets[group])
        return True

    def _stack_state(self, layers: list[BudgetedLayer], budgets: list[int]) -> bool:
        """While the context fits its budget nothing is evicted, but a scorer with state (H2O,
        A2SF, LazyEviction) still scores every layer to update it: stacked as well when the
        layers are alike (dense, unencoded), then flushed together (`flush_layers`). Layer by
        layer, the first compression of a 32k H2O + KIVI-4 prefill on the H100 took 38 ms of
        stream time, bound by the host launching it, against 9 ms for each later, stacked one
        (`benchmarks/host_lead.py`, docs/benchmarks.md "Tenth session"). Returns False (nothing
        done) where the loop must run."""
        if not (self.stack_layers and self.scorer.stackable and self.scorer.state_names and len(layers) > 1):
            return False
        demotes = self.store is not None and self.store.demotes
        if self.head_adaptive or demotes or not _alike(layers) or len({layer.keys.shape[2] for layer in layers}) > 1:
            return False  # (unequal lengths would stack padded, and the state with them)
        for group in self._groups(layers):
            obs = self._stacked_observation(layers[group], max(budgets[group]))
            self.scorer.score(obs)  # only its state is kept: nothing is evicted
            b = layers[0].keys.shape[0]
            for i, layer in enumerate(layers[group]):
                layer.state = {k: v[i * b : (i + 1) * b] for k, v in obs.state.items()}
        for layer, budget in zip(layers, budgets):
            layer.residual = self.residual(budget)
        flush_layers(layers)
        if self.scorer.queries < 0:
            for layer in layers:
                layer.clear_queries()
        return True

    # Layers go in groups whose stacked K/V stay under STACK_BYTES: the stacked copies are
    # transient memory on top of the cache, and peak prefill memory must stay near
    # weights + budget + block (measured on H100: all 32 layers at once added 1.3 GB).
    STACK_BYTES = 128 * 2**20
    # The same for layers with a store (`kvbudget.stacked_store`), whose compression also stacks
    # the decoded bodies and re-encodes. Larger groups trade peak memory for time. While each
    # group cost three host syncs (eighth session, H100, 8B shape, 32k, budget 2048), SnapKV+KIVI-4's
    # share of the prefill and its peak were: 128 MiB 19-20% / 16.41 GB, 256 MiB 13-14% / 16.95 GB,
    # 512 MiB 11% / 17.57 GB (the full cache's: 19.31 GB); during an answer with decode-time
    # compression, +0.82 GB above a 0.1 GB cache at 128 MiB, +1.33 GB at 256. With the groups
    # queued without a sync (ninth session) the default's share is 9.6-12.4% (docs/benchmarks.md,
    # "Ninth session"). Memory first by default; set it on a policy (or the class) to trade.
    STORE_STACK_BYTES = 128 * 2**20

    def _groups(self, layers: list[BudgetedLayer], limit: int | None = None) -> Iterator[slice]:
        """Consecutive layers whose stacked K/V, padded to the group's longest, fit in ``limit``
        bytes (default STACK_BYTES; at least one layer per group). Consecutive: PyramidKV's budgets
        fall with depth, so neighbours hold similar numbers of entries and little padding is stacked."""
        limit = self.STACK_BYTES if limit is None else limit
        b, h, d, dv = _shape(layers[0])
        entry = b * h * (d * layers[0].keys.element_size() + dv * layers[0].values.element_size())  # bytes
        # Entries of the fullest head: what a ragged layer's padded view holds per head.
        widths = [layer.max_entries for layer in layers]
        start = 0
        while start < len(layers):
            end, longest = start + 1, widths[start]
            while end < len(layers):
                longer = max(longest, widths[end])
                if (end + 1 - start) * longer * entry > limit:
                    break
                end, longest = end + 1, longer
            yield slice(start, end)
            start = end

    def _compress_stacked(self, layers: list[BudgetedLayer], budgets: list[int]) -> None:
        """One scoring and selection for ``layers`` stacked along the batch dimension (padded to
        the longest when they hold different numbers of entries)."""
        b = layers[0].keys.shape[0]
        lengths = [layer.keys.shape[2] for layer in layers]
        obs = self._stacked_observation(layers, max(budgets))
        scores = self.scorer.score(obs)
        if len(set(budgets)) == 1 and obs.valid is None:
            # One budget and one length: one top-k and one gather for every row.
            index, _ = select(scores, obs, self.protected(budgets[0]))
            kept = [gather_entries(t, index) for t in (obs.keys, obs.values, obs.positions)]
            state = {k: gather_entries(v, index) for k, v in obs.state.items()}
            del obs
            for i, layer in enumerate(layers):
                rows = slice(i * b, (i + 1) * b)
                self._keep_stacked(layer, *(t[rows] for t in kept), {k: v[rows] for k, v in state.items()}, budgets[i])
            return
        # The protected window depends on the layer's budget: one length per batch row.
        windows = _row_values([[self.protected(k) for k in budgets]], b, scores.device)[0]
        ranked = _ranked(scores, obs, windows[:, None, None])
        state = obs.state
        # The stacked (padded) keys go now; each layer's kept entries come from its own tensors.
        del obs
        keep = [min(k, n) for k, n in zip(budgets, lengths)]
        # Each layer's own top-k over its own entries (the stacked scores without the padding):
        # exactly what the loop's `select` picks, ties included. The picks go into one buffer
        # whose unused slots hold an index past every entry, so one sort orders every layer's
        # picks (a sort per layer cost ~30 us of GPU time each, measured on H100).
        picks = torch.full((*ranked.shape[:2], max(keep)), ranked.shape[-1], dtype=torch.long, device=ranked.device)
        for i in range(len(layers)):
            rows = slice(i * b, (i + 1) * b)
            picks[rows, :, : keep[i]] = ranked[rows, :, : lengths[i]].topk(keep[i], dim=-1).indices
        picks = picks.sort(dim=-1).values
        for i, layer in enumerate(layers):
            rows = slice(i * b, (i + 1) * b)
            idx = picks[rows, :, : keep[i]]
            kept = [gather_entries(t, idx) for t in (layer.keys, layer.values, layer.positions)]
            self._keep_stacked(layer, *kept, {k: gather_entries(v[rows], idx) for k, v in state.items()}, budgets[i])

    def _stacked_observation(self, layers: list[BudgetedLayer], budget: int,
                             entries: _Stacked | None = None) -> Observation:
        """The Observation of ``layers`` stacked along the batch dimension: layer i is rows
        i*B..(i+1)*B; entries padded at the end of each row to the longest layer's (positions -1,
        `valid` False there); ``budget``: the largest of the layers' budgets. ``entries``: the
        stacked fields when the caller built them (ragged layers: `_stacked_ragged`)."""
        first = layers[0]
        if entries is None:
            n = max(layer.keys.shape[2] for layer in layers)
            positions = _stack_entries([layer.positions for layer in layers], n, fill=-1)
            padded = any(layer.keys.shape[2] != n for layer in layers)
            # Padded layers of different budgets, and Ada-KV's layers, keep entries from their own
            # tensors (`_compress_stacked`, `_keep_adaptive`): their values are stacked only for a
            # scorer that reads them.
            own = (padded or self.head_adaptive) and not self.scorer.reads_values
            values = None if own else _stack_entries([layer.values for layer in layers], n)
            entries = _Stacked(
                keys=_stack_entries([layer.keys for layer in layers], n),
                values=values,
                positions=positions,
                valid=positions >= 0 if padded else None,
                state={k: _stack_entries([layer.state[k] for layer in layers], n) for k in first.state},
            )
        # The LSE goes along only if every layer has it (a stacked row without one is unknown).
        lse = None
        if first.queries is not None and all(layer.lse is not None for layer in layers):
            lse = torch.cat([layer.lse for layer in layers])
        return Observation(
            layer_idx=0,
            n_layers=len(layers),
            keys=entries.keys,
            values=entries.values,
            positions=entries.positions,
            valid=entries.valid,
            queries=None,
            query_parts=None if first.queries is None else [layer.queries for layer in layers],
            query_positions=first.query_positions,
            scaling=first.scaling or first.keys.shape[-1] ** -0.5,
            budget=budget,
            seen=first.seen,
            seed=zlib.crc32(f"{self.seed}:stacked:{first.seen}".encode()),
            state=entries.state,
            lse=lse,
            window=first.window,
        )

    def _stack_adaptive(self, layers: list[BudgetedLayer], budgets: list[int]) -> bool:
        """Ada-KV's compression of the layers together (`_compress_adaptive`): only when they are
        alike (dense or ragged, batch 1, the same heads, tokens seen, state and observed queries),
        share one budget and are all over it; returns False (nothing done) otherwise, and the
        loop does it."""
        budget = budgets[0]
        if len(set(budgets)) > 1 or not _alike(layers, ragged=True):
            return False
        if any(layer.total_entries() <= budget * layer.n_heads for layer in layers):
            return False  # the loop leaves such a layer as it is (or only updates the scorer's state)
        padded = any(layer.head_lens is not None for layer in layers) or len({layer.max_entries for layer in layers}) > 1
        if padded and not self.scorer.stackable_padded:
            return False
        self._compress_adaptive(layers, budget)
        return True

    def _compress_adaptive(self, layers: list[BudgetedLayer], budget: int, floor: float = 0.2) -> None:
        """Ada-KV (`pick_across_heads`) for ``layers`` together, in groups (`_groups`, in order of
        width: every head of a group is padded to the group's widest): each group's views
        stacked along the batch, scored and chosen (`_choose_adaptive`); then one host<->device
        sync for every layer's kept counts; then each group's kept entries gathered from the
        layers' own storage (`_keep_adaptive`). Between the two only each group's choice masks
        and small per-entry fields stay alive, not its stacked keys. The per-layer loop costs
        ~86 operators and one sync per layer; the same picks (`_choose`'s rule does not depend
        on padding)."""
        layers = sorted(layers, key=lambda layer: layer.max_entries)
        sizes = [layer.host_lens() if layer.head_lens is not None else (layer.max_entries,) * layer.n_heads
                 for layer in layers]
        # Entries per head on the device: one copy from the host for every group (pinning costs
        # the host ~0.5 ms a call on the H100, `compress_profile-adakv-stacked.log`).
        lens = _row_values([[n for s in sizes for n in s]], 1, layers[0].keys.device)[0].view(len(layers), -1)
        groups = [self._choose_adaptive(layers[group], sizes[group], lens[group], budget, floor)
                  for group in self._groups(layers)]
        counts = torch.cat([group.counts for group in groups])  # [L, H]: kept per head
        kept = [tuple(k) for k in counts.tolist()]  # the one sync
        kept_lens = counts.unbind()
        start = 0
        for group in groups:
            end = start + len(group.layers)
            self._keep_adaptive(group, kept_lens[start:end], kept[start:end], budget)
            start = end

    def _choose_adaptive(self, layers: list[BudgetedLayer], sizes: list[tuple[int, ...]], lens: Tensor,
                         budget: int, floor: float) -> _Chosen:
        """One group's scoring of its layers' views stacked along the batch (each head padded to
        the group's widest) and every layer's choice (`_choose`), nothing read back. ``sizes``:
        the layers' entries per head on the host, ``lens`` the same on the device ([L, H]).
        Values are stacked only for a scorer that reads them: kept K/V come from the layers'
        storage."""
        widths = [max(s) for s in sizes]
        entries = None
        if any(layer.head_lens is not None for layer in layers) or len(set(widths)) > 1:
            entries = _stacked_ragged(layers, sizes, lens.flatten(), max(widths), values=self.scorer.reads_values)
        obs = self._stacked_observation(layers, budget, entries)
        chosen = _choose(_ranked(self.scorer.score(obs), obs, self.protected(budget)), int(floor * budget), budget)
        return _Chosen(layers, chosen, chosen.sum(-1), None if entries is None else entries.rows,
                       obs.positions, obs.state)

    def _keep_adaptive(self, group: _Chosen, lens: tuple[Tensor, ...], kept: list[tuple[int, ...]],
                       budget: int) -> None:
        """Each layer of a chosen group keeps its picks (``lens`` [H] on the device, ``kept`` the
        same as ints, per layer): keys and values in one gather per field over the group's
        storages concatenated (a transient copy of one group's entries, unpadded), positions and
        the scorer's state from the stacked fields."""
        totals = [sum(k) for k in kept]
        slots = true_indices(group.chosen.flatten(), sum(totals))
        rows = slots if group.rows is None else group.rows.flatten().index_select(0, slots)

        def take(t: Tensor, index: Tensor) -> tuple[Tensor, ...]:
            return t.index_select(0, index).split(totals)

        keys = take(_storages(group.layers, [layer.keys for layer in group.layers]), rows)
        values = take(_storages(group.layers, [layer.values for layer in group.layers]), rows)
        positions = take(group.positions.flatten(), slots)
        state = {k: take(v.flatten(), slots) for k, v in group.state.items()}
        for i, layer in enumerate(group.layers):
            layer.residual = self.residual(budget)
            layer.keep_entries(keys[i], values[i], positions[i], {k: v[i] for k, v in state.items()}, lens[i], kept[i])
            if self.scorer.queries < 0:
                layer.clear_queries()

    def _keep_stacked(self, layer: BudgetedLayer, keys: Tensor, values: Tensor, positions: Tensor,
                      state: dict[str, Tensor], budget: int) -> None:
        layer.hold(keys, values)
        layer.positions, layer.state = positions, state
        layer.residual = self.residual(budget)
        if self.scorer.queries < 0:
            layer.clear_queries()

    def _compress_layer(self, layer: BudgetedLayer, i: int, n_layers: int, budget: int, evict: bool) -> None:
        # A demoting store (MiKV) only chooses among full-precision entries (encoded ones never
        # come back), so only the tail is scored: no decoding, no attention over the whole body.
        demotes = self.store is not None and self.store.demotes
        view = layer.view(tail_only=demotes)
        start = layer.max_entries - view.keys.shape[2]
        obs = Observation(
            layer_idx=i,
            n_layers=n_layers,
            keys=view.keys,
            values=view.values,
            positions=view.positions,
            valid=view.valid,
            queries=layer.queries,
            query_positions=layer.query_positions,
            scaling=layer.scaling or view.keys.shape[-1] ** -0.5,
            budget=budget,
            seen=layer.seen,
            seed=zlib.crc32(f"{self.seed}:{i}:{layer.seen}".encode()),
            state=view.state,
            # Scored over the tail only, the softmax spans fewer keys than the queries attended to.
            lse=None if demotes else layer.lse,
            window=layer.window,
        )
        scores = self.scorer.score(obs)
        state = _with_body_state(obs.state, layer, start) if start else obs.state
        if not evict:
            layer.state = _unpad_state(state, layer)
            return
        if demotes:
            layer.rebuild(demotion_index(scores, obs, start, self.protected(budget)), budget, state)
            return
        view.state = state
        if self.head_adaptive:
            chosen, lens, kept = pick_across_heads(scores, obs, self.protected(budget))
            layer.keep_chosen(chosen, lens, kept, view)
            return
        index, lens = select(scores, obs, self.protected(budget))
        layer.keep(index, lens, view=view)


def _alike(layers: list[BudgetedLayer], ragged: bool = False) -> bool:
    """Whether ``layers`` can be stacked along the batch dimension: dense and unencoded, with the
    same batch, heads and head dims, tokens seen, state names, observed queries and scaling
    (they may hold different numbers of entries). ``ragged``: ragged layers too, and then batch 1
    (Ada-KV's layers, each head holding its own number of entries)."""
    first = layers[0]
    if not first.is_initialized:
        return False
    shape = _shape(first)
    q_shape = None if first.queries is None else first.queries.shape
    for layer in layers:
        if (not layer.is_initialized or (layer.head_lens is not None and not ragged) or layer.body is not None
                or _shape(layer) != shape
                or layer.seen != first.seen or set(layer.state) != set(first.state)
                or (None if layer.queries is None else layer.queries.shape) != q_shape
                or layer.scaling != first.scaling):
            return False
    return not ragged or shape[0] == 1


def _shape(layer: BudgetedLayer) -> tuple[int, int, int, int]:
    """A layer's (batch, KV heads, key dim, value dim), dense or ragged (batch 1)."""
    if layer.head_lens is None:
        b, h, _, d = layer.keys.shape
        return b, h, d, layer.values.shape[-1]
    return 1, layer.head_lens.shape[0], layer.keys.shape[-1], layer.values.shape[-1]


@dataclass
class _Stacked:
    """Layers' entries stacked along the batch, padded: [L*B, H, n, ...] (`Observation`'s fields)."""

    keys: Tensor
    values: Tensor | None
    positions: Tensor
    valid: Tensor | None
    state: dict[str, Tensor]
    # `_stacked_ragged`: each slot's row in the layers' storages concatenated (`_storages`), [L*H, n].
    rows: Tensor | None = None


@dataclass
class _Chosen:
    """One group of Ada-KV's stacked compression between its choice and its keeping
    (`Policy._compress_adaptive`): what stays alive while the other groups are chosen."""

    layers: list[BudgetedLayer]
    chosen: Tensor  # [L, H, W] bool: the slots each layer keeps
    counts: Tensor  # [L, H]: kept per head
    rows: Tensor | None  # `_Stacked.rows`; None: the layers are unpadded, a slot's index is its row
    positions: Tensor  # [L, H, W], stacked
    state: dict[str, Tensor]  # name -> [L, H, W], stacked, as the scorer left it


def _storages(layers: list[BudgetedLayer], parts: list[Tensor]) -> Tensor:
    """One field of batch-1 layers' storages (``parts``, one per layer), ragged [N, ...] or dense
    [1, H, n, ...], as one tensor of rows, head after head, layer after layer (as the heads of one
    ragged layer): a copy unless there is one layer."""
    flat = [p if layer.head_lens is not None else p[0].flatten(0, 1) for p, layer in zip(parts, layers)]
    return flat[0] if len(flat) == 1 else torch.cat(flat)


def _stacked_ragged(layers: list[BudgetedLayer], sizes: list[tuple[int, ...]], lens: Tensor, width: int,
                    values: bool) -> _Stacked:
    """Batch-1 layers, ragged or dense, stacked as their padded views (`BudgetedLayer.view`)
    would be, each head padded to ``width``: [L, H, width, ...]. One gather per field over the
    layers' storages concatenated, its index built from ``sizes`` (entries per head of each
    layer, on the host) and ``lens`` (the same on the device, [L*H], head after head): nothing
    is read back from the device. ``values``: whether to stack them (else None)."""
    h = len(sizes[0])
    # Heads lie one after the other in the concatenated storages, as in one ragged layer.
    rows, valid = _padded_index(lens, width, sum(map(sum, sizes)))

    def stacked(parts: list[Tensor], fill: float = 0) -> Tensor:
        flat = _storages(layers, parts)
        return _take_padded(flat, rows, valid, fill).view(len(layers), h, width, *flat.shape[1:])

    return _Stacked(
        keys=stacked([layer.keys for layer in layers]),
        values=stacked([layer.values for layer in layers]) if values else None,
        positions=stacked([layer.positions for layer in layers], fill=-1),
        valid=valid.view(len(layers), h, width),
        state={k: stacked([layer.state[k] for layer in layers]) for k in layers[0].state},
        rows=rows,
    )


def _stack_entries(parts: list[Tensor], n: int, fill: float = 0) -> Tensor:
    """[B, H, n_i, ...] tensors stacked along the batch, each padded with ``fill`` after its
    entries up to ``n``: [len(parts) * B, H, n, ...] (one concatenation when none needs it)."""
    if all(p.shape[2] == n for p in parts):
        return torch.cat(parts)
    b = parts[0].shape[0]
    out = parts[0].new_full((len(parts) * b, parts[0].shape[1], n, *parts[0].shape[3:]), fill)
    for i, p in enumerate(parts):
        out[i * b : (i + 1) * b, :, : p.shape[2]] = p
    return out


def _row_values(values: list[list[int]], repeat: int, device: torch.device) -> Tensor:
    """Per-layer integers from the host as an int64 [len(values), layers * repeat] tensor on
    ``device``, each repeated for its layer's ``repeat`` batch rows (`transfer.to_device`: the
    host does not wait for the GPU)."""
    return to_device(torch.tensor(values, dtype=torch.long).repeat_interleave(repeat, dim=1), device)


def demotion_index(scores: Tensor, obs: Observation, n_body: int, window: int) -> Tensor:
    """MiKV: instead of evicting, full-precision entries outside each head's top ``budget`` move
    to the low-precision body. ``scores`` cover the full-precision tail only (encoded entries
    never return). Returns the rebuild index over all entries: [body | demoted | kept]."""
    scores = _ranked(scores, obs, window)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    kept = order[..., : obs.budget].sort(dim=-1).values + n_body
    demoted = order[..., obs.budget :].sort(dim=-1).values + n_body
    body = torch.arange(n_body, device=scores.device).expand(*scores.shape[:2], n_body)
    return torch.cat([body, demoted, kept], dim=-1)


def _with_body_state(tail_state: dict[str, Tensor], layer: BudgetedLayer, n_body: int) -> dict[str, Tensor]:
    """Per-entry state over all entries: the body's as it was, the tail's as just scored."""
    out = {}
    for name, s in tail_state.items():
        body = layer.state[name][..., :n_body] if name in layer.state else s.new_zeros(*s.shape[:2], n_body)
        out[name] = torch.cat([body, s], dim=-1)
    return out


def _unpad_state(state: dict[str, Tensor], layer: BudgetedLayer) -> dict[str, Tensor]:
    if layer.head_lens is None:
        return state
    total = layer.total_entries()
    return {k: padded_to_ragged(s[0], layer.head_lens, total) for k, s in state.items()}


def make_policy(name: str, budget: int | str | Budget | None = None, **kwargs) -> Policy:
    """``kb.policy("snapkv", budget=512)``. Parts joined by ``+`` add an allocator and/or a store:
    ``"snapkv+pyramid"``, ``"snapkv+kivi4"``, ``"kivi2"`` (a store alone keeps every token),
    ``"mikv"``. Keyword arguments go to the scorer or the store whose constructor takes them;
    ``allocator``, ``window``, ``block_size``, ``seed`` and ``decode_interval`` to the policy."""
    from . import load_all

    load_all()
    spec = {"name": name, "budget": None if budget is None else str(parse_budget(budget)), "kwargs": dict(kwargs)}
    head, *rest = [part.strip() for part in name.strip().lower().split("+")]
    allocator = kwargs.pop("allocator", None)
    store_name = kwargs.pop("store", None)
    if head in PRESETS:
        scorer_name, preset = PRESETS[head]
        allocator = allocator or preset.get("allocator")
        policy_name = head
    elif head in STORES and head not in SCORERS:
        # A store on its own: its default scorer (full = keep every token, quantized).
        store_name, scorer_name, policy_name = head, STORES[head].default_scorer, head
    else:
        scorer_name, policy_name = head, None
    for part in rest:
        if part in STORES:
            if store_name is not None and store_name != part:
                raise UnknownPolicyError(f"policy '{name}': two stores given ({store_name}, {part})")
            store_name = part
            continue
        if allocator is not None and allocator != part:
            raise UnknownPolicyError(f"policy '{name}': two allocators given ({allocator}, {part})")
        allocator = part
    if scorer_name not in SCORERS:
        known = ", ".join(sorted([*SCORERS, *PRESETS, *STORES]))
        raise UnknownPolicyError(f"unknown policy '{head}' (known: {known})")
    window = kwargs.pop("window", 32)
    block_size = kwargs.pop("block_size", 256)
    seed = kwargs.pop("seed", 0)
    decode_interval = kwargs.pop("decode_interval", None)
    scorer_cls = SCORERS[scorer_name]
    heads = kwargs.pop("heads", getattr(scorer_cls, "default_heads", "uniform"))
    alpha = kwargs.pop("alpha", 1.2)
    profile = kwargs.pop("profile", None)
    allocator = allocator or getattr(scorer_cls, "default_allocator", None)
    store = None
    try:
        if store_name is not None:
            store_cls = STORES[store_name]
            accepted = inspect.signature(store_cls.__init__).parameters
            store_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
            store = store_cls(**STORE_VARIANTS.get(store_name, {}), **store_kwargs)
        scorer = SCORERS[scorer_name](window=window, **kwargs)
    except TypeError as exc:
        raise UnknownPolicyError(f"policy '{name}': {exc}") from None
    if policy_name is None:
        default = getattr(scorer_cls, "default_allocator", "uniform")
        parts = [scorer_name] + [p for p in (allocator, store_name) if p not in (None, "uniform", default)]
        policy_name = "+".join(parts)
    elif store_name is not None and store_name != head:
        policy_name = f"{policy_name}+{store_name}"
    demotes = store is not None and store.demotes
    if store is not None and not demotes and ((allocator or "") in HEAD_ADAPTIVE or heads == "adaptive"):
        raise UnknownPolicyError(
            f"policy '{name}': store '{store_name}' needs every head to keep the same number of entries; "
            "use it with the uniform or pyramid allocator"
        )
    if store is not None and store.cross_layer and scorer.evicts:
        raise UnknownPolicyError(f"policy '{name}': store '{store_name}' merges layers and cannot be combined with eviction")
    if not scorer.evicts and not demotes:
        budget = None
    policy = Policy(
        scorer, budget, allocator or "uniform", window, block_size, seed,
        name=policy_name, store=store, decode_interval=decode_interval, heads=heads, alpha=alpha, profile=profile,
    )
    policy.spec = spec
    return policy
