"""API keys: who is asking, checked before anything else is read.

Clients send ``Authorization: Bearer KEY``, as OpenAI clients do. The server keeps only the
SHA-256 of each key (keys are long random secrets, so a plain hash is as good as a slow one), and
that hash is the *owner* recorded with every session the key creates (`keys.key_owner`): no raw
key is ever stored.
A presented key is hashed and compared with every known hash in constant time. Without keys the
server is open and every session has the empty owner.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from .keys import check_key, key_owner
from .metrics import Metrics
from .schema import APIError, error_response

PUBLIC_PATHS = frozenset({"/healthz", "/"})  # the health check, and the chat page (static: it asks for the key)


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
