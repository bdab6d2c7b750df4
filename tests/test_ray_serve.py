"""Serving replicas on a local Ray cluster: two replicas of the default model behind the
session-affinity router. 8 sessions x 3 turns answer as each session does alone; a replica killed
between turns leaves every session to go on with its history; /metrics adds the replicas up. The
router's parts (homes, the metrics sum) are checked on their own, and the message where Ray is
missing. The cluster is stopped at the end with every process it started.
"""

from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import ray
import torch
from ray import serve

import kvbudget as kb
from kvbudget import cli
from kvbudget.distributed.affinity import SessionHomes, rendezvous
from kvbudget.distributed.aggregate import aggregate
from kvbudget.distributed.replicas import APP, start_replicas, stop_replicas
from kvbudget.runtime.models import DEFAULT_MODEL
from kvbudget.serve import ServeConfig
from server_kit import free_port, parse_metrics

NAMES = ["Ana", "Boris", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Lima", "Riga", "Perth"]
MAX_TOKENS = 4


def turns(i: int) -> list[str]:
    return [f"My name is {NAMES[i]} and I live in {CITIES[i]}.", "What is my name?", "Where do I live?"]


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServeConfig:
    return ServeConfig(model_name=DEFAULT_MODEL, store=tmp_path_factory.mktemp("sessions"), policies=["snapkv"],
                       budget="512", max_tokens=16, default_max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def url(config):
    """Two replicas on a local cluster of 2 CPUs; everything stopped at the end."""
    before = _descendants()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield start_replicas(config, 2, port=free_port())
    finally:
        started = _descendants() - before
        stop_replicas()
        ray.shutdown()
        _, alive = psutil.wait_procs([psutil.Process(p) for p in started if psutil.pid_exists(p)], timeout=30)
        assert not alive, f"the Ray cluster left processes behind: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def alone(default_model, config) -> list[list[str]]:
    """Each session's answers, run alone in this process (one torch thread, as a replica has)."""
    model, tok = default_model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = []
        for i in range(len(NAMES)):
            session = kb.Session(model, tok, kb.policy("snapkv", budget=config.budget), block_size=config.block_size)
            out.append([session.ask(q, MAX_TOKENS) for q in turns(i)])
        return out
    finally:
        torch.set_num_threads(threads)


def _turn(http: httpx.Client, t: int) -> list[str]:
    def ask(i: int) -> str:
        r = http.post("/v1/chat/completions", json={"session_id": f"s{i}", "max_tokens": MAX_TOKENS,
                                                    "messages": [{"role": "user", "content": turns(i)[t]}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(len(NAMES)) as pool:
        return list(pool.map(ask, range(len(NAMES))))


def test_sessions_answer_as_alone_and_go_on_after_a_replica_is_killed(url, alone):
    router = serve.get_app_handle(APP)
    with httpx.Client(base_url=url, timeout=300) as http:
        for i in range(len(NAMES)):
            assert http.post("/v1/sessions", json={"id": f"s{i}"}).status_code == 200
        answers = [_turn(http, 0), _turn(http, 1)]
        metrics = parse_metrics(http.get("/metrics").text)
        assert metrics["kvbudget_replicas"] == 2
        assert metrics['kvbudget_requests_total{code="200"}'] == 2 * len(NAMES)  # both replicas' counts
        assert metrics["kvbudget_sessions_stored"] == len(NAMES)  # the shared directory, counted once

        replicas = router.replicas.remote().result()
        assert sum(r["sessions"] for r in replicas) == len(NAMES)
        victim = max(replicas, key=lambda r: r["sessions"])
        process = psutil.Process(victim["pid"])
        os.kill(victim["pid"], signal.SIGKILL)  # between turns: its sessions are in their files
        process.wait(timeout=30)

        answers.append(_turn(http, 2))
        for i in range(len(NAMES)):
            assert [a[i] for a in answers] == alone[i], f"session s{i}"
            session = http.get(f"/v1/sessions/s{i}").json()
            assert session["turns"] == 3
            history = [x for q, a in zip(turns(i), alone[i]) for x in (q, a)]
            assert [m["content"] for m in session["messages"]] == history
        metrics = parse_metrics(http.get("/metrics").text)
        assert metrics["kvbudget_replica_failovers_total"] == 1
        after = router.replicas.remote().result()
        assert victim["pid"] not in [r["pid"] for r in after]


def test_homes_move_only_when_their_replica_is_gone():
    homes = SessionHomes()
    keys = [("", f"s{i}") for i in range(64)]
    first = {k: homes.home(k, [0, 1, 2]) for k in keys}
    assert set(first.values()) == {0, 1, 2}  # spread over the replicas
    assert all(first[k] == rendezvous(k, [0, 1, 2]) for k in keys)
    # A replica joining does not take sessions that live elsewhere (their copies would go stale).
    assert {k: homes.home(k, [0, 1, 2, 3]) for k in keys} == first
    moved = homes.gone(1)
    assert moved == sum(r == 1 for r in first.values())
    after = {k: homes.home(k, [0, 2, 3]) for k in keys}
    assert all(after[k] == first[k] for k in keys if first[k] != 1)
    assert all(after[k] in (0, 2, 3) for k in keys)
    homes.forget(keys[0])
    assert len(homes) == len(keys) - 1


def test_metrics_add_up_and_shared_gauges_do_not():
    page = ("# HELP kvbudget_sessions_stored sessions in the session directory\n# TYPE kvbudget_sessions_stored gauge\n"
            "kvbudget_sessions_stored {stored}\n# HELP kvbudget_requests_total chat requests\n"
            "# TYPE kvbudget_requests_total counter\nkvbudget_requests_total{{code=\"200\"}} {ok}\n"
            "kvbudget_request_duration_seconds_bucket{{le=\"0.5\"}} {ok}\n")
    text = aggregate([page.format(stored=8, ok=3), page.format(stored=8, ok=4.5)], "kvbudget_replicas 2\n")
    assert parse_metrics(text) == {"kvbudget_sessions_stored": 8, 'kvbudget_requests_total{code="200"}': 7.5,
                                   'kvbudget_request_duration_seconds_bucket{le="0.5"}': 7.5, "kvbudget_replicas": 2}
    assert text.count("# TYPE kvbudget_requests_total counter") == 1


def test_without_ray_serve_replicas_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = cli.main(["serve", "--replicas", "2", "--store", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "kvbudget: error: kvbudget serve --replicas needs Ray: pip install 'kvbudget[ray]'"
