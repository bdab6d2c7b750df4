"""OpenAI-compatible HTTP server over persistent, budgeted sessions (`kvbudget serve`).

    app = create_app(model, tok, ServeConfig(model_name="smollm2-135m", store=Path("sessions"),
                                             api_keys=["..."]))

`app` is a FastAPI application; `serve` loads a model and runs it with uvicorn. docs/serving.md
describes the security model, the limits and the metrics. FastAPI and uvicorn are optional
(``kvbudget[serve]``): the configuration (`ServeConfig`, `Limits`) imports without them, the
application on first use.
"""

from __future__ import annotations

import sys

from ..runtime.models import load_model
from .config import Limits, ServeConfig, parse_duration, parse_memory
from .keys import check_bind


def serve(config: ServeConfig, model_path: str | None = None, device: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", insecure: bool = False) -> None:
    """Load the model and serve it until interrupted (Ctrl-C or SIGTERM stop it cleanly). Without
    API keys only a loopback ``host`` is accepted, unless ``insecure``."""
    import uvicorn

    from .app import create_app

    notice = check_bind(host, config.api_keys, insecure)  # refuses before the model loads
    model, tok = load_model(model_path, device=device)
    print(notice, file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, tok, config), host=host, port=port, log_level=log_level)


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name in ("SessionManager", "TurnResult"):
        from . import manager

        return getattr(manager, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Limits", "ServeConfig", "SessionManager", "TurnResult", "create_app", "parse_duration", "parse_memory",
           "serve"]
