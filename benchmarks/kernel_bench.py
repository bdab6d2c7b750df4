"""Decode-kernel benchmark on one GPU: correctness first, then timings against PyTorch SDPA.

    PYTHONPATH=src python3 benchmarks/kernel_bench.py --out $OUT/kernels.jsonl

1. Correctness on CUDA: every Triton kernel against the torch reference path (random data, KIVI
   bodies built by the real store machinery); prints relative errors, exits non-zero at the end
   if any exceeds its tolerance.
2. Device copy bandwidth (large device-to-device copy, bytes read + written).
3. Timings (`triton.testing.do_bench`, median; inputs rotated over several copies when small
   enough to sit in L2), Llama-3.1-8B attention shape (Hq 32, Hkv 8, D 128, bf16), one layer:
   (a) ragged / uniform per-head lengths at budget 2048, batch 1 and 32: the varlen kernel (dense
       static-capacity buffer and flat ragged storage) vs SDPA on padded tensors with a boolean
       mask (GQA, and queries folded into the KV head) and without a mask;
   (b) full context 8k / 32k / 128k, batch 1 and 8: SDPA over bf16 KV vs the fused KIVI-4 /
       KIVI-2 kernels vs dequantise-in-torch-then-SDPA (the path without the fused kernel).
   Each row reports the bytes the kernel must read, achieved bandwidth and its fraction of the
   copy bandwidth. One JSON object per row in --out; a table at the end.

Budget: < 4 minutes and < 40 GB on an H100. Every row is wrapped in try/except.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import sys
import time
import traceback

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
SCALE = 1 / math.sqrt(D)
ROTATE_BYTES = 400 * 2**20  # rotate over copies until this much is touched (H100 L2: 50 MB)
MAX_COPIES = 8
rows: list[dict] = []
failures: list[str] = []


def emit(out, row: dict) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)
    out.write(json.dumps(row) + "\n")
    out.flush()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bench(fns: list, rep: int = 60) -> float:
    """Median ms of one call, cycling through ``fns`` (one per input copy)."""
    from triton.testing import do_bench

    state = {"i": 0}

    def call():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return float(do_bench(call, warmup=10, rep=rep, return_mode="median"))


def graphed(fns: list) -> list:
    """The calls of ``fns`` captured as CUDA graphs (one per input copy), as a serving loop runs
    them: timings without Python / launch overhead, which otherwise dominates small kernels."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for f in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        graphs.append(g)
    return [g.replay for g in graphs]


def copies_for(nbytes: int) -> int:
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- KIVI bodies -----------------------------------------------------------------------------------
def real_kivi_layer(bits: int, b: int, hkv: int, m: int, d: int, dtype, device, evict: bool = True):
    """A KIVI body through the store machinery (encode, evict a random subset, encode more)."""
    from kvbudget.methods.stores.kivi import KIVI
    from kvbudget.kv.body import rebuild_body

    store = KIVI(bits=bits)
    k = torch.randn(b, hkv, m, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, m, d, device=device, dtype=dtype)
    k[..., 5] *= 6
    idx = torch.arange(m, device=device).expand(b, hkv, m)
    body, tk, tv = rebuild_body(store, None, k, v, idx, 40, None)
    if evict:
        nb = len(body)
        keep = nb * 2 // 3
        sel = torch.rand(b, hkv, nb, device=device).argsort(-1)[..., :keep].sort(-1).values
        idx = torch.cat([sel, nb + torch.arange(40, device=device).expand(b, hkv, 40)], -1)
        body, tk, tv = rebuild_body(store, body, tk, tv, idx, 24, None)
    return store, body, tk, tv


