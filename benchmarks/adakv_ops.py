"""CPU proxy for Ada-KV's host work: how many operators (and how many host<->device syncs they
would be on a GPU) one compression and one prefill block cost, on a tiny 32-layer Llama.

On the H100, Ada-KV's compression is bound by the host, not the GPU (launches and syncs:
benchmarks/results/gpu-h100/compress_profile-adakv-pyramidkv.log). Counting operators does not
need a GPU: every aten op is a kernel launch there, and these are syncs there:

- ``aten::nonzero`` (boolean-mask indexing: the result's size is read back),
- ``aten::_local_scalar_dense`` (``int()``/``float()``/``bool()``/``.item()`` of a tensor),
- ``Tensor.tolist`` (invisible to the profiler on CPU, counted here by a TorchFunctionMode with
  the other host reads: ``__int__``, ``__bool__``, ``__float__``, ``__index__``, ``item``).

A host read of a tensor that would live on the CPU anyway (the dense layout's ``lengths()``)
is no sync on a GPU, so "host reads" can overcount a little; the profiler's rows are exact.

(a) one ``policy.compress(cache)`` after a block, (b) one block's forward over the ragged cache
(the attention-hook side: ``BudgetedLayer.update`` and ``AttentionPlan.mask``, counted apart).
The digest of the kept positions and per-head lengths lets two versions be compared for equal
results. Run: OMP_NUM_THREADS=1 python benchmarks/adakv_ops.py [--budget 256 --block 256]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import kvbudget as kb  # noqa: E402
from kvbudget.attention import AttentionPlan, attach  # noqa: E402
from kvbudget.cache import BudgetedLayer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

SYNC_OPS = ("aten::nonzero", "aten::_local_scalar_dense")
# Ops that only make a view, change metadata or allocate: no kernel on a GPU. A top-level op
# counts as "compute" (a launch, roughly) when it or an op it calls is not one of these.
FREE_OPS = {f"aten::{name}" for name in (
    "view", "unsqueeze", "squeeze", "select", "slice", "flatten", "expand", "expand_as", "alias", "reshape",
    "_reshape_alias", "transpose", "t", "permute", "resolve_neg", "resolve_conj", "lift_fresh", "to", "detach",
    "view_as", "as_strided", "split", "split_with_sizes", "chunk", "narrow", "unbind", "contiguous",
    "_unsafe_view", "empty", "empty_like", "empty_strided", "is_nonzero", "result_type")}
HOST_READS = {Tensor.tolist, Tensor.item, Tensor.__int__, Tensor.__bool__, Tensor.__float__, Tensor.__index__}
REGIONS = ("kvbudget.update", "kvbudget.mask")


def tiny_llama32(heads: int = 4, kv_heads: int = 2) -> LlamaForCausalLM:
    """A tiny 32-layer Llama (random weights), with the kvbudget attention hook."""
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=32, hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=16, intermediate_size=128, vocab_size=96, max_position_embeddings=65536,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    attach(model)
    return model


class HostReads(TorchFunctionMode):
    """Counts Python reads of tensor values (syncs on a GPU), by region."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.region = "other"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.counts[(self.region, func.__name__)] += 1
        return func(*args, **(kwargs or {}))


_reads: HostReads | None = None


def _labelled(fn, label: str):
    """``fn`` inside a profiler range named ``label`` (and host reads counted under it)."""

    def wrapper(*args, **kwargs):
        outer = _reads.region if _reads else None
        if _reads:
            _reads.region = label
        try:
            with record_function(label):
                return fn(*args, **kwargs)
        finally:
            if _reads:
                _reads.region = outer

    return wrapper


BudgetedLayer.update = _labelled(BudgetedLayer.update, "kvbudget.update")
AttentionPlan.mask = _labelled(AttentionPlan.mask, "kvbudget.mask")


