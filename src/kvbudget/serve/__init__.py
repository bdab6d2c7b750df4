"""OpenAI-compatible HTTP server over persistent, budgeted sessions (`kvbudget serve`).

    app = create_app(model, tok, ServeConfig(model_name="smollm2-135m", store=Path("sessions")))

`app` is a FastAPI application; `serve` loads a model and runs it with uvicorn.
"""

from __future__ import annotations

from .app import create_app
from .config import ServeConfig, parse_memory
from .manager import SessionManager, TurnResult


def serve(config: ServeConfig, model_path: str | None = None, device: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Load the model and serve it until interrupted (Ctrl-C or SIGTERM stop it cleanly)."""
    import uvicorn

    from ..runtime.models import load_model

    model, tok = load_model(model_path, device=device)
    uvicorn.run(create_app(model, tok, config), host=host, port=port, log_level=log_level)


__all__ = ["ServeConfig", "SessionManager", "TurnResult", "create_app", "parse_memory", "serve"]
