"""Reading one record of a published dataset: each field checked as it is read, so that a record in
another schema fails on the first field it lacks, named with its path (``multi_turns[2].input``)."""

from __future__ import annotations

from typing import Any


class FieldError(Exception):
    """A record field that is missing or of the wrong type; the loader registry adds where."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"field '{path}' {problem}")
        self.path, self.problem = path, problem


_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number"}


def kind_name(value: Any) -> str:
    """JSON name of a value's type, for messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def need(obj: dict, key: str, types: type | tuple[type, ...], path: str | None = None) -> Any:
    """``obj[key]``, which must exist and be of ``types``; ``path`` names it in errors (default key)."""
    name = path or key
    if key not in obj:
        raise FieldError(name, "is missing")
    value = obj[key]
    wanted = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
        expected = " or ".join(_NAMES.get(t, t.__name__) for t in wanted)
        raise FieldError(name, f"must be {expected} (got {kind_name(value)})")
    return value


def as_object(value: Any, path: str) -> dict:
    """``value``, which must be a JSON object."""
    if not isinstance(value, dict):
        raise FieldError(path, f"must be an object (got {kind_name(value)})")
    return value


def text(obj: dict, key: str, path: str | None = None) -> str:
    """A non-empty string field."""
    value = need(obj, key, str, path)
    if not value.strip():
        raise FieldError(path or key, "must not be empty")
    return value


def answer_text(value: Any, path: str) -> str:
    """A gold answer given as a string or a number (published files hold both) as a string."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FieldError(path, f"must be a string or a number (got {kind_name(value)})")
    out = str(value).strip()
    if not out:
        raise FieldError(path, "must not be empty")
    return out
