"""Scaling on Ray: a sweep's wall time on 1 and on N workers, and the server's requests/s and time
to first token with 1 and N replicas, all on one local Ray cluster in one run (ratios of one run on
one machine are what compare; docs/distributed.md quotes them).

Sweep: ``--tasks`` needle contexts of ``--length`` tokens x (full + ``--policy``) x ``--budget``,
multi-turn, run by `kvbudget.distributed.sweep.run_eval_ray` with each worker count of
``--workers`` (a worker = one GPU where the machine has GPUs, else one CPU); the wall time counts
the workers' start (each loads the model) as a user waits for it. The rows of every run are
checked equal (bar timings). Serving: `start_replicas` with each count of ``--replicas``, then
benchmarks/load_server.py's level of ``--sessions`` concurrent streamed sessions.

    python benchmarks/ray_scaling.py --out benchmarks/results/ray_scaling-cpu.json
    # several GPUs (one worker and one replica per GPU):
    python benchmarks/ray_scaling.py --device cuda --workers 1,8 --replicas 1,8 --sessions 32 --tasks 16 \
        --length 4000 --out benchmarks/results/ray_scaling-gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_server import run_level  # noqa: E402

from kvbudget.distributed.replicas import start_replicas, stop_replicas  # noqa: E402
from kvbudget.distributed.sweep import run_eval_ray  # noqa: E402
from kvbudget.eval.generators import make_tasks  # noqa: E402
from kvbudget.eval.runner import EvalConfig, read_results  # noqa: E402
from kvbudget.runtime.models import DEFAULT_MODEL, load_tokenizer  # noqa: E402
from kvbudget.serve import ServeConfig  # noqa: E402

TIMINGS = ("prefill_s", "compress_s", "decode_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machine() -> dict:
    resources = ray.cluster_resources()
    return {"cpus": os.cpu_count(), "ray_cpus": resources.get("CPU"), "gpus": resources.get("GPU", 0),
            "platform": platform.platform(), "python": platform.python_version()}


def sweep(args, tmp: Path) -> dict:
    tok = load_tokenizer(args.model)
    tasks = make_tasks("needle", tok, n=args.tasks, length=args.length, seed=args.seed)
    cfg = EvalConfig(policies=args.policy.split(","), budgets=args.budget.split(","),
                     max_new_tokens=args.max_new_tokens,
                     mode="multi-turn", model=args.model or DEFAULT_MODEL)
    runs, rows = [], []
    for n in [int(w) for w in args.workers.split(",")]:
        out = tmp / f"sweep-{n}"
        start = time.perf_counter()
        summary = run_eval_ray(tasks, cfg, out, model=args.model, device=args.device, workers=n, progress=False)
        wall = time.perf_counter() - start
        written = read_results(out / "results.jsonl")
        runs.append({"workers": summary["workers"], "wall_s": round(wall, 2), "rows": len(written)})
        rows.append(sorted(json.dumps({k: v for k, v in r.items() if k not in TIMINGS}, sort_keys=True)
                           for r in written))
        print(f"sweep: {n} workers: {wall:.1f} s", flush=True)
    return {"tasks": args.tasks, "length": args.length, "policies": cfg.policies, "budgets": cfg.budgets,
            "max_new_tokens": args.max_new_tokens, "runs": runs,
            "speedup": round(runs[0]["wall_s"] / runs[-1]["wall_s"], 2), "same_rows": all(r == rows[0] for r in rows)}


def serving(args, tmp: Path) -> dict:
    levels = []
    for n in [int(r) for r in args.replicas.split(",")]:
        config = ServeConfig(model_name=args.model or DEFAULT_MODEL, store=tmp / f"sessions-{n}", policies=["snapkv"],
                             budget=args.serve_budget, max_tokens=args.serve_max_tokens)
        url = start_replicas(config, n, model=args.model, device=args.device, port=_free_port())
        try:
            level = run_level(url, args.sessions, argparse.Namespace(api_key=None, requests=args.requests,
                                                                     time_limit=args.time_limit,
                                                                     max_tokens=args.serve_max_tokens))
        finally:
            stop_replicas()
        level = {"replicas": n, **{k: level[k] for k in ("sessions", "requests", "errors", "wall_s", "requests_per_s",
                                                         "tokens_per_s", "ttft_p50_s", "p50_s", "p99_s")}}
        levels.append(level)
        print(f"serve: {n} replicas: {level}", flush=True)
    return {"sessions": args.sessions, "requests_per_session": args.requests, "max_tokens": args.serve_max_tokens,
            "levels": levels,
            "requests_per_s_ratio": round(levels[-1]["requests_per_s"] / levels[0]["requests_per_s"], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="sweep,serve", help="sweep, serve or both (default)")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--workers", default="1,2", help="sweep worker counts (default 1,2)")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--length", type=int, default=300)
    p.add_argument("--policy", default="snapkv,streaming")
    p.add_argument("--budget", default="64,128")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", default="1,2", help="replica counts (default 1,2)")
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions of the load (default 4)")
    p.add_argument("--requests", type=int, default=3, help="turns per session (default 3)")
    p.add_argument("--serve-budget", default="128")
    p.add_argument("--serve-max-tokens", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=600)
    p.add_argument("--out", default=None, help="write the summary (JSON) here")
    args = p.parse_args(argv)
    parts = args.part.split(",")
    # Ray starts its workers at niceness 15: on a machine shared with other jobs they would get the
    # CPU left over, not their cores. The measurement runs them at normal priority.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        result = {"machine": _machine(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                  "load_average_before": os.getloadavg()}
        with tempfile.TemporaryDirectory(prefix="kvbudget-ray-") as tmp:
            if "sweep" in parts:
                result["sweep"] = sweep(args, Path(tmp))
            if "serve" in parts:
                result["serve"] = serving(args, Path(tmp))
    finally:
        ray.shutdown()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
