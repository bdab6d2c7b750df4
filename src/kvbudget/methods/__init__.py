"""The methods: scorers, stores and mergers, one short file each (`methods/scorers`,
`methods/stores`, `methods/mergers`), and `make_policy`, which builds a policy from their names
(``snapkv+pyramid+kivi4``, ``snapkv+merge``)."""

from __future__ import annotations

import inspect

from ..compress.allocation import HEAD_ADAPTIVE
from ..compress.budget import Budget, parse_budget
from ..compress.merger import MERGERS
from ..compress.policy import Policy
from ..compress.scorer import PRESETS, SCORERS
from ..errors import KVBudgetError, UnknownPolicyError
from ..kv.store import STORE_VARIANTS, STORES
from . import mergers, scorers, stores  # noqa: F401 - imported to register every method

# The name part that makes a policy re-rotate its kept keys (`Policy.rerotate`).
REROTATE = "rerotate"
# Decode-time compression interval of a policy whose scorer prefers none.
DECODE_INTERVAL = 64

PRESET_PAPERS = {"pyramidkv": "PyramidKV (Cai et al. 2024)", "adakv": "Ada-KV (Feng et al. 2024)",
                 "criticaladakv": "CriticalKV (Feng et al. 2025)"}


def make_policy(name: str, budget: int | str | Budget | None = None, **kwargs) -> Policy:
    """``kb.policy("snapkv", budget=512)``. Parts joined by ``+`` add an allocator and/or a store:
    ``"snapkv+pyramid"``, ``"snapkv+kivi4"``, ``"kivi2"`` (a store alone keeps every token),
    ``"mikv"``; a merger folds evicted entries into kept ones: ``"snapkv+merge"``, ``"h2o+cam"``.
    A ``rerotate`` part (or ``rerotate=True``) moves the kept keys to contiguous positions after
    each eviction (`kv.rerotation`). Keyword arguments go to the scorer, the store or the merger
    whose constructor takes them; ``allocator``, ``window``, ``seed``, ``decode_interval``,
    ``heads``, ``alpha``, ``profile`` and ``rerotate`` to the policy."""
    spec = {"name": name, "budget": None if budget is None else str(parse_budget(budget)), "kwargs": dict(kwargs)}
    head, *rest = [part.strip() for part in name.strip().lower().split("+")]
    allocator = kwargs.pop("allocator", None)
    store_name = kwargs.pop("store", None)
    merger_name = None
    rerotate = bool(kwargs.pop("rerotate", False)) or REROTATE in rest
    rest = [part for part in rest if part != REROTATE]
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
        if part in MERGERS:
            if merger_name is not None and merger_name != part:
                raise UnknownPolicyError(f"policy '{name}': two mergers given ({merger_name}, {part})")
            merger_name = part
            continue
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
    seed = kwargs.pop("seed", 0)
    decode_interval = kwargs.pop("decode_interval", None)
    if "block_size" in kwargs:
        raise UnknownPolicyError(f"policy '{name}': block_size belongs to the prefill (Session(block_size=...), "
                                 "prefill(..., block_size=...)), not to the policy")
    scorer_cls = SCORERS[scorer_name]
    heads = kwargs.pop("heads", getattr(scorer_cls, "default_heads", "uniform"))
    alpha = kwargs.pop("alpha", 1.2)
    profile = kwargs.pop("profile", None)
    allocator = allocator or getattr(scorer_cls, "default_allocator", None)
    store = merger = None
    try:
        if store_name is not None:
            store_cls = STORES[store_name]
            accepted = inspect.signature(store_cls.__init__).parameters
            store_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
            store = store_cls(**STORE_VARIANTS.get(store_name, {}), **store_kwargs)
        if merger_name is not None:
            merger_cls = MERGERS[merger_name]
            accepted = inspect.signature(merger_cls.__init__).parameters
            merger_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in accepted}
            if "window" in accepted:  # a merger reading attention observes the scorers' window
                merger_kwargs["window"] = window
            merger = merger_cls(**merger_kwargs)
        scorer = SCORERS[scorer_name](window=window, **kwargs)
    except TypeError as exc:
        raise UnknownPolicyError(f"policy '{name}': {exc}") from None
    if policy_name is None:
        default = getattr(scorer_cls, "default_allocator", "uniform")
        parts = [scorer_name] + [p for p in (allocator, store_name) if p not in (None, "uniform", default)]
        policy_name = "+".join(parts)
    elif store_name is not None and store_name != head:
        policy_name = f"{policy_name}+{store_name}"
    if merger_name is not None:
        policy_name = f"{policy_name}+{merger_name}"
    if rerotate:
        policy_name = f"{policy_name}+{REROTATE}"
    demotes = store is not None and store.demotes
    if store is not None and not demotes and ((allocator or "") in HEAD_ADAPTIVE or heads == "adaptive"):
        fix = ("its heads keep different numbers of entries by design" if getattr(scorer_cls, "default_heads", "") == "adaptive"
               else "use it with the uniform or pyramid allocator")
        raise UnknownPolicyError(
            f"policy '{name}': store '{store_name}' needs every head to keep the same number of entries; {fix}")
    if store is not None and store.cross_layer and scorer.evicts:
        raise UnknownPolicyError(f"policy '{name}': store '{store_name}' merges layers and cannot be combined with eviction")
    if not scorer.evicts and not demotes:
        budget = None
    if decode_interval is None:
        decode_interval = scorer.decode_interval or DECODE_INTERVAL
    try:
        return Policy(scorer, None if budget is None else parse_budget(budget), allocator or "uniform", store,
                      window=window, seed=seed, decode_interval=decode_interval, heads=heads, alpha=alpha,
                      profile=profile, merger=merger, rerotate=rerotate, name=policy_name, spec=spec)
    except KVBudgetError as exc:
        raise type(exc)(f"policy '{name}': {exc}") from None


