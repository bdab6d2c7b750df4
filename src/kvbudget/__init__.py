"""kvbudget: run HuggingFace LLMs with the KV cache held under a hard memory budget.

    import kvbudget as kb
    model, tok = kb.load_model()
    session = kb.Session(model, tok, kb.policy("snapkv", budget=512))
    session.add_context(document)
    print(session.ask("What is the code for the blue door?"))
"""

from .attention import attach
from .budget import Budget, parse_budget
from .cache import BudgetedCache, BudgetedLayer
from .errors import (
    BudgetError,
    KVBudgetError,
    ModelNotFoundError,
    SessionFileError,
    TaskFileError,
    UnknownPolicyError,
    UnsupportedModelError,
)
from .generate import Session, Turn
from .models import load_model
from .policies import describe as list_policies
from .policies.base import Policy, make_policy as policy
from .prefill import prefill

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetError",
    "BudgetedCache",
    "BudgetedLayer",
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
    "list_policies",
    "load_model",
    "parse_budget",
    "policy",
    "prefill",
]
