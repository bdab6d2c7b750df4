"""The synchronizing CUDA calls of a real block-wise prefill, by kvbudget call site (H100,
Llama-3.1-8B shape, bf16, budget 2048, blocks of 2048): torch's sync debug mode warns at each
operation that makes the host wait for the GPU (`.item()`, a copy to pageable host memory, a
`nonzero`...), and this script counts them per block by the innermost kvbudget frame.
`host_syncs.py` counts the same reads on the CPU for one compression; this one sees the whole
prefill on the device (the forward, the deferred settle, every layer).

    PYTHONPATH=src python3 benchmarks/cuda_syncs.py h2o+kivi4 snapkv+kivi4
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import kvbudget as kb  # noqa: E402
from gpu_smoke import build  # noqa: E402


def site() -> str:
    """The innermost frame in kvbudget's source (else the innermost outside warnings/torch)."""
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if "/kvbudget/" in f.filename and "benchmarks" not in f.filename]
    f = (ours or frames)[-1]
    return f"{f.filename.split('/kvbudget/')[-1]}:{f.lineno} {f.name}"


@torch.inference_mode()
def main() -> None:
    model = build()
    tokens = 8192
    ids = torch.randint(0, 128000, (1, tokens), device="cuda")
    for name in sys.argv[1:] or ["h2o+kivi4"]:
        policy = kb.policy(name, budget=2048, block_size=2048)
        kb.prefill(model, policy.new_cache(model), policy, ids)  # warm-up: compiles, allocator
        counts: collections.Counter[str] = collections.Counter()
        previous = warnings.showwarning
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = lambda *a, **k: counts.update([site()])
                kb.prefill(model, policy.new_cache(model), policy, ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = previous
        blocks = tokens // 2048
        print(f"=== {name}: {sum(counts.values())} synchronizing calls in a {tokens}-token prefill ({blocks} blocks)")
        for where, n in counts.most_common(20):
            print(f"  {n:5d}  {where}")


if __name__ == "__main__":
    main()
