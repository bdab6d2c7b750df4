"""Count the host syncs of one compression: the calls that read a device value on the host
(``Tensor.item / tolist / __bool__ / __int__ / __index__ / __float__ / nonzero``), by call site.

On a GPU each one stalls the host until the GPU has caught up, so the host cannot queue the
next kernels while the GPU works. Runs on CPU (a random 4-layer model, 2 KV heads of 128
channels): the call sites are the same on any device. Prefill 512 tokens in blocks of 128 with
a budget of 128, append a 128-token block, then count during ``policy.compress``.

Run: ``python benchmarks/host_syncs.py snapkv+kivi4 h2o`` (``KVBUDGET_SCORING=triton`` for the
Triton scoring path through triton's interpreter).
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kvbudget as kb  # noqa: E402
from kvbudget.attention import attach  # noqa: E402

READS = ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "nonzero")


def _shim_interpreter() -> None:
    """triton 3.6's interpreter reads one-element arrays with int(array), which numpy >= 2.4
    refuses (the same shim as tests/test_kernels.py)."""
    try:
        import triton.runtime.interpreter as interp
    except ImportError:
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def count(name: str, model) -> collections.Counter:
    policy = kb.policy(name, budget=128, block_size=128)
    cache = policy.new_cache(model)
    ids = torch.randint(3, 96, (1, 640), generator=torch.Generator().manual_seed(0))
    kb.prefill(model, cache, policy, ids[:, :512])
    where: collections.Counter = collections.Counter()
    originals = {attr: getattr(torch.Tensor, attr) for attr in READS}

    def wrap(attr, fn):
        def read(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=3)[-2]
            where[(attr, Path(frame.filename).name, frame.lineno, frame.name)] += 1
            return fn(self, *args, **kwargs)
        return read

    with torch.inference_mode():
        model(input_ids=ids[:, 512:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        for attr, fn in originals.items():
            setattr(torch.Tensor, attr, wrap(attr, fn))
        try:
            policy.compress(cache)
        finally:
            for attr, fn in originals.items():
                setattr(torch.Tensor, attr, fn)
    return where


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _shim_interpreter()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    attach(model)
    for name in sys.argv[1:] or ["snapkv+kivi4"]:
        where = count(name, model)
        print(f"{name}: {sum(where.values())} host reads in one compression")
        for (attr, file, line, func), n in sorted(where.items(), key=lambda kv: -kv[1]):
            print(f"  {n} x {attr} at {file}:{line} ({func})")


if __name__ == "__main__":
    main()
