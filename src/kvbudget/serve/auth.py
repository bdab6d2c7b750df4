"""API keys: who is asking, checked before anything else is read.

Clients send ``Authorization: Bearer KEY``, as OpenAI clients do. The server keeps only the
SHA-256 of each key (keys are long random secrets, so a plain hash is as good as a slow one), and
that hash is the *owner* recorded with every session the key creates: no raw key is ever stored.
A presented key is hashed and compared with every known hash in constant time. Without keys the
server is open and every session has the empty owner.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import KVBudgetError
from .metrics import Metrics
from .schema import APIError, error_response

MIN_KEY_CHARS = 16
PUBLIC_PATHS = frozenset({"/healthz", "/"})  # the health check, and the chat page (static: it asks for the key)


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


class Keys:
    """The accepted keys, as hashes."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._hashes = [bytes.fromhex(key_owner(check_key(k))) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id for an ``Authorization`` header value, or None if it holds no valid key.
        Every known hash is compared, in constant time, whichever matches."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode("utf-8")).digest()
        found = False
        for known in self._hashes:
            found |= hmac.compare_digest(digest, known)
        return digest.hex() if found else None


class RequireKey:
    """ASGI middleware: a request to any path but `PUBLIC_PATHS` needs a valid key (401 JSON
    otherwise); its owner id is put in ``scope["state"]["owner"]`` ("" when the server has no
    keys)."""

    def __init__(self, app: ASGIApp, keys: Keys, metrics: Metrics) -> None:
        self.app, self.keys, self.metrics = app, keys, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        owner = ""
        if self.keys.enabled:
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"),
                          None)
            owner = self.keys.owner(header)
            if owner is None and scope.get("path") not in PUBLIC_PATHS:
                self.metrics.count("auth_failures")
                error = APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await error_response(error)(scope, receive, send)
        scope.setdefault("state", {})["owner"] = owner or ""
        await self.app(scope, receive, send)


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
