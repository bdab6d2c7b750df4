"""The HTTP API: OpenAI-compatible chat completions over persistent, budgeted sessions.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``POST /v1/sessions``, ``GET|DELETE /v1/sessions/{id}``, ``GET /metrics`` (Prometheus text),
``GET /openapi.json``, and, without a key, ``GET /healthz`` and the chat page at ``/``.

A request passes, in order: the response counter, the API key (`auth.RequireKey`), the body
limits (`limits.BodyLimit`: size, UTF-8, JSON nesting), the schema (`schema`: types, unknown
fields), the message limits (`limits.TokenCounter`: characters, tokens), the bounded queue
(`limits.Admission`) and its deadline, and only then the model thread (`manager`). Every
error is JSON, ``{"error": {"message", "type", "code", "param"}}``, and never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import KVBudgetError
from .auth import Keys, RequireKey
from .config import ServeConfig
from .limits import Admission, BodyLimit, Deadline, TokenCounter
from .manager import SessionManager, TurnResult
from .metrics import CountResponses
from .schema import (
    FIELDS,
    SESSION_ID_PATTERN,
    APIError,
    ChatCompletionRequest,
    ChatRequest,
    SessionCreate,
    chat_request,
    error_response,
)
from .streaming import Outbox, TextStreamer, next_events, sse

log = logging.getLogger("kvbudget.serve")
PAGE = Path(__file__).parent / "static" / "index.html"
# Fields of OpenAI's API this server refuses unless they hold their neutral value.
UNSUPPORTED = {
    "n": "one choice per request", "logprobs": "log-probabilities are not returned",
    "top_logprobs": "log-probabilities are not returned", "stop": "up to 4 non-empty stop sequences",
    "logit_bias": "logit bias is not supported", "tools": "tools are not supported",
    "tool_choice": "tools are not supported", "functions": "functions are not supported",
    "function_call": "functions are not supported", "audio": "audio is not supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "response_format": "only text responses", "modalities": "only text responses",
    "tool_calls": "tool calls are not supported",
}
SessionIdPath = Annotated[str, PathParam(pattern=SESSION_ID_PATTERN)]


def _completion(result: TurnResult, model: str) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "total_tokens": result.prompt_tokens + result.completion_tokens},
        "session_id": result.session_id,
        "kvbudget": result.stats(),
    }


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first thing wrong with a request, as a 400 naming its field."""
    first = exc.errors()[0]
    where, *rest = first["loc"] or ("body",)
    unknown = first["type"] == "extra_forbidden" and rest
    parts = [p for p in (rest[:-1] if unknown else rest) if isinstance(p, int) or p in FIELDS]  # no union tags
    if unknown:
        parts.append(str(rest[-1]))  # the unknown field's own name
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    if where == "header":
        param = "X-Session-Id"
    elif where == "path":
        param = "id"
    msg = first["msg"].removeprefix("Value error, ")
    if unknown:
        return APIError(400, f"unknown field {param!r} (this server reads OpenAI's chat completion fields, "
                        "session_id and policy)", code="unknown_field", param=param)
    if not parts and where == "body" and first["type"] in ("model_attributes_type", "model_type", "dict_type", "missing"):
        return APIError(400, "request body must be a JSON object", code="invalid_json")
    field = next((p for p in reversed(parts) if isinstance(p, str)), None)
    if field in UNSUPPORTED:
        msg = f"{UNSUPPORTED[field]} ({msg})"
    return APIError(400, f"{param or 'request body'}: {msg}", param=param or None)


async def _finish(job: asyncio.Future, deadline: Deadline):
    """The job's result, or the deadline's error (408) once its time is up, unless the job has
    committed its work by then (its answer is waited for: it is being saved)."""
    done, _ = await asyncio.wait({job}, timeout=deadline.remaining())
    if not done and deadline.expire():
        job.add_done_callback(_retrieve)
        raise deadline.error()
    return await job


def _retrieve(job: asyncio.Future) -> None:
    """Take a finished job's exception (an abandoned job's error is expected, not news)."""
    if not job.cancelled():
        job.exception()


