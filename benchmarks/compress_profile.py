"""Where one compression's time goes (GPU, Llama-3.1-8B shape, bf16): torch.profiler over
`kb.compress` after a 2048-token block on top of a full budget of 2048. Prints the wall time
of four compressions (the last profiled) and the top operators by host time and by device time.

    PYTHONPATH=src python3 benchmarks/compress_profile.py snapkv h2o
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import kvbudget as kb  # noqa: E402
from gpu_bench import build  # noqa: E402


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policies", nargs="*", default=["snapkv"], help="policy names (default: snapkv)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("compress_profile.py needs a CUDA GPU")
    model = build()
    for name in args.policies:
        policy = kb.policy(name, budget=2048)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, torch.randint(0, 128000, (1, 8192), device="cuda"), block_size=2048)
        block = torch.randint(0, 128000, (1, 2048), device="cuda")
        times = []
        for i in range(4):
            model(input_ids=block, past_key_values=cache, use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            if i == 3:
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    kb.compress(cache, policy)
                    torch.cuda.synchronize()
            else:
                kb.compress(cache, policy)
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"\n=== {name}: compress wall ms (last is profiled) {[round(t * 1e3, 2) for t in times]}")
        avg = prof.key_averages()
        print(avg.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=50))
        print(avg.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=50))


if __name__ == "__main__":
    main()
