"""Block-wise prefill: the context goes through the model in blocks of ``block_size`` tokens and
after each block the policy cuts the cache back to the budget, so a budgeted layer never holds
more than budget + block_size entries per head, whatever the context length."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from ..compress import Policy, compress
from ..errors import BudgetError
from ..kv.cache import BudgetedCache
from .modelcall import run

T = TypeVar("T")

# Tokens per prefill block: a layer never holds more than its budget + one block.
BLOCK_SIZE = 128


@dataclass
class PrefillStats:
    """What one prefill cost."""

    tokens: int = 0
    blocks: int = 0
    seconds: float = 0.0
    compress_seconds: float = 0.0  # scoring + eviction, included in ``seconds`` (CUDA: stream time, events)

    def add(self, other: "PrefillStats") -> None:
        self.tokens += other.tokens
        self.blocks += other.blocks
        self.seconds += other.seconds
        self.compress_seconds += other.compress_seconds


@torch.inference_mode()
def prefill(
    model,
    cache: BudgetedCache,
    policy: Policy,
    input_ids: Tensor,
    block_size: int = BLOCK_SIZE,
    compress_last: bool = True,
    scoring_ids: Tensor | None = None,
    tokenizer=None,
    compressor: Callable[[BudgetedCache, Policy], None] | None = None,
) -> tuple[Tensor, PrefillStats]:
    """Feed ``input_ids`` ([1, T]) block by block; returns the last token's logits and the stats.

    ``compress_last=False`` leaves the final block uncompressed (a question about to be answered
    is not used to evict the context it asks about: multi-turn mode compresses after the answer).

    ``scoring_ids`` ([1, S]): tokens run after each block as *scoring queries* — their queries
    are observed, their KV is discarded — so scorers see them as the window instead of the
    block's own tail. With the question here this is the query-aware mode of SnapKV-style papers,
    kept under the same peak memory; EpiCache passes an episode's patched prompt.

    ``tokenizer``: the model's, for a scorer that builds its own scoring prompt (KVzip).

    ``compressor``: what cuts the cache back after a block, instead of `compress` (EpiCache's
    episodes each choose from one shared cache, `runtime.episodic`).
    """
    return drain(prefill_blocks(model, cache, policy, input_ids, block_size, compress_last, scoring_ids, tokenizer,
                                compressor))


@dataclass(eq=False)
class Block:
    """A block of tokens waiting for its forward: what `prefill_blocks` yields. Whoever drives
    the prefill runs it (`Block.run`: alone; the batching engine: with other sessions' blocks in
    one forward, `runtime.engine.batch_forward`) and sends its last token's logits back."""

    model: object
    cache: BudgetedCache
    ids: Tensor  # [1, q] on the model's device

    @torch.inference_mode()
    def run(self) -> Tensor:
        """The block through the model alone; its last token's logits [1, vocab]."""
        return run(self.model, self.cache, self.ids, logits_to_keep=1).logits[:, -1]


def drain(steps: Generator[Block | None, Tensor | None, T]) -> T:
    """Run a generator of blocks (`prefill_blocks`) to its end, each block alone; returns what
    it returns."""
    sent = None
    while True:
        try:
            block = steps.send(sent)
        except StopIteration as done:
            return done.value
        sent = None if block is None else block.run()


