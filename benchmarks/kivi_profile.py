"""One fused KIVI decode call at a time, for a profiler (Nsight Compute) to look inside.

    ncu --clock-control none -k regex:_kivi_fold_kernel -s 2 -c 1 --section WarpStateStats \
        --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
        python3 benchmarks/kivi_profile.py --context 32768 --bits 4

Builds the Llama-8B-shaped synthetic KIVI body of `kernel_bench.py` (Hq 32, Hkv 8, D 128, bf16)
and calls `kivi_decode_attention` ``--calls`` times (the first compiles).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from kernel_bench import DTYPE, HKV, HQ, D, SCALE, kivi_variant, synthetic_kivi_body  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4))
    ap.add_argument("--variant", default="", help="kernel_bench.kivi_variant: '' (default), fold, parts@...")
    ap.add_argument("--calls", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    from kvbudget.kernels import kivi_decode as KD

    dev = torch.device("cuda")
    residual = 128
    store, body = synthetic_kivi_body(args.bits, args.batch, HKV, args.context - residual, D, DTYPE, dev)
    tk = torch.randn(args.batch, HKV, residual, D, device=dev, dtype=DTYPE)
    tv = torch.randn_like(tk)
    q = torch.randn(args.batch, HQ, D, device=dev, dtype=DTYPE)
    with kivi_variant(args.variant):
        for _ in range(args.calls):
            KD.kivi_decode_attention(q, body, store, tk, tv, SCALE)
    torch.cuda.synchronize()
    print("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
