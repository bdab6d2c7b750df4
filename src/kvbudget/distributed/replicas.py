"""`kvbudget serve --replicas N`: N replicas of the server on Ray, behind one session-affinity
router deployed with Ray Serve (docs/distributed.md).

Each replica (`replica.ReplicaServer`) asks for one GPU where the cluster has GPUs, one CPU
otherwise; the router (`router.SessionRouter`) asks for none: it only forwards bytes. Ray Serve
serves the router over HTTP at ``host:port`` and restarts it if it dies (it then starts its
replicas afresh: every session is in the session directory).
"""

from __future__ import annotations

import signal
import sys
import threading

from ..errors import KVBudgetError
from ..runtime.models import load_tokenizer
from ..serve.config import ServeConfig
from ..serve.keys import check_bind
from .cluster import connect, require_ray
from .router import SessionRouter

APP = "kvbudget"
# The router awaits replicas: it holds many requests at once (each replica queues and bounds its own).
ROUTER_ONGOING = 1024


def replica_resources(ray) -> dict:
    """What each replica asks for: one GPU where the cluster has any, else one CPU."""
    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) else {"num_cpus": 1}


def start_replicas(config: ServeConfig, replicas: int, model: str | None = None, device: str | None = None,
                   host: str = "127.0.0.1", port: int = 8000, insecure: bool = False) -> str:
    """Deploy the router and its ``replicas`` on the connected Ray cluster (`connect` first);
    returns the URL it serves. A cluster of several nodes has its replicas listen on their
    node's address: that needs API keys (or ``insecure``), as a public ``host`` does."""
    ray = require_ray("kvbudget serve --replicas")
    from ray import serve

    notice = check_bind(host, config.api_keys, insecure)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    replica_host = "127.0.0.1" if nodes == 1 else None
    if replica_host is None:
        check_bind("0.0.0.0", config.api_keys, insecure)  # the replicas listen on their nodes' addresses
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if 0 < gpus < replicas:
        raise KVBudgetError(f"--replicas {replicas}: the cluster has {gpus} GPUs, and each replica takes one")
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if not gpus and cpus < replicas:
        raise KVBudgetError(f"--replicas {replicas}: the cluster has {cpus} CPUs, and each replica takes one")
    serve.start(http_options={"host": host, "port": port})
    router = serve.deployment(name="router", num_replicas=1, max_ongoing_requests=ROUTER_ONGOING,
                              ray_actor_options={"num_cpus": 0})(SessionRouter)
    app = router.bind(config, model, device, replicas, replica_resources(ray), replica_host)
    try:
        serve.run(app, name=APP, route_prefix="/", blocking=False)
    except Exception as exc:  # the router or a replica did not start (a model that does not load, ...)
        serve.shutdown()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KVBudgetError(f"the replicas did not start: {reason} (Ray's logs: /tmp/ray/session_latest/logs)") from exc
    print(notice, file=sys.stderr, flush=True)
    return f"http://{host}:{port}"


def stop_replicas() -> None:
    """Remove the application (the router stops its replicas with it)."""
    from ray import serve

    serve.delete(APP)
    serve.shutdown()


def serve_replicas(config: ServeConfig, replicas: int, model: str | None = None, device: str | None = None,
                   host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                   insecure: bool = False) -> None:
    """Serve ``replicas`` replicas until interrupted (Ctrl-C or SIGTERM), on the cluster at
    ``address`` or on a local one; then stop them (and the local cluster)."""
    ray = require_ray("kvbudget serve --replicas")
    load_tokenizer(model)  # a model that cannot be found fails here, before a cluster starts
    started = connect(address, "kvbudget serve --replicas")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = start_replicas(config, replicas, model, device, host, port, insecure)
        print(f"kvbudget: {replicas} replicas serving at {url} (Ctrl-C stops them)", file=sys.stderr, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        if not started:
            stop_replicas()  # on a cluster that stays up
    finally:
        if started:
            ray.shutdown()  # the local cluster, with everything on it (every session file is current)