def prefill_blocks(
    model,
    cache: BudgetedCache,
    policy: Policy,
    input_ids: Tensor,
    block_size: int = BLOCK_SIZE,
    compress_last: bool = True,
    scoring_ids: Tensor | None = None,
    tokenizer=None,
    compressor: Callable[[BudgetedCache, Policy], None] | None = None,
) -> Generator[Block, Tensor, tuple[Tensor, PrefillStats]]:
    """`prefill`, one block per step: yields each `Block` before its forward and takes its last
    token's logits back (``send``), then compresses, and returns what `prefill` returns once the
    last block is done. `drain` runs the blocks alone; the batching engine (`runtime.engine`)
    runs several sessions' blocks in one forward and other sessions' steps between the blocks; a
    compression's deferred end (`BudgetedCache.defer`) waits in this cache meanwhile, as it waits
    for the next block's forward."""
    if block_size <= 0:
        raise BudgetError(f"block size must be positive, got {block_size}")
    stats = PrefillStats(tokens=input_ids.shape[1])
    _sync(model.device)
    start = time.perf_counter()
    timer = _Timer(model.device)
    # A store eviction's last step waits for values from the GPU: deferred until the next
    # block's forward is queued (`BudgetedCache.defer`), so the GPU does not idle meanwhile.
    cache.defer_settle = True
    logits = None
    n = input_ids.shape[1]
    try:
        for s in range(0, n, block_size):
            last = s + block_size >= n
            block = input_ids[:, s : s + block_size].to(model.device)
            logits = yield Block(model, cache, block)
            with torch.inference_mode():
                _after_block(model, cache, policy, block, compress_last or not last, scoring_ids, tokenizer, stats,
                             timer, compressor or compress)
                if last:
                    _settle(cache, timer)
    finally:
        cache.defer_settle = False
        with torch.inference_mode():
            cache.settle()
    _sync(model.device)
    stats.seconds = time.perf_counter() - start
    stats.compress_seconds = timer.seconds()
    return logits, stats


def _after_block(model, cache: BudgetedCache, policy: Policy, block: Tensor, compresses: bool,
                 scoring_ids: Tensor | None, tokenizer, stats: PrefillStats, timer: "_Timer",
                 compressor: Callable[[BudgetedCache, Policy], None] = compress) -> None:
    """After a block's forward: the previous compression's end, then this block's compression
    when ``compresses``."""
    _settle(cache, timer)
    cache.track_peak()
    cache.unscored.append(block)
    stats.blocks += 1
    if compresses:
        timer.start()
        fed = torch.cat(cache.unscored, dim=1)
        cache.unscored = []
        scoring = policy.scorer.reconstruction_ids(fed, tokenizer) if policy.evicts else None
        if scoring is None and scoring_ids is not None and policy.scorer.queries != 0 and policy.evicts:
            scoring = scoring_ids
        if scoring is not None:
            observe_scoring_queries(model, cache, scoring)
        compressor(cache, policy)
        timer.stop()


def _settle(cache: BudgetedCache, timer: "_Timer") -> None:
    """The end of the last compression (`BudgetedCache.settle`), timed as part of it."""
    if cache.unsettled:
        timer.start()
        cache.settle()
        timer.stop()


class _Timer:
    """Time spent between start() and stop() calls, summed. On CUDA, by events on the current
    stream, read once at the end: no host sync per block, so the host keeps launching ahead of
    the GPU (a sync before and after each compression idled the GPU while the host launched the
    next kernels, and counted the host's launch time as compression time even where the GPU,
    busy with the block before, would have hidden it). What is measured is the stream's time from
    the compression's first kernel to its last, gaps included. Elsewhere, wall-clock time."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.total = 0.0
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record(torch.cuda.current_stream(self.device))
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.events[-1][1].record(torch.cuda.current_stream(self.device))
        else:
            self.total += time.perf_counter() - self._t0

    def seconds(self) -> float:
        """The sum so far (on CUDA, after the recorded work has run: callers sync first)."""
        return self.total + sum(a.elapsed_time(b) for a, b in self.events) / 1e3


def _sync(device: torch.device) -> None:
    """Wait for the work queued on the current stream so that wall-clock timers measure it (only
    that stream: cache copies on the side stream keep overlapping, `BudgetedCache.to`)."""
    if torch.device(device).type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def observe_scoring_queries(model, cache: BudgetedCache, scoring_ids: Tensor) -> None:
    """Run ``scoring_ids`` after the cache's tokens: keep their queries, forget their KV."""
    for layer in cache.layers:
        layer.clear_queries()
    with cache.scratch(keep_queries=True), cache.transient():
        run(model, cache, scoring_ids.to(model.device), logits_to_keep=1)