def synthetic_kivi_body(bits: int, b: int, hkv: int, n: int, d: int, dtype, device):
    """A KIVI body of ``n`` entries with KIVI's exact layout and random contents (encoding a 128k
    context through the store would need far more memory than the kernel reads)."""
    from kvbudget.methods.stores.kivi import KIVI
    from kvbudget.kv.body import Body

    store = KIVI(bits=bits)
    pack = 8 // bits
    chunks = -(-n // store.chunk)
    tokens = {
        "k": torch.randint(0, 256, (b, hkv, n, d // pack), dtype=torch.uint8, device=device),
        "v": torch.randint(0, 256, (b, hkv, n, d // pack), dtype=torch.uint8, device=device),
        "v_scale": (torch.rand(b, hkv, n, d // store.group, device=device) * 0.1).to(dtype),
        "v_zero": (torch.randn(b, hkv, n, d // store.group, device=device) * 0.1).to(dtype),
    }
    cid_dtype = torch.int16 if chunks < 2**15 else torch.int32
    chunk_id = (torch.arange(n, device=device) // store.chunk).to(cid_dtype).expand(b, hkv, n).contiguous()
    tables = {
        "k_scale": (torch.rand(b, hkv, chunks, d, device=device) * 0.1).to(dtype),
        "k_zero": (torch.randn(b, hkv, chunks, d, device=device) * 0.1).to(dtype),
    }
    return store, Body(tokens, chunk_id, tables)


# --- 1. correctness -------------------------------------------------------------------------------
def check_correctness(out) -> None:
    from kvbudget.kernels import kivi_decode as KD
    from kvbudget.kernels import reference as R
    from kvbudget.kernels import varlen_decode as VD

    dev = torch.device("cuda")
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d, (hq, hkv) in ((128, (32, 8)), (64, (8, 2)), (128, (4, 4))):
            cases.append((dtype, d, hq, hkv))
    for dtype, d, hq, hkv in cases:
        name = f"{str(dtype)[6:]} D{d} {hq}/{hkv}"
        try:
            b, cap = 3, 1500
            q = torch.randn(b, hq, d, device=dev, dtype=dtype)
            k = torch.randn(b, hkv, cap, d, device=dev, dtype=dtype)
            v = torch.randn(b, hkv, cap, d, device=dev, dtype=dtype)
            lens = torch.randint(0, cap + 1, (b, hkv), device=dev, dtype=torch.int32)
            lens[0, 0], lens[-1, -1] = 0, 1
            ref = R.reference_decode_attention(q.double(), k.double(), v.double(), lens, SCALE)
            for splits in (None, 1, 7):
                e = rel(VD.decode_attention(q, k, v, lens, SCALE, num_splits=splits), ref)
                emit(out, {"kind": "check", "kernel": "decode_attention", "case": name, "splits": splits, "rel_err": e})
                if not e < tol[dtype]:
                    failures.append(f"decode_attention {name} splits={splits}: {e:.3g}")
            # Ragged flat storage, heads in reverse order.
            lens_f = lens.reshape(-1).long()
            order = torch.arange(b * hkv - 1, -1, -1, device=dev)
            starts = torch.zeros_like(lens_f)
            starts[order] = torch.cumsum(lens_f[order], 0) - lens_f[order]
            n = int(lens_f.sum())
            kf = torch.randn(n, d, device=dev, dtype=dtype)
            vf = torch.randn(n, d, device=dev, dtype=dtype)
            ref = R.reference_varlen_decode_attention(q.double(), kf.double(), vf.double(), starts, lens_f, SCALE)
            e = rel(VD.varlen_decode_attention(q, kf, vf, starts, lens_f.int(), SCALE), ref)
            emit(out, {"kind": "check", "kernel": "varlen_decode_attention", "case": name, "rel_err": e})
            if not e < tol[dtype]:
                failures.append(f"varlen_decode_attention {name}: {e:.3g}")
            for bits, evict in itertools.product((2, 4), (True, False)):
                store, body, tk, tv = real_kivi_layer(bits, 2, hkv, 700, d, dtype, dev, evict=evict)
                qk = q[:2]
                bk, bv = body.decode(store, dtype)
                keys, values = torch.cat([bk, tk], 2).double(), torch.cat([bv, tv], 2).double()
                full = torch.full((2, hkv), keys.shape[2], device=dev)
                ref = R.reference_decode_attention(qk.double(), keys, values, full, SCALE)
                for splits in (None, 3):
                    e = rel(KD.kivi_decode_attention(qk, body, store, tk, tv, SCALE, num_splits=splits), ref)
                    emit(out, {"kind": "check", "kernel": f"kivi{bits}_decode_attention", "case": name,
                               "evicted": evict, "splits": splits, "rel_err": e})
                    if not e < tol[dtype]:
                        failures.append(f"kivi{bits} {name} evicted={evict} splits={splits}: {e:.3g}")
        except Exception as exc:  # noqa: BLE001 - report and go on
            traceback.print_exc()
            failures.append(f"{name}: {exc!r}")
            emit(out, {"kind": "check", "case": name, "error": repr(exc)})
    free()


# --- 2. copy bandwidth ----------------------------------------------------------------------------
def copy_bandwidth(out) -> float:
    n = 2 * 2**30
    x = torch.empty(n, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench([lambda x=x, y=y: y.copy_(x)], rep=100)
    gbps = 2 * n / ms / 1e6
    emit(out, {"kind": "copy", "bytes": 2 * n, "ms": ms, "GBps": gbps})
    return gbps


def timing_row(out, copy_gbps: float, fns: list, must_read: int, **meta) -> None:
    try:
        ms = bench(fns)
        gbps = must_read / ms / 1e6
        emit(out, {"kind": "time", **meta, "ms": ms, "bytes": must_read, "GBps": gbps, "frac_copy": gbps / copy_gbps})
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        emit(out, {"kind": "time", **meta, "error": repr(exc)})
        free()


def graph_row(out, copy_gbps: float, fns: list, must_read: int, **meta) -> None:
    """`timing_row` of the calls replayed from CUDA graphs (a failed capture is reported, not raised)."""
    try:
        replays = graphed(fns)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        emit(out, {"kind": "time", **meta, "error": repr(exc)})
        return
    timing_row(out, copy_gbps, replays, must_read, **meta)


# --- 3a. variable per-head lengths -----------------------------------------------------------------
def bench_varlen(out, copy_gbps: float, budget: int = 2048) -> None:
    from kvbudget.kernels import varlen_decode as VD

    dev = torch.device("cuda")
    for mode in ("ragged", "uniform"):
        for b in (1, 32):
            try:
                if mode == "ragged":
                    cap = int(1.75 * budget)
                    lens = torch.randint(budget // 4, cap + 1, (b, HKV), device=dev, dtype=torch.int32)
                else:
                    cap = budget
                    lens = torch.full((b, HKV), budget, device=dev, dtype=torch.int32)
                held = int(lens.sum())
                kv_bytes = 2 * b * HKV * cap * D * DTYPE.itemsize
                n_copies = copies_for(kv_bytes)
                sets = []
                for _ in range(n_copies):
                    q = torch.randn(b, HQ, D, device=dev, dtype=DTYPE)
                    k = torch.randn(b, HKV, cap, D, device=dev, dtype=DTYPE)
                    v = torch.randn(b, HKV, cap, D, device=dev, dtype=DTYPE)
                    valid = torch.arange(cap, device=dev) < lens[..., None]  # [B, Hkv, cap]
                    flat_k, flat_v = k[valid], v[valid]  # head after head
                    starts = (torch.cumsum(lens.reshape(-1).long(), 0) - lens.reshape(-1).long())
                    sets.append((q, k, v, valid, flat_k, flat_v, starts))
                useful = held * 2 * D * DTYPE.itemsize
                meta = {"bench": "varlen", "mode": mode, "batch": b, "budget": budget, "cap": cap, "held": held}
                timing_row(out, copy_gbps, [lambda s=s, lens=lens, cap=cap: VD.decode_attention(s[0], s[1], s[2], lens, SCALE, max_len=cap)
                                            for s in sets], useful, impl="triton_dense", **meta)
                timing_row(out, copy_gbps, [lambda s=s, lens=lens, cap=cap: VD.varlen_decode_attention(
                    s[0], s[4], s[5], s[6], lens, SCALE, max_len=cap)
                                            for s in sets], useful, impl="triton_flat", **meta)
                padded = kv_bytes
                mask_gqa = [s[3].repeat_interleave(HQ // HKV, dim=1)[:, :, None, :] for s in sets]  # [B, Hq, 1, cap]
                timing_row(out, copy_gbps, [lambda s=s, m=m: F.scaled_dot_product_attention(
                    s[0][:, :, None], s[1], s[2], attn_mask=m, scale=SCALE, enable_gqa=True)
                    for s, m in zip(sets, mask_gqa)], padded, impl="sdpa_mask_gqa", **meta)
                # The g query heads of a KV head as g query positions: no GQA expansion needed.
                timing_row(out, copy_gbps, [lambda s=s, b=b: F.scaled_dot_product_attention(
                    s[0].view(b, HKV, HQ // HKV, D), s[1], s[2], attn_mask=s[3][:, :, None, :], scale=SCALE)
                    for s in sets], padded, impl="sdpa_mask_folded", **meta)
                timing_row(out, copy_gbps, [lambda s=s: F.scaled_dot_product_attention(
                    s[0][:, :, None], s[1], s[2], scale=SCALE, enable_gqa=True)
                    for s in sets], padded, impl="sdpa_nomask_gqa", **meta)
                del sets, mask_gqa
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                emit(out, {"kind": "time", "bench": "varlen", "mode": mode, "batch": b, "error": repr(exc)})
            free()


# --- 3b. KIVI over the full context ----------------------------------------------------------------
def bench_kivi(out, copy_gbps: float, residual: int = 128,
               contexts: tuple[int, ...] = (8192, 32768, 131072), torch_path: bool = True) -> None:
    """SDPA over bf16 vs the fused KIVI-4 / KIVI-2 kernels vs dequantising the body in torch."""
    from kvbudget.kernels import kivi_decode as KD

    dev = torch.device("cuda")
    for ctx in contexts:
        for b in (1, 8):
            meta = {"bench": "kivi", "context": ctx, "batch": b}
            try:
                kv_bytes = 2 * b * HKV * ctx * D * DTYPE.itemsize
                n_copies = copies_for(kv_bytes)
                dense = [(torch.randn(b, HQ, 1, D, device=dev, dtype=DTYPE),
                          torch.randn(b, HKV, ctx, D, device=dev, dtype=DTYPE),
                          torch.randn(b, HKV, ctx, D, device=dev, dtype=DTYPE)) for _ in range(n_copies)]
                sdpa = [lambda s=s: F.scaled_dot_product_attention(s[0], s[1], s[2], scale=SCALE, enable_gqa=True)
                        for s in dense]
                timing_row(out, copy_gbps, sdpa, kv_bytes, impl="sdpa_bf16", **meta)
                graph_row(out, copy_gbps, sdpa, kv_bytes, impl="sdpa_bf16_graph", **meta)
                del dense
                free()
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                emit(out, {"kind": "time", **meta, "impl": "sdpa_bf16", "error": repr(exc)})
                free()
            for bits in (4, 2):
                try:
                    n = ctx - residual
                    sets = []
                    for _ in range(max(1, copies_for(kv_bytes * bits // 16))):
                        store, body = synthetic_kivi_body(bits, b, HKV, n, D, DTYPE, dev)
                        tk = torch.randn(b, HKV, residual, D, device=dev, dtype=DTYPE)
                        tv = torch.randn(b, HKV, residual, D, device=dev, dtype=DTYPE)
                        q = torch.randn(b, HQ, D, device=dev, dtype=DTYPE)
                        sets.append((q, body, tk, tv))
                    must = body.nbytes() + tk.nbytes + tv.nbytes
                    fused = [lambda s=s, st=store: KD.kivi_decode_attention(s[0], s[1], st, s[2], s[3], SCALE)
                             for s in sets]
                    timing_row(out, copy_gbps, fused, must, impl=f"kivi{bits}_fused", **meta)
                    graph_row(out, copy_gbps, fused, must, impl=f"kivi{bits}_fused_graph", **meta)
                    # Without the fused kernel: dequantise the body in torch, concat, SDPA.
                    # Its float32 temporaries are ~6x the bf16 KV: skip where that would not fit.
                    if torch_path and kv_bytes * 6 < 24 * 2**30:
                        def torch_path(s, store=store):
                            bk, bv = s[1].decode(store, DTYPE)
                            keys, values = torch.cat([bk, s[2]], 2), torch.cat([bv, s[3]], 2)
                            return F.scaled_dot_product_attention(s[0][:, :, None], keys, values, scale=SCALE, enable_gqa=True)

                        timing_row(out, copy_gbps, [lambda s=s: torch_path(s) for s in sets[:1]], must,
                                   impl=f"kivi{bits}_torch_dequant_sdpa", **meta)
                    else:
                        emit(out, {"kind": "time", **meta, "impl": f"kivi{bits}_torch_dequant_sdpa",
                                   "skipped": "needs > 24 GB of temporaries"})
                    del sets
                except Exception as exc:  # noqa: BLE001
                    traceback.print_exc()
                    emit(out, {"kind": "time", **meta, "impl": f"kivi{bits}", "error": repr(exc)})
                free()


def table() -> None:
    print("\n=== copy bandwidth / kernel timings ===")
    base = {}
    for r in rows:
        if r.get("impl") in ("sdpa_bf16", "sdpa_mask_folded") and "ms" in r:
            base[(r["bench"], r.get("mode"), r.get("context"), r["batch"])] = r["ms"]
    print(f"{'bench':7} {'case':>14} {'B':>3} {'impl':28} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'vs base':>8}")
    for r in rows:
        if r["kind"] == "copy":
            print(f"{'copy':7} {'':>14} {'':>3} {'device-to-device':28} {r['ms']:9.4f} {r['GBps']:8.0f} {100:6.0f}")
        if r["kind"] != "time":
            continue
        case = r.get("mode") or f"{r.get('context', '')}"
        if "ms" not in r:
            print(f"{r['bench']:7} {case:>14} {r['batch']:>3} {r.get('impl', '?'):28} {r.get('error', r.get('skipped', ''))[:60]}")
            continue
        b = base.get((r["bench"], r.get("mode"), r.get("context"), r["batch"]))
        speed = f"{b / r['ms']:7.2f}x" if b else ""
        print(f"{r['bench']:7} {case:>14} {r['batch']:>3} {r['impl']:28} {r['ms']:9.4f} {r['GBps']:8.0f} {100 * r['frac_copy']:6.1f} {speed:>8}")
    print("(vs base: speed-up over sdpa_bf16 (kivi) / sdpa_mask_folded (varlen); GB/s = bytes the kernel must read / time;"
          " *_graph: the same calls replayed from CUDA graphs, without Python and launch overhead)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="kernels.jsonl")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--only-kivi", action="store_true", help="time the KIVI kernels only (no varlen, no torch path)")
    ap.add_argument("--contexts", default="8192,32768,131072")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t0 = time.time()
    with open(args.out, "w") as out:
        emit(out, {"kind": "env", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__})
        if not args.skip_check:
            check_correctness(out)
            print(f"correctness: {'FAILED: ' + '; '.join(failures) if failures else 'all kernels within tolerance'}"
                  f" ({time.time() - t0:.0f} s)", flush=True)
        try:
            copy_gbps = copy_bandwidth(out)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            copy_gbps = float("nan")
        free()
        if not args.only_kivi:
            bench_varlen(out, copy_gbps)
        bench_kivi(out, copy_gbps,
                   contexts=tuple(int(c) for c in args.contexts.split(",")), torch_path=not args.only_kivi)
        emit(out, {"kind": "done", "seconds": time.time() - t0, "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
                   "failures": failures})
    table()
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
