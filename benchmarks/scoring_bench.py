"""Attention-reduction scoring on CUDA: materialised vs chunked vs Triton (`kvbudget.scoring`).

The shape of one Llama-3.1-8B layer at a block-wise prefill with budget 2048 and block 2048:
m = 2048 queries (the block), n = 4096 cached entries (budget + block), 32 query heads over 8 KV
heads, head_dim 128, bf16. Key positions: the budget's 2048 survivors spread over the earlier
context, then the block itself (causal inside the block), one KV head padded (ragged).
Per reduction (sum, max, and LazyEviction's scan "lazy", whose `received` is compared) and path:
median milliseconds over ``--repeats`` (CUDA events), peak extra GPU memory, max relative error
vs the materialised float32 reference. For scale: the layer's own matmuls (QKV, O, MLP at m
tokens) and its SDPA attention on the same shape, plus a FLOP estimate. One JSON object per line
(stdout and --out). A few seconds on an H100.

    python benchmarks/scoring_bench.py --out scoring-h100.jsonl
    python benchmarks/scoring_bench.py --sweep-reduce --batch 8 --out reduce-sweep.jsonl
    python benchmarks/scoring_bench.py --sweep-window --out window-sweep.jsonl

``--sweep-reduce`` times pass 2 alone (the reduction given each row's log-sum-exp, which is all
H2O/A2SF/LazyEviction run when the attention call supplies it: docs/scoring.md) over tile sizes,
warps, pipelining stages and the tiles' query axis, for ``--sweep-modes``; ``--batch 8`` stacks 8
layers as a prefill's compression does (one layer leaves the GPU latency-bound).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from kvbudget.compress import scoring
except ImportError:  # not installed: use this checkout's source
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from kvbudget.compress import scoring


def timed(fn, repeats: int) -> tuple[float, int, object]:
    """Median ms over ``repeats`` after one warm-up; peak memory above the start; the result."""
    out = fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base, out


def inputs(args: argparse.Namespace) -> dict:
    """Queries, keys, positions and validity of the benchmark shape (seeded)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", getattr(torch, args.dtype)
    b, hq, h, m, n, d = args.batch, args.heads, args.kv_heads, args.m, args.n, args.head_dim
    q = torch.randn(b, hq, m, d, device=dev, generator=gen).to(dt)
    k = torch.randn(b, h, n, d, device=dev, generator=gen).to(dt)
    kept = n - m  # survivors of earlier blocks: sorted positions below the block's first
    first = 8 * kept
    old = torch.randperm(first, device=dev, generator=gen)[:kept].sort().values
    pos = torch.cat([old, torch.arange(first, first + m, device=dev)]).to(torch.int32).expand(b, h, n).clone()
    valid = torch.ones(b, h, n, dtype=torch.bool, device=dev)
    valid[:, 0, : n // 8] = False  # one head holds fewer entries (ragged, Ada-KV style)
    pos = pos.masked_fill(~valid, -1)
    qpos = torch.arange(first, first + m, device=dev)
    return {"q": q, "k": k, "pos": pos, "valid": valid, "qpos": qpos, "scaling": d**-0.5}


def reduce_fn(x: dict, mode: str, path: str, **kw):
    if mode == "lazy":  # from a fresh state (every entry last important at its write)
        last, gap = x["pos"].float(), torch.zeros_like(x["pos"], dtype=torch.float32)
        if path == "triton":
            from kvbudget.kernels.attn_scores import attention_lazy

            kpos = scoring.key_positions(x["pos"], x["valid"])
            return lambda: attention_lazy(x["q"], x["k"], kpos, x["qpos"], x["scaling"], last, gap, **kw)[0]
        return lambda: scoring.attention_lazy(x["q"], x["k"], x["pos"], x["valid"], x["qpos"], x["scaling"],
                                              last, gap, path=path)[0]
    if path == "triton":
        from kvbudget.kernels.attn_scores import attention_reduce

        kpos = scoring.key_positions(x["pos"], x["valid"])
        return lambda: attention_reduce(x["q"], x["k"], kpos, x["qpos"], x["scaling"], mode, **kw)
    return lambda: scoring.attention_reduce(x["q"], x["k"], x["pos"], x["valid"], x["qpos"], x["scaling"], mode, path=path)


def layer_reference(args: argparse.Namespace, x: dict, repeats: int) -> list[dict]:
    """What scoring competes with: the layer's own matmuls and its attention at this shape."""
    rows = []
    dt = getattr(torch, args.dtype)
    hidden, inter, d = args.heads * args.head_dim, args.intermediate, args.head_dim
    xs = torch.randn(args.m, hidden, device="cuda", dtype=dt)
    w_qkv = torch.randn(hidden, (args.heads + 2 * args.kv_heads) * d, device="cuda", dtype=dt)
    w_o = torch.randn(hidden, hidden, device="cuda", dtype=dt)
    w_up = torch.randn(hidden, 2 * inter, device="cuda", dtype=dt)
    w_down = torch.randn(inter, hidden, device="cuda", dtype=dt)

    def matmuls():
        return (xs @ w_qkv, xs @ w_o, (xs @ w_up)[:, :inter] @ w_down)

    flops = 2 * args.m * (w_qkv.numel() + w_o.numel() + w_up.numel() + w_down.numel())
    ms, mem, _ = timed(matmuls, repeats)
    rows.append({"row": "layer_matmuls", "ms": ms, "gflop": flops / 1e9, "tflops": flops / ms / 1e9})
    g = args.heads // args.kv_heads
    k = x["k"].repeat_interleave(g, 1)
    mask = x["pos"].repeat_interleave(g, 1)[:, :, None, :] <= x["qpos"][None, None, :, None]
    mask = mask & x["valid"].repeat_interleave(g, 1)[:, :, None, :]

    def attention():
        return F.scaled_dot_product_attention(x["q"], k, k, attn_mask=mask)

    flops = 4 * args.heads * args.m * args.n * d
    ms, mem, _ = timed(attention, repeats)
    rows.append({"row": "layer_sdpa_masked", "ms": ms, "gflop": flops / 1e9, "peak_extra_mib": mem / 2**20})
    return rows


def sweep_reduce(args: argparse.Namespace, x: dict, emit) -> None:
    """Pass 2 alone, given the rows' natural-log LSE, over kernel configurations: the unweighted
    sum (H2O) and LazyEviction's scan, each with the queries along either axis of the tiles."""
    import itertools

    from kvbudget.kernels.attn_scores import attention_lazy, attention_reduce

    kpos = scoring.key_positions(x["pos"], x["valid"])
    g = args.heads // args.kv_heads
    q = x["q"].float().view(args.batch, args.kv_heads, g, args.m, -1)
    logits = torch.einsum("bhgmd,bhnd->bhgmn", q, x["k"].float()) * x["scaling"]
    logits = logits.masked_fill(kpos[:, :, None, None, :] > x["qpos"][None, None, None, :, None], float("-inf"))
    lse = logits.logsumexp(-1).view(args.batch, args.heads, args.m)
    del logits, q
    torch.cuda.empty_cache()
    last, gap = x["pos"].float(), torch.zeros_like(x["pos"], dtype=torch.float32)
    grid = itertools.product(args.sweep_modes.split(","), (0, 1), (int(b) for b in args.sweep_block_m.split(",")),
                             (64, 128), (4, 8), (None, 3))
    refs: dict[str, object] = {}
    for mode, axis, bm, bn, warps, stages in grid:
        row = {"row": "reduce_sweep", "mode": mode, "query_axis": axis, "block_m": bm, "block_n": bn,
               "num_warps": warps, "num_stages": stages}
        kw = {"block_m": bm, "block_n": bn, "num_warps": warps, "lse": lse, "num_stages": stages, "query_axis": axis}
        if mode == "lazy":
            fn = lambda: attention_lazy(x["q"], x["k"], kpos, x["qpos"], x["scaling"], last, gap, **kw)  # noqa: E731
        elif mode == "weighted":  # a sum with per-query weights: lazy's registers (tile + accumulator), no scan
            w = torch.ones(args.m, device="cuda")
            fn = lambda: (attention_reduce(x["q"], x["k"], kpos, x["qpos"], x["scaling"], "sum", weights=w, **kw),)  # noqa: E731
        else:
            fn = lambda: (attention_reduce(x["q"], x["k"], kpos, x["qpos"], x["scaling"], mode, **kw),)  # noqa: E731
        try:
            ms, _, res = timed(fn, args.repeats)
            ref = refs.setdefault(mode, res)
            row |= {"ms": ms, "rel_err_vs_first": float((res[0] - ref[0]).abs().max() / ref[0].abs().max())}
            if mode == "lazy":  # the scan's state must match exactly
                row["state_equal_to_first"] = bool(torch.equal(res[1], ref[1]) and torch.equal(res[2], ref[2]))
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a row, not a stop
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        emit(row)


def sweep_window(args: argparse.Namespace, emit) -> None:
    """Few queries (a window, decode-time compressions) over ``--n`` keys, as one layer or as a
    group of stacked layers (``--window-batches``): the chunked path against the kernels, with
    and without the rows' log-sum-exp. What `scoring.TRITON_MIN_ROWS` is chosen from."""
    from kvbudget.kernels.attn_scores import attention_reduce

    for batch in (int(b) for b in args.window_batches.split(",")):
        for m in (int(q) for q in args.window_queries.split(",")):
            x = inputs(argparse.Namespace(**{**vars(args), "batch": batch, "m": m}))
            kpos = scoring.key_positions(x["pos"], x["valid"])
            g = args.heads // args.kv_heads
            q = x["q"].float().view(batch, args.kv_heads, g, m, -1)
            logits = torch.einsum("bhgmd,bhnd->bhgmn", q, x["k"].float()) * x["scaling"]
            logits = logits.masked_fill(kpos[:, :, None, None, :] > x["qpos"][None, None, None, :, None], float("-inf"))
            lse = logits.logsumexp(-1).view(batch, args.heads, m)
            del logits, q
            ref = None
            for path, fn in (
                ("chunked", lambda: scoring.attention_reduce(x["q"], x["k"], x["pos"], x["valid"], x["qpos"],
                                                             x["scaling"], path="chunked")),
                ("triton", lambda: attention_reduce(x["q"], x["k"], kpos, x["qpos"], x["scaling"])),
                ("triton+lse", lambda: attention_reduce(x["q"], x["k"], kpos, x["qpos"], x["scaling"], lse=lse)),
            ):
                ms, mem, res = timed(fn, args.repeats)
                ref = res if ref is None else ref
                emit({"row": "window", "batch": batch, "queries": m, "path": path, "ms": ms,
                      "peak_extra_mib": mem / 2**20,
                      "rel_err_vs_chunked": float((res - ref).abs().max() / ref.abs().max())})
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--m", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="rows of the batch: 8 = a group of stacked layers")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep-reduce", action="store_true", help="time pass 2 alone over kernel configs")
    p.add_argument("--sweep-modes", default="sum,lazy", help="modes --sweep-reduce times (sum, max, weighted, lazy)")
    p.add_argument("--sweep-block-m", default="16,32,64,128", help="query tiles --sweep-reduce tries")
    p.add_argument("--sweep-window", action="store_true", help="few queries: chunked vs the kernels")
    p.add_argument("--window-batches", default="1,8,32", help="stacked layers --sweep-window tries")
    p.add_argument("--window-queries", default="1,32,64", help="queries --sweep-window tries")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("scoring_bench needs CUDA")
    with open(args.out, "w") if args.out else contextlib.nullcontext() as out:
        run(args, out)


