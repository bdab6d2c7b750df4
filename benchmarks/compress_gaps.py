"""Where a compression's stream time goes inside a real block-wise prefill (H100, Llama-3.1-8B
shape, bf16, budget 2048, blocks of 2048): `prefill` times each compression on the stream, from
its first kernel to its last, gaps included; `compress_profile.py` sums its kernels alone. This
script finds the difference: torch.profiler over one prefill (after a warm-up), and for each
compression (`Policy.compress` and the deferred `BudgetedCache.settle`) the span of its kernels
on the GPU, the time they kept it busy, and each idle gap between them (the GPU waited for the
host) with the kvbudget function that launched the kernel after the gap.

With a budget the blocks' work does not grow with the context, so 8k tokens (4 blocks) show
what every block of a 32k prefill does. The profiler slows the host, so gaps here are upper
bounds; the shares come from `policy_overhead.py`.

    PYTHONPATH=src python3 benchmarks/compress_gaps.py h2o+kivi4 h2o --out gaps.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import kvbudget as kb  # noqa: E402
from gpu_smoke import build  # noqa: E402

RANGES = ("kvbudget.compress", "kvbudget.settle")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def traced_prefill(model, name: str, tokens: int, trace: Path) -> None:
    """One prefill under the profiler, compressions and settles marked as ranges."""
    policy = kb.policy(name, budget=2048, block_size=2048)
    ids = torch.randint(0, 128000, (1, tokens), device="cuda")
    for profiled in (False, True):
        cache = policy.new_cache(model)
        compress, settle = policy.compress, cache.settle

        def marked_compress(c, **kw):
            with record_function(RANGES[0]):
                return compress(c, **kw)

        def marked_settle():
            with record_function(RANGES[1]):
                return settle()

        policy.compress, cache.settle = marked_compress, marked_settle
        try:
            torch.cuda.synchronize()
            if not profiled:
                kb.prefill(model, cache, policy, ids)
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
                kb.prefill(model, cache, policy, ids)
                torch.cuda.synchronize()
            prof.export_chrome_trace(str(trace))
        finally:
            del policy.compress


def _launcher(events: list[dict], wanted: set[int]) -> dict[int, str]:
    """correlation id (of the kernels in ``wanted``) -> the innermost two kvbudget Python frames
    around its launch ("caller > callee")."""
    frames = sorted((e for e in events if e.get("cat") == "python_function" and "kvbudget/" in e.get("name", "")
                     and "benchmarks/" not in e.get("name", "")), key=lambda e: e["ts"])
    starts = [f["ts"] for f in frames]
    out = {}
    for launch in events:
        corr = launch.get("args", {}).get("correlation") if launch.get("cat") == "cuda_runtime" else None
        if corr not in wanted:
            continue
        t, names = launch["ts"], []
        # Frames nest: walking back from the launch, the first frame still open is the innermost.
        for i in range(bisect.bisect_right(starts, t) - 1, -1, -1):
            f = frames[i]
            if f["ts"] + f.get("dur", 0) >= t:
                names.append(f["name"].split("/kvbudget/")[-1])
                if len(names) == 2:
                    break
        out[corr] = " > ".join(reversed(names)) or launch["name"]
    return out


def analyse(trace: Path, min_gap_us: float) -> dict:
    """Per range name: the spans on the GPU, busy time, and gaps grouped by launching frame."""
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    spans = [e for e in events if e.get("cat") == "gpu_user_annotation" and e.get("name") in RANGES]
    hosts = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") in RANGES]
    marked = [k for k in kernels if any(s["ts"] <= k["ts"] <= s["ts"] + s["dur"] for s in spans)]
    launcher = _launcher(events, {k.get("args", {}).get("correlation") for k in marked})
    result = {}
    for name in RANGES:
        rows, gaps_by = [], defaultdict(float)
        for span in (s for s in spans if s["name"] == name):
            inside = [k for k in marked if span["ts"] <= k["ts"] <= span["ts"] + span["dur"]]
            busy = sum(k["dur"] for k in inside)
            for before, after in zip(inside, inside[1:]):
                gap = after["ts"] - (before["ts"] + before["dur"])
                if gap >= min_gap_us:
                    gaps_by[launcher.get(after.get("args", {}).get("correlation"), after["name"])] += gap
            rows.append({"span_us": span["dur"], "busy_us": busy, "kernels": len(inside)})
        host_us = [h["dur"] for h in hosts if h["name"] == name]
        if rows:
            result[name] = {
                "n": len(rows), "span_ms": sum(r["span_us"] for r in rows) / len(rows) / 1e3,
                "busy_ms": sum(r["busy_us"] for r in rows) / len(rows) / 1e3,
                "kernels": sum(r["kernels"] for r in rows) / len(rows),
                "host_ms": sum(host_us) / max(1, len(host_us)) / 1e3,
                "gaps_ms_by_launcher": {k: round(v / len(rows) / 1e3, 3)
                                        for k, v in sorted(gaps_by.items(), key=lambda kv: -kv[1])[:12]},
            }
    return result


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("policies", nargs="*", default=["h2o+kivi4"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--min-gap-us", type=float, default=5.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = build()
    report = {}
    for name in args.policies:
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            traced_prefill(model, name, args.tokens, trace)
            report[name] = analyse(trace, args.min_gap_us)
        print(f"=== {name} (per compression, averaged)")
        for rng, row in report[name].items():
            print(f"  {rng}: n={row['n']} GPU span {row['span_ms']:.2f} ms, busy {row['busy_ms']:.2f} ms, "
                  f"{row['kernels']:.0f} kernels, host {row['host_ms']:.2f} ms")
            for who, ms in row["gaps_ms_by_launcher"].items():
                print(f"      gap {ms:6.3f} ms before a kernel from {who}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
