"""Host cost of one eager fused-KIVI decode call (the library decodes store layers eagerly).

    python3 benchmarks/kivi_eager_probe.py     # on a CUDA machine

Per context (8k, 32k) and bits (4, 2), for the fold and parts kernels: the wall time of 300
back-to-back calls divided by 300, before and after the final synchronisation (equal numbers mean
the host, not the GPU, sets the pace), and a cProfile of the Python side at 8k, 4 bits.
Llama-8B shape (Hq 32, Hkv 8, D 128), bf16, batch 1.
"""

import sys, time, cProfile, pstats, io
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "src")
import torch
from kernel_bench import DTYPE, HKV, HQ, D, SCALE, kivi_variant, synthetic_kivi_body
from kvbudget.kernels import kivi_decode as KD
dev = torch.device("cuda")
for ctx in (8192, 32768):
    for bits in (4, 2):
        store, body = synthetic_kivi_body(bits, 1, HKV, ctx - 128, D, DTYPE, dev)
        tk = torch.randn(1, HKV, 128, D, device=dev, dtype=DTYPE); tv = torch.randn_like(tk)
        q = torch.randn(1, HQ, D, device=dev, dtype=DTYPE)
        for v in ("fold", "parts"):
            with kivi_variant(v):
                for _ in range(30):
                    KD.kivi_decode_attention(q, body, store, tk, tv, SCALE)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(300):
                    KD.kivi_decode_attention(q, body, store, tk, tv, SCALE)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                print(f"ctx {ctx} bits {bits} {v}: launch {1e3*(t1-t0)/300:.4f} ms/call, wall {1e3*(t2-t0)/300:.4f} ms/call", flush=True)
                if ctx == 8192 and bits == 4:
                    pr = cProfile.Profile(); pr.enable()
                    for _ in range(100):
                        KD.kivi_decode_attention(q, body, store, tk, tv, SCALE)
                    torch.cuda.synchronize(); pr.disable()
                    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(8); print(s.getvalue()[:2500])
