"""How far the host runs ahead of the GPU at each compression of a real block-wise prefill
(H100, Llama-3.1-8B shape, bf16, budget 2048, blocks of 2048). `prefill` times a compression on
the stream, from its first kernel to its last: that equals the kernels' own time only while the
host queues them before the GPU gets there. For each compression this prints, in ms from the
prefill's start: when the host began queueing it, when the GPU began running it (the lead is
the difference), how long the host took to queue it, and its span on the stream. A lead shorter
than the host's time means the GPU waited for the host inside the compression.

    PYTHONPATH=src python3 benchmarks/host_lead.py h2o+kivi4 h2o --tokens 32768
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import kvbudget as kb  # noqa: E402
from gpu_smoke import build  # noqa: E402


def timed_prefill(model, name: str, ids: torch.Tensor) -> list[dict]:
    """One prefill with host clocks and stream events around every `Policy.compress`."""
    policy = kb.policy(name, budget=2048, block_size=2048)
    cache = policy.new_cache(model)
    compress = policy.compress
    marks: list[tuple[float, float, torch.cuda.Event, torch.cuda.Event]] = []

    def marked(c, **kw):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        begin.record()
        out = compress(c, **kw)
        end.record()
        marks.append((t0, time.perf_counter(), begin, end))
        return out

    policy.compress = marked
    torch.cuda.synchronize()
    origin = torch.cuda.Event(enable_timing=True)
    origin.record()
    t_origin = time.perf_counter()
    kb.prefill(model, cache, policy, ids)
    torch.cuda.synchronize()
    rows = []
    for t0, t1, begin, end in marks:
        host_start, gpu_start = (t0 - t_origin) * 1e3, origin.elapsed_time(begin)
        rows.append({"host_start_ms": host_start, "gpu_start_ms": gpu_start, "lead_ms": gpu_start - host_start,
                     "host_ms": (t1 - t0) * 1e3, "stream_ms": begin.elapsed_time(end)})
    return rows


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("policies", nargs="*", default=["h2o+kivi4"])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = build()
    ids = torch.randint(0, 128000, (1, args.tokens), device="cuda")
    report = {}
    for name in args.policies:
        timed_prefill(model, name, ids)  # warm-up
        rows = timed_prefill(model, name, ids)
        report[name] = rows
        print(f"=== {name}: per compression, ms (medians: lead {statistics.median(r['lead_ms'] for r in rows):.1f}, "
              f"host {statistics.median(r['host_ms'] for r in rows):.1f}, "
              f"stream {statistics.median(r['stream_ms'] for r in rows):.2f})")
        for r in rows:
            print(f"  host starts {r['host_start_ms']:8.1f}  GPU starts {r['gpu_start_ms']:8.1f}  lead {r['lead_ms']:6.1f}"
                  f"  host {r['host_ms']:6.2f}  stream {r['stream_ms']:6.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
