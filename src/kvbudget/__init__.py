"""kvbudget: run HuggingFace LLMs with the KV cache held under a hard memory budget.

    import kvbudget as kb
    model, tok = kb.load_model()
    session = kb.Session(model, tok, kb.policy("snapkv", budget=512))
    session.add_context(document)
    print(session.ask("What is the code for the blue door?"))
"""

from importlib.metadata import PackageNotFoundError, version

from .compress import Policy, compress
from .compress.budget import Budget, parse_budget
from .errors import (
    BudgetError,
    KVBudgetError,
    ModelNotFoundError,
    SessionFileError,
    TaskFileError,
    UnknownPolicyError,
    UnsupportedModelError,
)
from .kv import BudgetedCache, BudgetedLayer, attach
from .methods import describe as list_policies
from .methods import make_policy as policy
from .runtime.engine import Engine
from .runtime.episodic import EpisodicSession
from .runtime.models import load_model
from .runtime.prefill import prefill
from .runtime.answer import Turn
from .runtime.session import Session

try:
    __version__ = version("kvbudget")
except PackageNotFoundError:  # run from a source tree on PYTHONPATH, not installed
    __version__ = "0+source"

__all__ = [
    "Budget",
    "BudgetError",
    "BudgetedCache",
    "BudgetedLayer",
    "Engine",
    "EpisodicSession",
    "KVBudgetError",
    "ModelNotFoundError",
    "Policy",
    "Session",
    "SessionFileError",
    "TaskFileError",
    "Turn",
    "UnknownPolicyError",
    "UnsupportedModelError",
    "attach",
    "compress",
    "list_policies",
    "load_model",
    "parse_budget",
    "policy",
    "prefill",
]
