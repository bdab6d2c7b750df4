"""Can fusing the decode step's element-wise kernels close the gap to the roofline? (H100)

The graph-decode profile (docs/benchmarks.md, "GPU performance") spends 2.15 ms of 8.6 ms in
~1170 small element-wise kernels (RMSNorm, RoPE, SiLU*mul, adds, casts). This compares, on the
Llama-3.1-8B shape with 2048 entries per head at batch 1, one CUDA-graph decode step of
(a) the model as is, (b) with each decoder layer's norms and MLP compiled by torch.compile
(inductor fuses their element-wise work), (c) with the whole model compiled (graph breaks at
kvbudget's cache/attention hook). Checks the logits against (a) and prints ms/step and compile time.
Run: PYTHONPATH=src python3 benchmarks/compile_decode.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from gpu_bench import cuda_ms, synthetic_decoder  # noqa: E402
from gpu_smoke import build  # noqa: E402


def run(model, label: str, fn_model=None) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    dec = synthetic_decoder(model, 1, 2048, room=200)
    if fn_model is not None:
        dec.model = fn_model
    tok = torch.tensor([1234], device="cuda")
    t0 = time.perf_counter()
    logits = dec.step(tok).clone()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = cuda_ms(lambda: [dec.step(tok) for _ in range(50)], reps=2, warmup=0) / 50
    print(f"{label:<28} {ms:7.3f} ms/step   first step (compile + capture) {first:6.1f} s", flush=True)
    return ms, logits


@torch.inference_mode()
def main() -> None:
    torch._dynamo.config.cache_size_limit = 256
    model = build()
    base_ms, ref = run(model, "as is")
    try:
        for layer in model.model.layers:
            layer.mlp = torch.compile(layer.mlp, dynamic=False)
            layer.input_layernorm = torch.compile(layer.input_layernorm, dynamic=False)
            layer.post_attention_layernorm = torch.compile(layer.post_attention_layernorm, dynamic=False)
        ms, out = run(model, "norms + MLP compiled")
        print(f"  rel err vs as is {float((out - ref).norm() / ref.norm()):.2e}, speed-up {base_ms / ms:.2f}x")
    except Exception as exc:  # noqa: BLE001
        print("norms + MLP compiled: FAILED", repr(exc)[:400])
    for layer in model.model.layers:  # back to plain modules
        for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
            mod = getattr(layer, name)
            setattr(layer, name, getattr(mod, "_orig_mod", mod))
    try:
        ms, out = run(model, "whole model compiled", torch.compile(model, dynamic=False))
        print(f"  rel err vs as is {float((out - ref).norm() / ref.norm()):.2e}, speed-up {base_ms / ms:.2f}x")
    except Exception as exc:  # noqa: BLE001
        print("whole model compiled: FAILED", repr(exc)[:400])


if __name__ == "__main__":
    main()
