"""Requests the server accepts, checked field by field: every malformed request becomes an
`APIError` (an HTTP 4xx with an OpenAI-style JSON error body naming the field) before any model
work starts."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code", "param"}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


@dataclass
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body."""

    messages: list[dict]  # {"role", "content": str}; the last one is the user's question
    max_tokens: int
    stream: bool = False
    session_id: str | None = None
    policy: str | None = None
    model: str | None = None

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def context(self) -> list[dict]:
        """Messages before the question (fed as context first)."""
        return self.messages[:-1]


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says why not."""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def check_session_id(value: object, param: str = "session_id") -> str:
    if not isinstance(value, str) or not SESSION_ID.fullmatch(value):
        raise APIError(400, f"{param} must be 1-64 letters, digits, '-' or '_', got {value!r}", param=param)
    return value


def _content(value: object, i: int) -> str:
    """Message content: a string, or OpenAI's list of parts (text parts only)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        texts = [p.get("text") for p in value]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def parse_messages(value: object) -> list[dict]:
    """A non-empty list of ``{"role", "content"}`` ending with a user message."""
    if not isinstance(value, list):
        raise APIError(400, f"messages must be a list of {{role, content}} objects, got {type(value).__name__}",
                       param="messages")
    if not value:
        raise APIError(400, "messages is empty: send at least the user's message", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                           param=f"messages[{i}].role")
        out.append({"role": m["role"], "content": _content(m.get("content"), i)})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's (role 'user')", param="messages")
    if not out[-1]["content"].strip():
        raise APIError(400, "the last user message is empty", param="messages")
    return out


def parse_chat(body: dict, header_session: str | None, default_max_tokens: int, max_tokens_cap: int) -> ChatRequest:
    """Check a chat completion body (and the ``X-Session-Id`` header)."""
    messages = parse_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_tokens_cap:
        raise APIError(400, f"max_tokens must be an integer from 1 to {max_tokens_cap}, got {max_tokens!r}",
                       param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    if body.get("n", 1) != 1:
        raise APIError(400, "only n=1 is supported (decoding is greedy)", param="n")
    session_id = body.get("session_id")
    if session_id is not None:
        session_id = check_session_id(session_id)
    if header_session is not None:
        header_session = check_session_id(header_session, "X-Session-Id")
        if session_id is not None and session_id != header_session:
            raise APIError(400, f"session_id {session_id!r} and header X-Session-Id {header_session!r} differ",
                           param="session_id")
        session_id = header_session
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise APIError(400, f"policy must be a string, got {policy!r}", param="policy")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"model must be a string, got {model!r}", param="model")
    return ChatRequest(messages, max_tokens, stream, session_id, policy, model)
