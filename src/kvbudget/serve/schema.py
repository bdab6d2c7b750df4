"""Requests the server accepts, as pydantic models (they are also the OpenAPI schema), and the
error every refusal is answered with.

A chat completion request accepts every field of OpenAI's chat completion API, so that OpenAI
clients work unchanged, and refuses any other field by name. Decoding is greedy unless
``temperature`` is above 0: then tokens are sampled (with ``top_p`` and ``seed``). ``stop`` ends
the answer before the first of up to 4 sequences. Penalties are accepted and have no effect.
Fields asking for what this server cannot do (tools, log-probabilities, several choices,
audio...) are refused with a 400 naming the field unless they hold their neutral value.
kvbudget adds ``session_id`` and ``policy``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.responses import JSONResponse

SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN, description="1-64 letters, digits, '-' or '_'")]


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "code", "param"}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code, "param": self.param}}


class ErrorJSON(JSONResponse):
    """JSON written in ASCII: an error may quote what the client sent, whatever it holds."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(exc: APIError) -> ErrorJSON:
    return ErrorJSON(exc.body(), status_code=exc.status, headers=exc.headers)


# --- request bodies -----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _text(value: Any) -> Any:
    """Message content: a string, or OpenAI's list of content parts, of which only text parts
    (``{"type": "text", "text": ...}``) are read here; they are joined."""
    if not isinstance(value, list):
        return value  # a string, or a wrong type that the str check names
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part {j} is {kind!r}: only text parts {{'type': 'text', 'text': str}} are read")
        extra = set(part) - {"type", "text"}
        if extra:
            raise ValueError(f"content part {j} has unknown field(s) {', '.join(sorted(extra))}")
        texts.append(part["text"])
    return "".join(texts)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = Annotated[str, BeforeValidator(_text, json_schema_input_type=str | list[TextPart])]


class Message(_Strict):
    """One chat message. The assistant fields of a replayed OpenAI response (``refusal``,
    ``tool_calls``...) are accepted while they are empty."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    name: str | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None
    tool_calls: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatCompletionRequest(_Strict):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1)]
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # Sampling (greedy when temperature is 0 or absent); penalties: accepted, no effect.
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: int | None = None
    # Bookkeeping: accepted, not used.
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    parallel_tool_calls: bool | None = None
    modalities: list[Literal["text"]] | None = None
    response_format: ResponseFormat | None = None
    # Not supported here: accepted only with their neutral value.
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    logprobs: Literal[False] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=4)] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    functions: Annotated[list[dict[str, Any]], Field(max_length=0)] | None = None
    function_call: Literal["none", "auto"] | None = None
    audio: None = None
    prediction: None = None
    web_search_options: None = None
    # kvbudget
    session_id: SessionId | None = Field(None, description="continue this session (kvbudget): send only new messages")
    policy: Annotated[str, Field(max_length=64)] | None = Field(None, description="the policy of a request without a session")

    @model_validator(mode="after")
    def _last_is_a_question(self) -> ChatCompletionRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's (role 'user')")
        if not self.messages[-1].content.strip():
            raise ValueError("the last user message is empty")
        return self


class SessionCreate(_Strict):
    """``POST /v1/sessions``."""

    id: SessionId | None = Field(None, description="the session's id (default: 128 random bits)")
    policy: Annotated[str, Field(max_length=64)] | None = None


FIELDS = frozenset(
    name for model in (ChatCompletionRequest, SessionCreate, Message, StreamOptions, ResponseFormat, TextPart)
    for name in model.model_fields
)


# --- what the model side gets ---------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A checked chat request."""

    messages: list[dict]  # {"role", "content": str}; the last one is the user's question
    max_tokens: int
    stream: bool = False
    session_id: str | None = None
    policy: str | None = None
    model: str | None = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def context(self) -> list[dict]:
        """Messages before the question (fed as context first)."""
        return self.messages[:-1]


def chat_request(body: ChatCompletionRequest, header_session: str | None, default_max_tokens: int,
                 max_tokens_cap: int) -> ChatRequest:
    """The model side's request from a validated body and the ``X-Session-Id`` header."""
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
    if max_tokens > max_tokens_cap:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise APIError(400, f"{param} must be an integer from 1 to {max_tokens_cap}, got {max_tokens}", param=param)
    session_id = body.session_id
    if header_session is not None:
        if session_id is not None and session_id != header_session:
            raise APIError(400, f"session_id {session_id!r} and header X-Session-Id {header_session!r} differ",
                           param="session_id")
        session_id = header_session
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content} for m in body.messages]
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    top_p = 1.0 if body.top_p is None else body.top_p
    if body.temperature and top_p == 0:
        raise APIError(400, "top_p must be above 0 when sampling (temperature > 0)", param="top_p")
    return ChatRequest(messages, max_tokens, bool(body.stream), session_id, body.policy, body.model,
                       body.temperature or 0.0, top_p, body.seed, stop)
