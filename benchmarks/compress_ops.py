"""Host-side operations of one compression, per policy: a CPU proxy for GPU kernel launches.

On a GPU the per-layer compression loop is bound by the host launching small kernels
(docs/benchmarks.md, "GPU performance"), so the number of aten operators one `policy.compress`
dispatches says how much stacking the layers saves, without a GPU. A tiny random-weight Llama
with 32 layers (hidden 64, 4 query heads over 2 KV heads) prefills a context block-wise, takes
one more block uncompressed (every layer over its budget, holding budget + block entries, or
for PyramidKV its own budget + block), then torch.profiler counts the aten operators of one
`policy.compress(cache)`:

- ``aten``: every aten operator event (nested ones included, as the profiler lists them);
- ``top``: aten operators not called from inside another one (what Python dispatches);
- ``kernels``: the lowest operators that compute something (views, reshapes, allocations
  and metadata left out; an operator counts unless one below it computes): the closest to
  the kernels a GPU would launch. A proxy only: on CPU a sort shows as the copy it starts
  with, on a GPU it may launch several kernels.

``--loop`` also counts each policy with stacking turned off (``policy.stack_layers = False``).

Run (the profiler logs to stderr):
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compress_ops.py --loop snapkv pyramidkv 2>/dev/null
Results: benchmarks/results/compress_ops-cpu.txt (before/after stacking PyramidKV).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import kvbudget as kb  # noqa: E402
from kvbudget.attention import attach  # noqa: E402

# Operators that launch no kernel on a GPU: views, reshapes, allocations, metadata.
NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::slice", "aten::select",
    "aten::expand", "aten::as_strided", "aten::t", "aten::transpose", "aten::permute", "aten::unsqueeze",
    "aten::squeeze", "aten::detach", "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::resize_", "aten::lift_fresh", "aten::result_type", "aten::split", "aten::narrow", "aten::unbind",
    "aten::flatten", "aten::contiguous", "aten::to", "aten::_to_copy", "aten::expand_as", "aten::view_as",
    "aten::broadcast_tensors", "aten::numpy_T", "aten::chunk", "aten::movedim", "aten::unflatten",
    "aten::resolve_conj", "aten::resolve_neg", "aten::detach_",
}


def build(layers: int = 32):
    """A random-weight Llama with ``layers`` layers, small enough for a CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    attach(model)
    return model


def count_ops(model, name: str, budget: int, block: int, context: int, stack: bool = True) -> dict[str, int]:
    """Operator counts of one compression of ``name`` after ``context`` tokens + one block."""
    policy = kb.policy(name, budget=budget, block_size=block)
    policy.stack_layers = stack
    cache = policy.new_cache(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (1, context + block), generator=gen)
    kb.prefill(model, cache, policy, ids, block, compress_last=False)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        policy.compress(cache)
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if not _inside_aten(e)]
    kernels = [e for e in aten if _computes(e) and not any(_computes_below(c) for c in e.cpu_children)]
    return {"aten": len(aten), "top": len(top), "kernels": len(kernels)}


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _computes(event) -> bool:
    return event.name.startswith("aten::") and event.name not in NO_KERNEL


def _computes_below(event) -> bool:
    return _computes(event) or any(_computes_below(c) for c in event.cpu_children)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policies", nargs="*", default=["snapkv", "pyramidkv"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--context", type=int, default=512,
                    help="tokens prefilled (and compressed) before the measured block")
    ap.add_argument("--loop", action="store_true", help="also count with stacking off (the per-layer loop)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build(args.layers)
    print(f"{args.layers} layers, budget {args.budget}, block {args.block_size}, context {args.context} + one block")
    print(f"{'policy':<14} {'path':<8} {'aten':>6} {'top':>6} {'kernels':>8}")
    for name in args.policies:
        for stack in (True, False) if args.loop else (True,):
            c = count_ops(model, name, args.budget, args.block_size, args.context, stack)
            path = "stacked" if stack else "loop"
            print(f"{name:<14} {path:<8} {c['aten']:>6} {c['top']:>6} {c['kernels']:>8}")


if __name__ == "__main__":
    main()