def create_app(model, tok, config: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``model`` under ``config``."""
    manager = SessionManager(model, tok, config)
    outbox = Outbox()  # the model thread's streaming events, to the requests' queues
    metrics = manager.metrics
    limits = config.limits
    admission = Admission(limits, metrics)
    counter = TokenCounter(tok, limits, metrics)

    async def expire_idle_sessions() -> None:
        interval = min(60.0, max(0.05, limits.session_ttl_s / 4))
        while True:
            try:
                await manager.call(manager.expire)
            except Exception:
                log.exception("expiring idle sessions failed")
            await asyncio.sleep(interval)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = asyncio.create_task(expire_idle_sessions()) if limits.session_ttl_s > 0 else None
        yield
        if sweeper is not None:
            sweeper.cancel()
        counter.close()
        await asyncio.to_thread(manager.close)

    app = FastAPI(title="kvbudget", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager
    app.state.admission = admission
    # Added innermost first: a request meets the counter, then the key, then the body limits.
    app.add_middleware(BodyLimit, limits=limits, metrics=metrics)
    app.add_middleware(RequireKey, keys=Keys(config.api_keys), metrics=metrics)
    app.add_middleware(CountResponses, metrics=metrics)

    # --- errors: always JSON, never fatal ----------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(KVBudgetError)
    async def kvbudget_error(request: Request, exc: KVBudgetError) -> JSONResponse:
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(APIError(exc.status_code, str(exc.detail), code, headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        metrics.count("internal_errors")
        log.exception("internal error on %s", request.url.path)
        return error_response(APIError(500, f"internal error ({type(exc).__name__}); the server logged it",
                                       "internal_error"))

    # --- the model thread, behind the queue and the clock -------------------------------------
    async def on_model_thread(fn, *args):
        """Run a session operation (not interruptible: it commits as it starts) on the model thread."""
        deadline = Deadline(limits.request_timeout_s, metrics)
        release = admission.enter()

        def committed():
            deadline.commit()
            return fn(*args)

        job = asyncio.ensure_future(manager.call(committed))
        job.add_done_callback(lambda _: release())
        return await _finish(job, deadline)

    # --- plain routes ------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/healthz")
    async def healthz() -> dict:
        served = [manager.policies[name.strip().lower()].name for name in config.policies]  # the default first
        return {"status": "ok", "model": config.model_name, "policies": list(dict.fromkeys(served)),
                "budget": config.budget, "memory": config.memory}

    @app.get("/metrics")
    async def metrics_page() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                             "owned_by": "kvbudget"}]}

    # --- sessions ----------------------------------------------------------------------------
    @app.post("/v1/sessions")
    async def create_session(request: Request, body: SessionCreate | None = None) -> dict:
        body = body or SessionCreate()
        return await on_model_thread(manager.create, request.state.owner, body.id, body.policy)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(request: Request, session_id: SessionIdPath) -> dict:
        return await on_model_thread(manager.describe, request.state.owner, session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(request: Request, session_id: SessionIdPath) -> dict:
        return await on_model_thread(manager.delete, request.state.owner, session_id)

    # --- chat ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatCompletionRequest,
                   x_session_id: Annotated[str | None, Header(pattern=SESSION_ID_PATTERN)] = None):
        start = time.perf_counter()
        status = 500
        try:
            req = chat_request(body, x_session_id, config.default_max_tokens, config.max_tokens)
            await counter.check(req.messages)
            deadline = Deadline(limits.request_timeout_s, metrics)
            release = admission.enter()
            if req.stream:
                response = await _stream(request.state.owner, req, deadline, release, start)
                status = None  # recorded when the stream ends
                return response
            job = asyncio.wrap_future(manager.submit_chat(request.state.owner, req, None, deadline))
            job.add_done_callback(lambda _: release())
            result = await _finish(job, deadline)
            status = 200
            headers = {"X-Session-Id": result.session_id} if result.session_id else None
            return JSONResponse(_completion(result, config.model_name), headers=headers)
        except APIError as exc:
            status = exc.status
            raise
        finally:
            if status is not None:
                metrics.request(status, time.perf_counter() - start)

    async def _stream(owner: str, req: ChatRequest, deadline: Deadline, release, start: float) -> StreamingResponse:
        """Start the request; answer errors found before generation as plain JSON errors, then
        stream the reply as server-sent events. A client that goes away stops the turn at its
        next prompt block or token (the session stays as it was saved)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()  # ("ready" | "token", value) events, then None: the job is over

        def events(kind: str, value: object) -> None:  # on the model thread
            outbox.put(loop, queue, (kind, value))

        job = asyncio.wrap_future(manager.submit_chat(owner, req, events, deadline))
        job.add_done_callback(lambda _: release())
        # After every event of the job: its deliveries were scheduled on the loop before its result.
        job.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            backlog = await next_events(queue, deadline.remaining())
        except TimeoutError:
            backlog = [None]
            if deadline.expire():
                job.add_done_callback(_retrieve)
                raise deadline.error() from None
        if backlog[0] is None:
            return await _finish(job, deadline)  # the request failed its checks: raises the error (a 4xx)
        backlog = backlog[1:]  # after "ready"
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return sse({"id": chat_id, "object": "chat.completion.chunk", "created": created,
                        "model": config.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                        **extra})

        async def body():
            status = 499  # unless the stream ends otherwise: the client went away
            streamer = TextStreamer(tok, req.stop)
            try:
                yield chunk({"role": "assistant", "content": ""})
                committed = False
                pending = backlog
                while True:
                    if not pending:
                        try:
                            pending = await next_events(queue, None if committed else deadline.remaining())
                        except TimeoutError:
                            if deadline.expire():
                                raise deadline.error() from None
                            committed = True  # the turn is being saved: its answer comes, whatever the clock
                            continue
                    # The tokens that came since the last event: one delta (a loop that lags behind
                    # the decode steps catches up in fewer, larger events).
                    tokens = [event[1] for event in pending if event is not None and event[0] == "token"]
                    delta = streamer.push(*tokens) if tokens else ""
                    if delta:
                        yield chunk({"content": delta})
                    if None in pending:
                        break
                    pending = []
                result: TurnResult = job.result()
                rest = streamer.finish(result.text)
                if rest:
                    yield chunk({"content": rest})
                full = _completion(result, config.model_name)
                yield chunk({}, result.finish_reason, usage=full["usage"], session_id=result.session_id,
                            kvbudget=full["kvbudget"])
                yield sse("[DONE]")
                status = 200
            except APIError as exc:
                status = exc.status
                yield sse(exc.body())
            except Exception as exc:  # the stream has started: the error can only be an event now
                metrics.count("internal_errors")
                log.exception("error while streaming")
                status = 500
                yield sse(APIError(500, f"internal error ({type(exc).__name__}); the server logged it",
                                   "internal_error").body())
            finally:
                if status == 499:
                    deadline.cancel()
                if not job.done() or status != 200:
                    job.add_done_callback(_retrieve)
                metrics.request(status, time.perf_counter() - start)

        headers = {"X-Session-Id": req.session_id} if req.session_id else None
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return app
