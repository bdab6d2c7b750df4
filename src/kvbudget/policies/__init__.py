"""Policies: one short file per method; `base` holds the protocol and the shared machinery."""

from importlib import import_module

from .base import PRESETS, SCORERS, Observation, Policy, Scorer, make_policy, register

_MODULES = ("full", "random", "streaming", "snapkv", "h2o", "tova", "keydiff", "knorm", "a2sf", "scissorhands")


def load_all() -> None:
    """Import every policy module so that its scorers register themselves."""
    for name in _MODULES:
        import_module(f"{__name__}.{name}")


PRESET_PAPERS = {"pyramidkv": "PyramidKV (Cai et al. 2024)", "adakv": "Ada-KV (Feng et al. 2024)"}


def describe() -> list[dict]:
    """One row per policy: name, paper, what it does, whether it needs attention (queries)."""
    load_all()
    rows = []
    for name, cls in sorted(SCORERS.items()):
        scorer = cls()
        rows.append({"name": name, "paper": cls.paper, "summary": cls.summary, "needs_attention": scorer.needs_attention})
    for name, (scorer_name, preset) in sorted(PRESETS.items()):
        scorer = SCORERS[scorer_name]()
        rows.append(
            {
                "name": name,
                "paper": PRESET_PAPERS.get(name, ""),
                "summary": f"{scorer_name} scores, {preset.get('allocator')} layer budgets",
                "needs_attention": scorer.needs_attention,
            }
        )
    return rows


__all__ = ["Observation", "Policy", "Scorer", "SCORERS", "PRESETS", "make_policy", "register", "load_all", "describe"]
