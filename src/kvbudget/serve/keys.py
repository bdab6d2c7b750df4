"""API keys as the server's configuration sees them: their form, the key file, and who can
reach a server that listens on an address (`check_bind`, before the model loads). Standard
library only, so that the command line checks them without the server's packages.

The server keeps only the SHA-256 of each key (keys are long random secrets, so a plain hash is as
good as a slow one); that hash is the *owner* recorded with every session the key creates.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

from ..errors import KVBudgetError

MIN_KEY_CHARS = 16


def key_owner(key: str) -> str:
    """The owner id of ``key``: its SHA-256, in hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_key(key: str) -> str:
    """``key`` if it can be an API key (printable ASCII, no spaces, at least 16 characters)."""
    if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or " " in key:
        raise KVBudgetError(
            f"an API key must be at least {MIN_KEY_CHARS} printable ASCII characters without spaces "
            "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return key


def read_key_file(path: str | Path) -> list[str]:
    """The keys in ``path``: one a line; blank lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KVBudgetError(f"cannot read API key file {path}: {exc}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise KVBudgetError(f"API key file {path} holds no key")
    return [check_key(k) for k in keys]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or 'localhost') reaches only this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: list[str], insecure: bool) -> str:
    """What the server says at start about who can reach it; a `KVBudgetError` for an address
    beyond this machine without keys, unless ``insecure``."""
    if keys:
        return f"kvbudget serve: {len(keys)} API key(s); every route but /healthz and / needs one"
    if is_loopback(host):
        return (f"kvbudget serve: no API key: listening on {host} only (loopback); anyone on this machine "
                "can read every session (use --api-key or --api-key-file to serve other machines)")
    if not insecure:
        raise KVBudgetError(f"refusing to listen on {host} without an API key: anyone who reaches it could read "
                            "every session; give --api-key KEY or --api-key-file FILE (or --insecure)")
    return f"kvbudget serve: WARNING: no API key and listening on {host} (--insecure): anyone who reaches it can read every session"
