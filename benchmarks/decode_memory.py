"""GPU memory while an answer is decoded from static buffers (CUDA graph), per policy.

Prefills a context block-wise on the random-weight Llama-3.1-8B shape (bf16), then decodes an
answer the way `Session` does (`runtime.answer.greedy_decode`: static buffers + one CUDA graph per token,
decode-time compression every ``--interval`` tokens, inside the answer's scratch block) and
reports, above the memory held before the answer (weights + the compressed cache):

* ``answer_peak_gb``: the peak during the answer (``torch.cuda.max_memory_allocated``);
* ``after_gb``: what is still allocated after it (the decoder dropped);
* ``kv_gb``: the cache's own bytes (`BudgetedCache.nbytes`) before the answer.

One JSON line per (policy, context). ``--breakdown`` adds ``stages``: for each call of the
steps of an answer (building the static decoder, the snapshot, each compression, each reload),
the memory allocated above the start of the answer when it returns, and the peak reached
inside it, in GB. Run on a GPU (from the repository root):
    PYTHONPATH=src python3 benchmarks/decode_memory.py --out decode_memory.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:  # PYTHONPATH may name another checkout's src/ (an A/B against older code)
    import kvbudget as kb
except ImportError:
    sys.path.insert(1, str(HERE.parent / "src"))
    import kvbudget as kb
from kvbudget.runtime.answer import greedy_decode  # noqa: E402
from gpu_bench import build  # noqa: E402

GB = 1e9


def _staged(stages: list, base: list[int], label: str, fn):
    """``fn`` wrapped to append (label, allocated after, peak inside) above ``base[0]``, in GB."""
    def wrapper(*args, **kwargs):
        before_peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            stages.append([label, round((torch.cuda.memory_allocated() - base[0]) / GB, 3),
                           round((peak - base[0]) / GB, 3)])
            # The answer's overall peak stays measured: the stage's peak is folded back in.
            torch.cuda.reset_peak_memory_stats()
            torch.empty(max(before_peak, peak) - torch.cuda.memory_allocated(), dtype=torch.uint8, device="cuda")
    return wrapper


# (module, class or None for a module-level function, attribute, label): what is timed and measured.
STAGES = (("kvbudget.runtime.decoder", "StaticDecoder", "from_cache", "decoder"),
          ("kvbudget.kv.cache", "BudgetedCache", "before_compress", "snapshot"),
          ("kvbudget.runtime.answer", None, "compress", "compress"),
          ("kvbudget.runtime.decoder", "StaticDecoder", "reload", "reload"))


@torch.inference_mode()
def measure(model, name: str, budget: int | None, context: int, new: int, interval: int,
            breakdown: bool = False) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    kw = {"budget": budget} if budget else {}
    policy = kb.policy(name, decode_interval=interval, **kw)
    cache = policy.new_cache(model)
    ids = torch.randint(0, 128000, (1, context), device="cuda")
    logits, _ = kb.prefill(model, cache, policy, ids, block_size=2048)
    del ids
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    kv = cache.nbytes()
    torch.cuda.reset_peak_memory_stats()
    stages: list = []
    patched = []
    if breakdown:
        import importlib

        for module, cls_name, attr, label in STAGES:
            owner = importlib.import_module(module)
            cls = getattr(owner, cls_name) if cls_name else owner
            original = cls.__dict__[attr] if cls_name else getattr(owner, attr)
            fn = original.__func__ if isinstance(original, classmethod) else original
            wrapped = _staged(stages, [before], label, fn)
            setattr(cls, attr, classmethod(wrapped) if isinstance(original, classmethod) else wrapped)
            patched.append((cls, attr, original))
    try:
        with cache.scratch():
            out = greedy_decode(model, cache, policy, logits, new, eos=set(), mode="graph")
    finally:
        for cls, attr, original in patched:
            setattr(cls, attr, original)
    gc.collect()
    torch.cuda.synchronize()
    row = {"policy": name, "budget": budget, "context": context, "new_tokens": len(out), "interval": interval,
           "kv_gb": round(kv / GB, 3), "answer_peak_gb": round((torch.cuda.max_memory_allocated() - before) / GB, 3),
           "after_gb": round((torch.cuda.memory_allocated() - before) / GB, 3)}
    if breakdown:
        row["stages"] = stages
    del cache, logits
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="full:0,snapkv:2048,kivi4:0,snapkv+kivi4:2048",
                        help="policy:budget pairs (0: no budget), comma-separated")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--interval", type=int, default=64, help="decode-time compression every N tokens (0: none)")
    parser.add_argument("--breakdown", action="store_true", help="memory after / peak inside each step of the answer")
    args = parser.parse_args()
    model = build()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "src": kb.__file__}
    with open(args.out, "w") as f:
        for run in args.runs.split(","):
            name, budget = run.split(":")
            row = meta | measure(model, name, int(budget) or None, args.context, args.new, args.interval,
                                 args.breakdown)
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
