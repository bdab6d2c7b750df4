"""Errors raised on bad input. Each message names what is wrong, in one line."""


class KVBudgetError(ValueError):
    """Base class of every user-facing error of kvbudget (CLI prints it as one line)."""


class UnknownPolicyError(KVBudgetError):
    """A policy name that is not registered."""


class BudgetError(KVBudgetError):
    """A budget that is not positive, not parseable, or larger than the context."""


class TaskFileError(KVBudgetError):
    """A malformed task file; the message names the file, line and field."""


class ModelNotFoundError(KVBudgetError):
    """A model that cannot be loaded from local files; the message says what to install."""


class SessionFileError(KVBudgetError):
    """A session file that cannot be loaded: truncated, corrupt, or saved with another model."""


class UnsupportedModelError(KVBudgetError):
    """A model whose cache or attention kvbudget cannot hold: the message names the family and why."""
