"""One serving replica: the model and the whole HTTP server of `kvbudget serve` (its keys,
limits, queue and session manager) in a Ray actor, listening on a port of its node.

Every replica is started with the same `ServeConfig`, so they share one session directory (the
``store``: a directory every node sees, such as NFS) and write each turn through to it: a session
moved to another replica is loaded from its last saved turn.
"""

from __future__ import annotations

import os
import socket
import threading
import time

from ..runtime.models import load_model
from ..serve.config import ServeConfig

STARTUP_S = 60.0  # after the model is loaded, the HTTP server starts in well under a second


class ReplicaServer:
    """`create_app` served by uvicorn on a thread of this actor; `url` says where."""

    def __init__(self, config: ServeConfig, model: str | None, device: str | None, host: str | None) -> None:
        """Load the model and start serving on ``host`` (None: this node's address), a free port."""
        import ray
        import uvicorn

        from ..serve.app import create_app

        if device is None and ray.get_gpu_ids():
            device = "cuda"  # Ray shows this actor its own GPU only
        model_, tok = load_model(model, device=device)
        host = host or ray.util.get_node_ip_address()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self._url = f"http://{host}:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(model_, tok, config), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="kvbudget-replica-http")
        self.thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the replica's HTTP server did not start on {self._url}")
            time.sleep(0.01)

    def url(self) -> str:
        """The replica's base URL (``http://host:port``)."""
        return self._url

    def pid(self) -> int:
        """The replica's process id."""
        return os.getpid()
