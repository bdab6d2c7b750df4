"""Where a session file's save and load go: the parts of `runtime.sessionfile`'s write and read.

The server writes a session's file after each of its turns and reads it back when the session
is not in memory, on its I/O threads (`serve.saved`). This times the parts of one save and one
load of a session of the 8B shape at a budget of 2048 (32 layers x 8 KV heads x 2098 entries x
128, bf16 keys and values, int32 positions: 256 MiB), on ``--device`` (cuda: the copies through
pinned memory on the calling thread's copy stream), in ``--dir``:

* save: ``copy_to_host`` (device to pinned host memory), ``checksum`` (`sessionfile._checksum`),
  ``write`` (the bytes into the page cache), ``fsync``, and ``write_file`` (all of it, as the
  server calls it);
* load: ``read`` (the file into host memory), ``checksum``, ``copy_to_device``, and
  ``read_session_file`` (all of it).

Each row is the mean over ``--repeat`` files per thread, with ``--threads`` threads saving and
loading at once (the server runs 4), after one warm-up file per thread (the pinned host blocks
are then cached, as in a running server).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/session_io.py --device cpu --dir /tmp/kvb-io --threads 1,2 \\
        --repeat 3 --out benchmarks/results/session-io-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvbudget.runtime import sessionfile
from kvbudget.transfer import copy_to_device, copy_to_host


def session_tensors(device: str, layers: int = 32, heads: int = 8, entries: int = 2098, dim: int = 128) -> dict:
    """A session's tensors of the 8B shape at a 2048 budget (random keys and values)."""
    out = {}
    for i in range(layers):
        for part in ("keys", "values"):
            out[f"layers.{i}.{part}"] = torch.randn(1, heads, entries, dim, device=device).to(torch.bfloat16)
        out[f"layers.{i}.positions"] = torch.arange(heads * entries, dtype=torch.int32, device=device).view(1, heads, -1)
    return out


def _timed(parts: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    parts[name] = time.perf_counter() - start
    return result


def one_file(tensors: dict, path: Path, device: str) -> dict[str, float]:
    """The parts of one save and one load of ``tensors`` at ``path`` (seconds)."""
    parts: dict[str, float] = {}
    host = _timed(parts, "copy_to_host", lambda: copy_to_host(tensors))
    _timed(parts, "checksum", lambda: sessionfile._checksum(host, sessionfile.VERSION))

    def write(sync: bool) -> None:
        with open(path, "wb") as f:
            for t in host.values():
                f.write(t.reshape(-1).view(torch.uint8).numpy())
            f.flush()
            if sync:
                os.fsync(f.fileno())

    _timed(parts, "write", lambda: write(False))
    synced: dict[str, float] = {}
    _timed(synced, "write", lambda: write(True))
    parts["fsync"] = max(0.0, synced["write"] - parts["write"])  # what syncing adds to the same write
    _timed(parts, "write_file", lambda: sessionfile.write_file(path, tensors, {}))

    def read() -> torch.Tensor:
        data = torch.empty(path.stat().st_size, dtype=torch.uint8, pin_memory=device == "cuda")
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(data.numpy()))
        return data

    data = _timed(parts, "read", read)
    _timed(parts, "copy_to_device", lambda: copy_to_device({"file": data}, device))
    _timed(parts, "read_session_file", lambda: sessionfile.read_session_file(path, device))
    path.unlink()
    return parts


def run(device: str, root: Path, threads: int, repeat: int) -> dict:
    """``threads`` threads each saving and loading ``repeat`` files: the mean of each part."""
    tensors = session_tensors(device)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: one_file(tensors, root / f"warm-{i}.kvb", device), range(threads)))
        start = time.perf_counter()
        rows = list(pool.map(lambda i: one_file(tensors, root / f"s-{i}.kvb", device), range(threads * repeat)))
        wall = time.perf_counter() - start
    mib = sum(t.nbytes for t in tensors.values()) / 2**20
    return {"device": device, "threads": threads, "files": len(rows), "mib": round(mib, 1),
            "wall_s": round(wall, 3), **{k: round(statistics.mean(r[k] for r in rows), 4) for k in rows[0]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dir", default=None, help="where the files are written (default: a temporary directory)")
    p.add_argument("--threads", default="1,4", help="comma list of threads saving and loading at once")
    p.add_argument("--repeat", type=int, default=2, help="files per thread, after one warm-up file")
    p.add_argument("--out", default=None, help="append one JSON line per thread count here")
    args = p.parse_args(argv)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvbudget-io-", dir=args.dir) as root:
        for threads in (int(x) for x in args.threads.split(",")):
            row = {"dir": str(Path(root).parent), **run(args.device, Path(root), threads, args.repeat)}
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