def _region(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in REGIONS:
            return parent.name
        parent = parent.cpu_parent
    return "other"


def _computes(event) -> bool:
    return event.name not in FREE_OPS or any(_computes(c) for c in event.cpu_children)


def op_counts(prof) -> dict:
    """aten ops in the profile: all (nested included), top-level ones (what Python called), the
    top-level ones that compute (not only views: about the kernel launches on a GPU), the sync
    ops; each also per region (update / mask / the rest)."""
    out: dict = {"all": Counter(), "top": Counter(), "compute": Counter(), "sync": Counter(), "names": Counter()}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        region = _region(e)
        out["all"][region] += 1
        parent = e.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            out["top"][region] += 1
            if _computes(e):
                out["compute"][region] += 1
                out["names"][(region, e.name)] += 1
        if e.name in SYNC_OPS:
            out["sync"][(region, e.name)] += 1
    return out


@contextmanager
def counted():
    """Profile the block; yields a dict filled with the counts on exit."""
    global _reads
    result: dict = {}
    _reads = HostReads()
    with profile(activities=[ProfilerActivity.CPU]) as prof, _reads:
        yield result
    result.update(op_counts(prof))
    result["reads"] = _reads.counts
    _reads = None


def report(title: str, c: dict, regions: tuple[str, ...], names: bool = False) -> None:
    print(f"\n{title}")
    for region in regions:
        syncs = {name: c["sync"][(region, name)] for name in SYNC_OPS}
        reads = {k[1]: v for k, v in c["reads"].items() if k[0] == region}
        print(f"  {region:16s} aten ops {c['all'][region]:6d} (top-level {c['top'][region]:5d}, "
              f"computing {c['compute'][region]:5d})  "
              f"nonzero {syncs['aten::nonzero']:4d}  _local_scalar_dense {syncs['aten::_local_scalar_dense']:4d}  "
              f"host reads {sum(reads.values()):4d} {dict(sorted(reads.items()))}")
        if names:
            top = sorted(((n, k[1]) for k, n in c["names"].items() if k[0] == region), reverse=True)
            print("    computing top-level ops:", ", ".join(f"{name.removeprefix('aten::')} {n}" for n, name in top))


def digest(cache) -> str:
    """sha1 over every budgeted layer's kept positions and per-head lengths (padded view)."""
    h = hashlib.sha1()
    for layer in cache.budgeted_layers():
        view = layer.view()
        h.update(view.positions.to(torch.int64).numpy().tobytes())
        h.update(view.lengths.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="adakv")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--context", type=int, default=1024, help="tokens prefilled before the measured block")
    ap.add_argument("--repeats", type=int, default=5, help="timed block + compress rounds after the profiled one")
    ap.add_argument("--heads", type=int, default=4, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="KV heads (Llama-3.1-8B: 32 / 8)")
    ap.add_argument("--ops", action="store_true", help="also list the top-level ops of each region")
    ap.add_argument("--loop", action="store_true", help="compress layer by layer (policy.stack_layers = False)")
    ap.add_argument("--stack-bytes", type=int, default=None, help="policy.STACK_BYTES (layers per stacked group)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_llama32(args.heads, args.kv_heads)
    policy = kb.policy(args.policy, budget=args.budget, block_size=args.block)
    if args.loop:
        policy.stack_layers = False
    if args.stack_bytes:
        policy.STACK_BYTES = args.stack_bytes
    cache = policy.new_cache(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (1, args.context + (args.repeats + 2) * args.block), generator=gen)
    kb.prefill(model, cache, policy, ids[:, : args.context])
    blocks = ids[:, args.context :].split(args.block, dim=1)

    def forward(block):
        model(input_ids=block, past_key_values=cache, use_cache=True, logits_to_keep=1)

    forward(blocks[0])  # (a): compress after a block over the (already ragged) cache
    with counted() as a:
        policy.compress(cache)
    with counted() as b:  # (b): the next block's forward over the ragged cache
        forward(blocks[1])
    policy.compress(cache)
    fwd_t, cmp_t = [], []
    for block in blocks[2:]:
        t0 = time.perf_counter()
        forward(block)
        t1 = time.perf_counter()
        policy.compress(cache)
        t2 = time.perf_counter()
        fwd_t.append(t1 - t0)
        cmp_t.append(t2 - t1)

    layers = len(cache.budgeted)
    print(f"{args.policy}: tiny Llama, {layers} layers, {args.heads} / {args.kv_heads} heads, budget {args.budget}, "
          f"block {args.block}, {'layer by layer, ' if args.loop else ''}"
          f"{f'STACK_BYTES {args.stack_bytes}, ' if args.stack_bytes else ''}"
          f"context {args.context} (+{len(blocks)} blocks); torch {torch.__version__}, 1 thread")
    report("(a) policy.compress(cache)", a, ("other",), args.ops)
    report("(b) one prefill block's forward", b, (*REGIONS, "other"), args.ops)
    print(f"\nwall (CPU, median of {len(cmp_t)}): compress {statistics.median(cmp_t) * 1e3:.1f} ms, "
          f"block forward {statistics.median(fwd_t) * 1e3:.1f} ms")
    print(f"digest of kept positions and lengths: {digest(cache)}")


if __name__ == "__main__":
    main()