def run(args: argparse.Namespace, out) -> None:
    """Every row, printed and written to ``out`` (a file or None) as it is measured."""

    def emit(row: dict) -> None:
        row = {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in row.items()}
        line = json.dumps(row | {"m": args.m, "n": args.n, "heads": args.heads, "kv_heads": args.kv_heads,
                                 "head_dim": args.head_dim, "dtype": args.dtype, "device": torch.cuda.get_device_name()})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    if args.sweep_window:
        sweep_window(args, emit)
        return
    x = inputs(args)
    if args.sweep_reduce:
        sweep_reduce(args, x, emit)
        return
    # One pass of QK^T over every (query head, query, key): the Triton path runs two.
    qk_gflop = 2 * args.heads * args.m * args.n * args.head_dim / 1e9
    emit({"row": "estimate", "qk_gflop_per_pass": qk_gflop, "triton_gflop": 2 * qk_gflop,
          "materialised_logits_mib": args.heads * args.m * args.n * 4 / 2**20})
    try:
        for row in layer_reference(args, x, args.repeats):
            emit(row)
    except Exception as exc:  # noqa: BLE001 - the scoring rows matter more
        emit({"row": "layer_reference", "error": f"{type(exc).__name__}: {exc}"})
    configs = [("materialise", {}), ("chunked", {})]
    configs += [("triton", {"block_m": bm, "block_n": bn, "num_warps": w})
                for bm, bn, w in [(64, 64, 4), (64, 128, 4), (128, 64, 8), (128, 128, 8)]]
    for mode in ("sum", "max", "lazy"):
        ref = None
        for path, kw in configs:
            row = {"row": "scoring", "mode": mode, "path": path, **kw}
            try:
                ms, mem, res = timed(reduce_fn(x, mode, path, **kw), args.repeats)
                if path == "materialise":
                    ref = res
                err = None if ref is None else float((res - ref).abs().max() / ref.abs().max())
                row |= {"ms": ms, "peak_extra_mib": mem / 2**20, "max_rel_err_vs_materialise": err}
                if path == "triton":
                    row["tflops"] = 2 * qk_gflop / ms
            except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            emit(row)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
