"""The HTTP API: OpenAI-compatible chat completions over persistent, budgeted sessions.

Routes: ``POST /v1/chat/completions`` (JSON or server-sent events), ``GET /v1/models``,
``POST /v1/sessions``, ``GET|DELETE /v1/sessions/{id}``, ``GET /healthz``, ``GET /metrics``
(Prometheus text) and the chat page at ``/``. Every error is JSON,
``{"error": {"message", "type", "code", "param"}}``, and never stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import KVBudgetError
from .config import ServeConfig
from .manager import SessionManager, TurnResult
from .schema import APIError, ChatRequest, check_session_id, parse_chat, parse_json
from .streaming import TextStreamer, sse

log = logging.getLogger("kvbudget.serve")
PAGE = Path(__file__).parent / "static" / "index.html"


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(APIError(status, message, code, param).body(), status_code=status)


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


async def _next_event(queue: asyncio.Queue, job: asyncio.Future):
    """The next event the model thread sent, or None once the job is over and none is left.
    (Events are queued before the job's result, so none is lost.)"""
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        return getter.result()
    getter.cancel()
    return queue.get_nowait() if not queue.empty() else None


def create_app(model, tok, config: ServeConfig) -> FastAPI:
    """The FastAPI application serving ``model`` under ``config``."""
    manager = SessionManager(model, tok, config)
    metrics = manager.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(manager.close)

    app = FastAPI(title="kvbudget", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.manager = manager

    # --- errors: always JSON, never fatal ----------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(KVBudgetError)
    async def kvbudget_error(request: Request, exc: KVBudgetError) -> JSONResponse:
        return _error(400, str(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    # --- plain routes ------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
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
    async def create_session(request: Request) -> dict:
        body = parse_json(await request.body())
        session_id = body.get("id")
        policy = body.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise APIError(400, f"policy must be a string, got {policy!r}", param="policy")
        return await manager.call(manager.create, session_id, policy)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict:
        return await manager.call(manager.describe, check_session_id(session_id, "id"))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str) -> dict:
        return await manager.call(manager.delete, check_session_id(session_id, "id"))

    # --- chat ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        start = time.perf_counter()
        status = 500
        try:
            body = parse_json(await request.body())
            req = parse_chat(body, request.headers.get("x-session-id"), config.default_max_tokens, config.max_tokens)
            if req.stream:
                response = await _stream(req, start)
                status = None  # recorded when the stream ends
                return response
            result = await manager.call(manager.chat, req)
            status = 200
            headers = {"X-Session-Id": result.session_id} if result.session_id else None
            return JSONResponse(_completion(result, config.model_name), headers=headers)
        except APIError as exc:
            status = exc.status
            raise
        except KVBudgetError:
            status = 400
            raise
        finally:
            if status is not None:
                metrics.request(status, time.perf_counter() - start)

    async def _stream(req: ChatRequest, start: float) -> StreamingResponse:
        """Start the request; answer errors found before generation as plain JSON errors, then
        stream the reply as server-sent events."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def events(kind: str, value: object) -> None:  # on the model thread
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        job = asyncio.ensure_future(manager.call(manager.chat, req, events))
        if await _next_event(queue, job) is None:
            job.result()  # the request failed its checks: raises the error (a 4xx)
            raise APIError(500, "the request ended without an answer", code="internal_error")
        chat_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return sse({"id": chat_id, "object": "chat.completion.chunk", "created": created,
                        "model": config.model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                        **extra})

        async def body():
            status = 500
            streamer = TextStreamer(tok)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (event := await _next_event(queue, job)) is not None:
                    delta = streamer.push(event[1]) if event[0] == "token" else ""
                    if delta:
                        yield chunk({"content": delta})
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
                log.exception("error while streaming")
                yield sse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error").body())
            finally:
                metrics.request(status, time.perf_counter() - start)

        headers = {"X-Session-Id": req.session_id} if req.session_id else None
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    return app
