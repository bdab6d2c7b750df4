"""Soak test of `kvbudget serve` on loopback: many sessions, mixed valid and invalid requests,
streams cut short, for minutes; then the checks of tests/test_server_soak.py (no 5xx, memory
bound held, resident size flat after the warm-up, every session's history exactly its answered
turns, no temp file, every file loads) and one JSON summary.

Starts `kvbudget serve` (its own process, 127.0.0.1, a temporary session directory, two API keys
in a key file) on the embedded default model, or with ``--tiny`` on a 2-layer random-weight
Llama saved with plain transformers (the CI soak's model).

    OMP_NUM_THREADS=1 python benchmarks/soak_server.py --seconds 600 --out benchmarks/results/soak_server-cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from server_kit import Process, Sampler, check_soak, parse_metrics, save_tiny_model, soak, soak_report  # noqa: E402

KEYS = ["soak-key-one-" + "1" * 20, "soak-key-two-" + "2" * 20]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600, help="how long the clients send (default 600)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sessions-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=8, help="max_tokens of each turn (default 8)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer random-weight Llama instead of the default model")
    p.add_argument("--budget", default="64")
    p.add_argument("--memory", default=None,
                   help="--memory of the server (default: 150000 with --tiny, 24MB with the default model)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts as warm (default: a third)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the summary (JSON) here")
    args = p.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else args.seconds / 3
    with tempfile.TemporaryDirectory(prefix="kvbudget-soak-") as tmp:
        tmp = Path(tmp)
        keys = tmp / "keys"
        keys.write_text("\n".join(KEYS) + "\n")
        model_args = []
        if args.tiny:
            from kvbudget.runtime.models import load_tokenizer

            model_args = ["--model", str(save_tiny_model(load_tokenizer(), tmp / "model"))]
        memory = args.memory or ("150000" if args.tiny else "24MB")
        store = tmp / "store"
        server = Process([*model_args, "--store", str(store), "--api-key-file", str(keys), "--policy", "snapkv",
                          "--budget", args.budget, "--block-size", "64", "--memory", memory,
                          "--max-tokens", str(max(16, args.max_tokens)),
                          "--max-sessions-per-key", str(args.clients * args.sessions_per_client)],
                         log=tmp / "serve.log")
        try:
            server.wait_ready()
            headers = {"Authorization": f"Bearer {KEYS[0]}"}
            sampler = Sampler(server.url, headers, interval=1.0)
            start = time.monotonic()
            log = soak(server.url, KEYS, args.seconds, clients=args.clients,
                       sessions_per_client=args.sessions_per_client, max_tokens=args.max_tokens, seed=args.seed)
            wall = time.monotonic() - start
            samples = sampler.stop()
            metrics = parse_metrics(httpx.get(server.url + "/metrics", headers=headers, timeout=120).text)
            report = soak_report(log, samples, metrics, wall, warmup)
            report["history_problems"] = check_soak(server.url, log)
        finally:
            server.stop()
        report["temp_files_left"] = len(list(store.rglob("*.tmp")))
        from kvbudget import Session
        from kvbudget.runtime.models import load_model

        model, tok = load_model(model_args[1] if model_args else None)
        files = sorted(store.rglob("*.kvb"))
        unreadable = []
        for path in files:
            try:
                Session.load(path, model, tok)
            except Exception as exc:  # noqa: BLE001 (a report of every file that fails, however)
                unreadable.append(f"{path.name}: {exc}")
        report.update(files=len(files), unreadable_files=unreadable, model="tiny" if args.tiny else "default",
                      clients=args.clients, max_tokens=args.max_tokens, memory=memory)
    mib = 2**20
    print(f"soak: {report['seconds']:.0f} s, {report['requests']} requests ({report['statuses']}), "
          f"{report['sessions']} sessions, {report['turns_answered']} turns answered, {report['streams_cut']} streams cut")
    print(f"5xx {report['server_5xx']:.0f}, unexpected {len(report['unexpected'])}, history problems "
          f"{len(report['history_problems'])}, temp files {report['temp_files_left']}, files {report['files']} "
          f"({len(report['unreadable_files'])} unreadable)")
    print(f"KV peak {report['kv_bytes_peak'] / 1e6:.3f} MB of {report['kv_bytes_limit'] / 1e6:.3f} MB; "
          f"{report['evictions']:.0f} evictions, {report['loads']:.0f} loads; RSS start {report['rss_start'] / mib:.0f} "
          f"MiB, after warm-up {report['rss_after_warmup'] / mib:.0f} MiB, end {report['rss_end'] / mib:.0f} MiB, "
          f"max after warm-up {report['rss_max_after_warmup'] / mib:.0f} MiB")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    ok = (not report["unexpected"] and report["server_5xx"] == 0 and not report["history_problems"]
          and report["temp_files_left"] == 0 and not report["unreadable_files"]
          and report["kv_bytes_peak"] <= report["kv_bytes_limit"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
