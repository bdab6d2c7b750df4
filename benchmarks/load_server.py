"""Load test of `kvbudget serve` on loopback: p50/p99 latency and tokens/s with 1, 4, 16 sessions.

Starts `kvbudget serve` on 127.0.0.1 (a free port, a temporary session store) unless ``--url``
names a server that is already running, which must be a loopback address (``--api-key`` for a
server started with keys). For each level of N
sessions, N clients run at once, each sending ``--requests`` streamed chat requests one after
the other to its own session (a multi-turn conversation: only the new message is sent). The
count is bounded (N x requests) and so is the time (``--time-limit`` per level: no new request
starts after it). Latency is measured per request at the client (queueing included), time to
first token from the first streamed text; tokens/s = all generated tokens / the level's wall time.

    OMP_NUM_THREADS=1 python benchmarks/load_server.py --out benchmarks/results/load_server-cpu.jsonl
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx

from serve_batch import one_turn, percentile

QUESTIONS = [
    ("I am planning a trip to Lisbon in May with two friends. We like food, old streets and the sea. "
     "What should we see first?"),
    "Which neighbourhood should we stay in?",
    "What food should we try there?",
    "How many days do we need?",
    "Summarise your advice in one sentence.",
    "Thanks! Any tip for the airport?",
]


def _loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"load_server: refusing {url}: the load test only targets loopback addresses")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, store: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "kvbudget.cli", "serve", "--policy", args.policy, "--budget", args.budget,
           "--memory", args.memory, "--store", store, "--port", str(port), "--log-level", "warning",
           "--max-tokens", str(args.max_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit("load_server: kvbudget serve exited at startup")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("load_server: kvbudget serve did not start in 300 s")


def _auth(args) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _metrics(url: str, args) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=60, headers=_auth(args)).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _rate(after: dict, before: dict, num: str, den: str) -> float:
    d = after[den] - before[den]
    return round((after[num] - before[num]) / d, 3) if d else 0.0


def run_level(url: str, n: int, args) -> dict:
    """N sessions, N clients at once, ``args.requests`` turns each, at most ``args.time_limit`` s."""
    with httpx.Client(base_url=url, timeout=600, headers=_auth(args)) as client:
        ids = [client.post("/v1/sessions", json={}).json()["id"] for _ in range(n)]
    before = _metrics(url, args)
    deadline = time.monotonic() + args.time_limit
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(session_id: str) -> None:
        with httpx.Client(base_url=url, timeout=600, headers=_auth(args)) as http:
            for i in range(args.requests):
                if time.monotonic() > deadline:
                    return
                try:
                    r = one_turn(http, session_id, QUESTIONS[i % len(QUESTIONS)], args.max_tokens)
                except (RuntimeError, httpx.HTTPError) as exc:
                    with lock:
                        errors.append(str(exc))
                    return
                with lock:
                    results.append(r)

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(worker, ids))
    wall = time.perf_counter() - start
    after = _metrics(url, args)
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "sessions": n,
        "requests": len(results),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "p50_s": round(percentile(latencies, 50), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 99), 3) if latencies else None,
        "ttft_p50_s": round(percentile(ttfts, 50), 3) if ttfts else None,
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "requests_per_s": round(len(results) / wall, 3) if wall else None,
        "server_decode_tokens_per_s": _rate(after, before, "kvbudget_generated_tokens_total", "kvbudget_decode_seconds_total"),
        "save_ms": round(1000 * _rate(after, before, "kvbudget_session_save_seconds_total", "kvbudget_session_saves_total"), 1),
        "kv_bytes_peak": after["kvbudget_kv_bytes_peak"],
        "evictions": after["kvbudget_evictions_total"] - before["kvbudget_evictions_total"],
        "loads": after["kvbudget_session_loads_total"] - before["kvbudget_session_loads_total"],
        "compression_mean": round(sum(r["kvbudget"]["compression"] or 1 for r in results) / len(results), 2) if results else None,
        "first_error": errors[0] if errors else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    p.add_argument("--api-key", default=None, help="the key a --url server was started with")
    p.add_argument("--model", default=None, help="model for the server started here (default: embedded)")
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--budget", default="128")
    p.add_argument("--memory", default="32MB", help="--memory of the server started here")
    p.add_argument("--sessions", default="1,4,16", help="comma list of concurrent session counts")
    p.add_argument("--requests", type=int, default=4, help="requests per session (turns of its conversation)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=300, help="seconds per level after which no request starts")
    p.add_argument("--out", default=None, help="append one JSON line per level here")
    args = p.parse_args(argv)
    proc = None
    with tempfile.TemporaryDirectory(prefix="kvbudget-load-") as store:
        if args.url:
            _loopback(args.url)
            url = args.url.rstrip("/")
        else:
            proc, url = start_server(args, store)
        try:
            health = httpx.get(url + "/healthz", timeout=30).json()
            print(f"server {url}: {health['model']}, policies {health['policies']}, budget {health['budget']}, "
                  f"memory {health['memory']} B; {args.requests} requests/session, max_tokens {args.max_tokens}, "
                  f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
            print(f"{'sessions':>8} {'requests':>8} {'errors':>6} {'wall s':>7} {'p50 s':>7} {'p99 s':>7} "
                  f"{'ttft50 s':>8} {'tok/s':>6} {'decode tok/s':>12} {'save ms':>7} {'evict':>5} {'loads':>5} "
                  f"{'KV peak MB':>10}")
            for n in [int(x) for x in args.sessions.split(",")]:
                row = {"policy": args.policy, "budget": args.budget, "max_tokens": args.max_tokens,
                       "memory": health["memory"], **run_level(url, n, args)}
                print(f"{row['sessions']:>8} {row['requests']:>8} {row['errors']:>6} {row['wall_s']:>7} "
                      f"{row['p50_s']:>7} {row['p99_s']:>7} {row['ttft_p50_s']:>8} {row['tokens_per_s']:>6} "
                      f"{row['server_decode_tokens_per_s']:>12} {row['save_ms']:>7} "
                      f"{row['evictions']:>5.0f} {row['loads']:>5.0f} {row['kv_bytes_peak'] / 1e6:>10.2f}", flush=True)
                if args.out:
                    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
