"""Policies: one short file per method; `base` holds the protocol and the shared machinery."""

from importlib import import_module

from ..store import STORE_VARIANTS, STORES
from .base import PRESETS, SCORERS, Observation, Policy, Scorer, make_policy, register

_MODULES = (
    "full", "random", "streaming", "snapkv", "h2o", "tova", "keydiff", "knorm", "a2sf", "scissorhands",
    "kvzip", "lazy", "kivi", "rotate", "mikv", "think", "minicache", "epicache",
    "expected_attention", "criticalkv", "chunkkv", "compactor", "curdkv", "lagkv", "finch", "simlayerkv", "capkv",
)


def load_all() -> None:
    """Import every policy module so that its scorers and stores register themselves."""
    for name in _MODULES:
        import_module(f"{__name__}.{name}")


PRESET_PAPERS = {"pyramidkv": "PyramidKV (Cai et al. 2024)", "adakv": "Ada-KV (Feng et al. 2024)",
                 "criticaladakv": "CriticalKV (Feng et al. 2025)"}


def describe() -> list[dict]:
    """One row per policy: name, kind, paper, what it does, what it saves, whether it needs
    attention (observed queries)."""
    load_all()
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


__all__ = ["PRESETS", "SCORERS", "Observation", "Policy", "Scorer", "describe", "load_all", "make_policy", "register"]