def describe() -> list[dict]:
    """One row per policy: name, kind, paper, what it does, what it saves, whether it needs
    attention (observed queries)."""
    rows = []
    for name, cls in sorted(SCORERS.items()):
        scorer = cls()
        rows.append(
            {"name": name, "kind": "scorer", "paper": cls.paper, "summary": cls.summary, "saves": cls.saves,
             "needs_attention": scorer.needs_attention}
        )
    for name, (scorer_name, preset) in sorted(PRESETS.items()):
        scorer = SCORERS[scorer_name]()
        rows.append(
            {
                "name": name,
                "kind": "preset",
                "paper": PRESET_PAPERS.get(name, ""),
                "summary": f"{scorer_name} scores, {preset.get('allocator')} layer budgets",
                "saves": scorer.saves,
                "needs_attention": scorer.needs_attention,
            }
        )
    for name, cls in sorted(MERGERS.items()):
        rows.append({"name": f"+{name}", "kind": "merger", "paper": cls.paper, "summary": cls.summary,
                     "saves": "tokens (evicted entries merged, then freed)", "needs_attention": bool(cls().queries)})
    rows.append({"name": f"+{REROTATE}", "kind": "option", "paper": "StreamingLLM (Xiao et al. 2024)",
                 "summary": "after each eviction, kept keys re-rotated to contiguous positions: no position limit "
                            "(any scorer, no store)",
                 "saves": "positions (the conversation outlasts the model's)", "needs_attention": False})
    for name, cls in sorted(STORES.items()):
        store = cls(**STORE_VARIANTS.get(name, {}))
        default = SCORERS[cls.default_scorer]()
        rows.append(
            {
                "name": name,
                "kind": "store",
                "paper": cls.paper,
                "summary": cls.summary + ("" if cls.default_scorer == "full" else f" (scorer: {cls.default_scorer})"),
                "saves": cls.saves,
                "needs_attention": bool(store.queries) or default.needs_attention,
            }
        )
    return rows
