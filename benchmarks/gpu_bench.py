"""GPU benchmark: peak prefill memory, prefill/compression time, decode speed, roofline.

Random-weight model of the Llama-3.1-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128,
bf16; speed does not depend on weight values), built from a config (`build`).

Sections (``--sections``, comma-separated; one JSON object per row to ``--out``):

* ``bw``: device copy bandwidth (bytes read + written per second) and
  a read-only reduction's bandwidth: the ceilings the roofline uses.
* ``baseline``: plain transformers (DynamicCache, sdpa): one-shot prefill of each context, peak
  memory, then eager decode ms/token: the baseline, measured in the same run.
* ``budget``: kvbudget block-wise prefill (block 2048) per policy x budget x context: peak GPU
  memory (flat in context), prefill seconds, compression share; then decode ms/token eagerly
  (BudgetedCache) and with static buffers + one CUDA graph per step (kvbudget.runtime.static).
* ``profile``: the kernels of one graph decode step, grouped (matmuls, attention, other) with
  the most frequent "other" kernels named.
* ``batch``: the largest batch of 32k-token conversations that fits, full cache vs budget 2k vs
  every token held by KIVI-4 / KIVI-2 (the encoded body in `static_store` buffers), each with
  its decode ms/step and tokens/s. The KV contents are random (filled, not prefilled:
  speed does not depend on values; prefilling 200 x 32k tokens would take the whole lease).

Roofline per decode step: bytes that must be read (weights except the embedding table, of which
only the fed rows are read, + every kept K/V entry) / the measured copy bandwidth. ``fraction`` =
roofline time / measured time.

The plain transformers rows always run on the unfused model.

Run on a GPU (from the repository root):
    PYTHONPATH=src python3 benchmarks/gpu_bench.py --out gpu_bench.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import kvbudget as kb  # noqa: E402
from kvbudget.runtime import fusion  # noqa: E402
from kvbudget.runtime import decoder as kdecoder  # noqa: E402
from kvbudget.runtime import static as kstatic  # noqa: E402
from kvbudget.kv.hook import attach  # noqa: E402

GB = 1e9
VOCAB = 128000  # token ids drawn below this; the real default model's vocabulary under --model default
ROWS: list[dict] = []
OUT: Path | None = None


def emit(row: dict) -> None:
    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__} | row
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


def cuda_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(layers: int = 32, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
    """The random-weight Llama-3.1-8B shape on CUDA, built with plain transformers, hook attached."""
    cfg = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0, attn_implementation="sdpa", dtype=dtype,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    attach(model)
    return model


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


# --- ceilings -------------------------------------------------------------------------------
def bandwidth() -> float:
    """Copy bandwidth in bytes/s (read + written), 4 GiB buffers."""
    n = 1 << 31
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    copy_ms = cuda_ms(lambda: b.copy_(a), reps=20)
    read_ms = cuda_ms(lambda: a.sum(dtype=torch.float32), reps=20)
    bw = 2 * a.nbytes / (copy_ms / 1e3)
    emit({"section": "bw", "copy_bytes": a.nbytes, "copy_ms": round(copy_ms, 3), "copy_tb_s": round(bw / 1e12, 3),
          "read_tb_s": round(a.nbytes / (read_ms / 1e3) / 1e12, 3)})
    del a, b
    free_memory()
    return bw


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: all but the embedding table (rows gathered),
    unless the output head is tied to it (SmolLM2): then the head reads the whole table."""
    embed = model.get_input_embeddings().weight
    total = sum(p.nbytes for p in model.parameters())  # a tied table is one parameter, counted once
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    return total if tied else total - embed.nbytes


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_entry_bytes(model) -> int:
    cfg = model.config
    return cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * 2 * 2  # K and V, bf16


def roofline(model, entries_read: int, batch: int, bw: float, measured_ms: float, kv_bytes: int | None = None) -> dict:
    """``kv_bytes``: the KV bytes a step reads when they are not ``entries_read`` bf16 entries per
    head (an encoded KIVI body)."""
    kv = entries_read * kv_entry_bytes(model) if kv_bytes is None else kv_bytes
    bytes_read = weight_bytes(model) + kv + batch * model.config.hidden_size * 2
    ms = bytes_read / bw * 1e3
    return {"bytes_read_gb": round(bytes_read / GB, 3), "roofline_ms": round(ms, 3),
            "fraction": round(ms / measured_ms, 3)}


# --- baseline: plain transformers -------------------------------------------------------------
@torch.inference_mode()
def baseline(model, context: int, bw: float, steps: int = 32) -> None:
    fusion.unfuse(model)  # plain transformers
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, VOCAB, (1, context), device="cuda")
    cache = DynamicCache(config=model.config)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

    def step():
        nonlocal tok
        tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    # Eager decode is bound by the host launching kernels: warm up, then the median of 3 runs.
    ms = cuda_ms(lambda: [step() for _ in range(steps)], reps=3, warmup=1) / steps
    emit({"section": "baseline", "engine": "transformers DynamicCache", "context": context, "prefill_s": round(prefill_s, 3),
          "peak_prefill_gb": round(peak / GB, 2), "kv_gb": round(kv / GB, 3), "decode_ms": round(ms, 2)}
         | roofline(model, context, 1, bw, ms))
    del cache, out
    free_memory()


# --- kvbudget: block-wise prefill, eager and graph decode ----------------------------------------
@torch.inference_mode()
def budgeted(model, name: str, budget: int | None, context: int, bw: float, block: int = 2048, steps: int = 64) -> None:
    free_memory()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    policy = kb.policy(name, budget=budget) if budget else kb.policy(name)
    cache = policy.new_cache(model)
    ids = torch.randint(0, VOCAB, (1, context), device="cuda")
    logits, stats = kb.prefill(model, cache, policy, ids, block_size=block)
    peak = torch.cuda.max_memory_allocated()
    entries = int(sum(layer.lengths().sum() for layer in cache.layers) // len(cache.layers))
    kv_entries = entries // model.config.num_key_value_heads  # per head, mean over layers
    row = {"section": "budget", "fused_ops": fusion.mode(), "policy": name, "budget": budget, "context": context,
           "block": block,
           "prefill_s": round(stats.seconds, 3), "compress_share": round(stats.compress_seconds / stats.seconds, 4),
           "peak_prefill_gb": round(peak / GB, 2), "weights_gb": round(weights / GB, 2),
           "kv_gb": round(cache.nbytes() / GB, 3), "entries_per_head": kv_entries}
    tok = logits.argmax(-1, keepdim=True)

    # Eager decode on the BudgetedCache (inside scratch, so the cache is unchanged afterwards).
    with cache.scratch():
        def eager():
            nonlocal tok
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

        row["eager_decode_ms"] = round(cuda_ms(lambda: [eager() for _ in range(16)], reps=3, warmup=1) / 16, 2)
    # Static buffers + CUDA graph.
    dec = kdecoder.StaticDecoder.from_cache(model, cache, capacity=steps * 3 + 8)  # fuses under "auto"
    first = tok[:, 0]
    dec.step(first)  # capture
    graph_ms = cuda_ms(lambda: [dec.step(first) for _ in range(steps)], reps=2, warmup=0) / steps
    row["graph_decode_ms"] = round(graph_ms, 3)
    row["graph_speedup_vs_eager"] = round(row["eager_decode_ms"] / graph_ms, 2)
    # A store's step reads the encoded body + the tail: the bytes held, less positions and scores.
    kv_read = None if policy.store is None else cache.nbytes() - sum(
        view.positions.nbytes + sum(s.nbytes for s in view.state.values()) for view in (layer.view() for layer in cache.layers))
    emit(row | roofline(model, kv_entries, 1, bw, graph_ms, kv_read))
    del dec, cache
    free_memory()


# --- batch: the largest batch of 32k conversations --------------------------------------------------
def synthetic_decoder(model, batch: int, entries: int, room: int) -> kdecoder.StaticDecoder:
    """A StaticDecoder over ``batch`` sequences holding ``entries`` random K/V per head."""
    cfg = model.config
    layers = []
    bh = batch * cfg.num_key_value_heads
    width = entries + room
    for _ in range(cfg.num_hidden_layers):
        keys = torch.empty(bh * width, cfg.head_dim, dtype=torch.bfloat16, device="cuda").normal_()
        values = torch.empty_like(keys).normal_()
        starts = torch.arange(bh, device="cuda", dtype=torch.long) * width
        lens = torch.full((bh,), entries, dtype=torch.int32, device="cuda")
        layers.append(kstatic.StaticLayer(keys, values, starts, lens, width, dense=True))
    positions = torch.full((batch,), 32768, dtype=torch.long)
    return kdecoder.StaticDecoder(model, layers, positions, capacity=room)


def synthetic_kivi_decoder(model, batch: int, entries: int, room: int, bits: int = 4) -> kdecoder.StaticDecoder:
    """A StaticDecoder over ``batch`` sequences of ``entries`` per head held by KIVI: all but the
    128-entry residual encoded (random codes and scales) in `StaticStoreLayer` buffers."""
    from kvbudget.methods.stores.kivi import KIVI
    from kvbudget.runtime.static_store import StaticStoreLayer
    from kvbudget.kv.body import Body

    cfg = model.config
    store = KIVI(bits=bits)
    h, d, tail = cfg.num_key_value_heads, cfg.head_dim, store.residual
    n = entries - tail
    layers = []
    for _ in range(cfg.num_hidden_layers):
        def rand(*shape):
            return torch.empty(batch, h, *shape, dtype=torch.bfloat16, device="cuda").uniform_(0.01, 0.1)

        codes = lambda: torch.randint(0, 256, (batch, h, n, d * bits // 8), dtype=torch.uint8, device="cuda")  # noqa: E731
        body = Body(
            tokens={"k": codes(), "v": codes(), "v_scale": rand(n, d // store.group), "v_zero": rand(n, d // store.group)},
            chunk_id=(torch.arange(n, device="cuda", dtype=torch.int32) // store.group).expand(batch, h, n).contiguous(),
            chunks={"k_scale": rand(-(-n // store.group), d), "k_zero": rand(-(-n // store.group), d)},
        )
        layer = StaticStoreLayer(store, body, rand(tail + room, d), rand(tail + room, d))
        layer.body_lens.fill_(n)
        layer.tail_lens.fill_(tail)
        layer._tail = tail
        layers.append(layer)
    positions = torch.full((batch,), entries, dtype=torch.long)
    return kdecoder.StaticDecoder(model, layers, positions, capacity=room)


def kivi_seq_bytes(model, entries: int, bits: int) -> int:
    """KV bytes one sequence holds under KIVI (body encoded, 128-entry tail in bf16)."""
    from kvbudget.methods.stores.kivi import KIVI

    cfg = model.config
    store = KIVI(bits=bits)
    per_head = (entries - store.residual) * store.entry_bytes(cfg.head_dim, torch.bfloat16) + store.residual * 4 * cfg.head_dim
    return int(per_head * cfg.num_key_value_heads * cfg.num_hidden_layers)


@torch.inference_mode()
def try_batch(model, batch: int, entries: int, steps: int = 8, make=synthetic_decoder) -> float | None:
    """Decode ms/step at ``batch`` with ``entries`` per head, or None if it does not fit."""
    dec = None
    try:
        free_memory()
        dec = make(model, batch, entries, room=steps + 2)
        tok = torch.randint(0, model.config.vocab_size, (batch,), device="cuda")
        dec.step(tok)
        ms = cuda_ms(lambda: [dec.step(tok) for _ in range(steps // 2)], reps=2, warmup=0) / (steps // 2)
        return ms
    except torch.OutOfMemoryError:
        return None
    finally:
        del dec
        free_memory()


@torch.inference_mode()
def try_dynamic_batch(model, batch: int, context: int, steps: int = 4) -> float | None:
    """Plain transformers at ``batch`` x ``context`` (random KV filled in), ms/step or None."""
    cache = None
    fusion.unfuse(model)  # plain transformers
    try:
        free_memory()
        cfg = model.config
        cache = DynamicCache(config=cfg)
        for i in range(cfg.num_hidden_layers):
            k = torch.empty(batch, cfg.num_key_value_heads, context, cfg.head_dim, dtype=torch.bfloat16, device="cuda").normal_()
            cache.update(k, torch.empty_like(k).normal_(), i)
        tok = torch.randint(0, VOCAB, (batch, 1), device="cuda")
        model(input_ids=tok, past_key_values=cache, use_cache=True)
        return cuda_ms(lambda: [model(input_ids=tok, past_key_values=cache, use_cache=True) for _ in range(steps)],
                       reps=1, warmup=0) / steps
    except torch.OutOfMemoryError:
        return None
    finally:
        del cache
        free_memory()


def largest(fn, guess: int) -> tuple[int, float]:
    """Largest batch for which ``fn(batch)`` returns a time (bisection around ``guess``)."""
    lo, lo_ms = 0, None
    hi = guess
    while (ms := fn(hi)) is not None:  # grow until it fails
        lo, lo_ms, hi = hi, ms, hi * 2
    while hi - lo > max(1, lo // 32):
        mid = (lo + hi) // 2
        ms = fn(mid)
        if ms is None:
            hi = mid
        else:
            lo, lo_ms = mid, ms
    return lo, lo_ms


def batch_section(model, bw: float, context: int = 32768, budget: int = 2048, engines: str = "all") -> None:
    free = torch.cuda.mem_get_info()[0]
    kivi = {bits: lambda m, b, e, room, bits=bits: synthetic_kivi_decoder(m, b, e, room, bits) for bits in (4, 2)}
    rows = [
        ("transformers DynamicCache (full)", context, None, lambda b: try_dynamic_batch(model, b, context)),
        ("kvbudget static+graph (full)", context, None, lambda b: try_batch(model, b, context)),
        (f"kvbudget static+graph (budget {budget})", budget, None, lambda b: try_batch(model, b, budget)),
        ("kvbudget static+graph (kivi4, every token)", context, 4, lambda b: try_batch(model, b, context, make=kivi[4])),
        ("kvbudget static+graph (kivi2, every token)", context, 2, lambda b: try_batch(model, b, context, make=kivi[2])),
    ]
    for engine, entries, bits, fn in rows:
        if engines != "all" and not any(key in engine for key in engines.split(",")):
            continue
        per_seq = entries * kv_entry_bytes(model) if bits is None else kivi_seq_bytes(model, entries, bits)
        guess = max(1, int(free * 0.6 // per_seq))
        try:
            batch, ms = largest(fn, guess)
        except Exception as exc:  # noqa: BLE001 - one failure must not lose the other rows
            emit({"section": "batch", "engine": engine, "error": repr(exc)[:500]})
            continue
        if not batch:
            emit({"section": "batch", "engine": engine, "error": "not even batch 1 fits"})
            continue
        one = fn(1)
        emit({"section": "batch", "engine": engine, "context": context, "entries_per_head": entries,
              "kv_gb_per_seq": round(per_seq / GB, 3), "max_batch": batch, "step_ms": round(ms, 2),
              "tokens_per_s": round(batch / ms * 1e3, 1), "batch1_ms": round(one, 2) if one else None}
             | roofline(model, entries * batch, batch, bw, ms, None if bits is None else per_seq * batch))


# --- offload: episode caches host <-> device ------------------------------------------------------
@torch.inference_mode()
def offload_section(model, episodes: int = 4, budget: int = 2048, context: int = 8192, turn: int = 512) -> None:
    """EpiCache's turn step: a turn is prefilled into every episode cache, each brought from host
    memory and sent back. Blocking copies (pageable memory) vs copies on a side stream into pinned
    memory that overlap the other episodes' prefill (`BudgetedCache.to(non_blocking=True)`)."""
    from types import SimpleNamespace

    from kvbudget.runtime.episodic import EpisodicSession
    from kvbudget.runtime.prefill import PrefillStats

    free_memory()
    policy = kb.policy("snapkv", budget=budget)
    eps = []
    for e in range(episodes):
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, torch.randint(0, VOCAB, (1, context), device="cuda"), block_size=2048)
        eps.append(SimpleNamespace(cache=cache.to("cpu"), prompt_ids=torch.randint(0, VOCAB, (1, 64)), stats=PrefillStats()))
    ids = torch.randint(0, VOCAB, (1, turn))
    cache_gb = eps[0].cache.nbytes() / GB
    # Twice each, consecutively: the second async run starts from caches in pinned memory, as a
    # session's would after its first offload (the blocking path leaves them pageable).
    for overlap in (False, False, True, True):
        fake = SimpleNamespace(model=model, tok=None, policy=policy, tokens=None, block_size=2048, _targets=eps,
                               _active=None, async_copies=overlap)
        # Each run adds the turn to every cache and compresses back to the budget: same sizes.
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        EpisodicSession._prefill_ids(fake, ids, True, None)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        emit({"section": "offload", "episodes": episodes, "cache_gb": round(cache_gb, 3), "turn_tokens": turn,
              "async_pinned": overlap, "wall_s": round(wall, 4)})
    for ep in eps:
        ep.cache.to("cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for ep in eps:
        kb.prefill(model, ep.cache, policy, ids, 2048, True, ep.prompt_ids)
    torch.cuda.synchronize()
    emit({"section": "offload", "episodes": episodes, "cache_gb": round(cache_gb, 3), "turn_tokens": turn,
          "async_pinned": None, "note": "no copies: all caches resident", "wall_s": round(time.perf_counter() - t0, 4)})
    del eps
    free_memory()


# --- profile: where a graph decode step's time goes ------------------------------------------------
@torch.inference_mode()
def profile_section(model, bw: float, entries: int = 2048, batch: int = 1) -> None:
    """Kernels of one decode step (the same kernels the graph replays), grouped: matrix products
    (weights), attention, everything else; with the bytes the matrix products must read."""
    from torch.profiler import ProfilerActivity, profile

    free_memory()
    dec = synthetic_decoder(model, batch, entries, room=16)
    dec.use_graph = False
    tok = torch.randint(0, VOCAB, (batch,), device="cuda")
    for _ in range(3):
        dec.step(tok)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.step(tok)
        torch.cuda.synchronize()
    groups: dict[str, list[float]] = {}
    others: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name.lower()
        kind = ("matmul" if any(k in name for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk"))
                else "attention" if any(k in name for k in ("attention", "fmha", "flash", "varlen", "decode"))
                else "other")
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        groups.setdefault(kind, []).append(us)
        if kind == "other":
            others.setdefault(ev.name[:90], []).append(us)
    row = {"section": "profile", "fused_ops": fusion.mode(), "fused": dec.fused, "batch": batch,
           "entries_per_head": entries}
    for kind, times in groups.items():
        row[f"{kind}_kernels"] = len(times)
        row[f"{kind}_ms"] = round(sum(times) / 1e3, 3)
    matmul_ms = row.get("matmul_ms", 0)
    if matmul_ms:
        row["matmul_tb_s"] = round(weight_bytes(model) / (matmul_ms / 1e3) / 1e12, 3)
    row["kernel_ms_total"] = round(sum(sum(t) for t in groups.values()) / 1e3, 3)
    top = sorted(others.items(), key=lambda kv: -sum(kv[1]))[:12]
    row["top_other"] = [[name, len(t), round(sum(t) / 1e3, 3)] for name, t in top]  # name, count, ms
    emit(row)
    del dec
    free_memory()


def load(name: str):
    """The model measured: the 8B shape with random weights, or the real embedded default model
    (SmolLM2-135M, bf16) as a sanity row: real weights, real tokenizer vocabulary."""
    global VOCAB
    if name == "llama8b":
        return build()
    model, _ = kb.load_model(device="cuda", dtype=torch.bfloat16)
    VOCAB = model.config.vocab_size
    return model


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="bw,baseline,budget,offload,profile,batch")
    parser.add_argument("--contexts", default="8192,32768,131072")
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--policies", default="snapkv")
    parser.add_argument("--batch-engines", default="all",
                        help="batch section rows whose name contains one of these (comma-separated), e.g. kivi,full)")
    parser.add_argument("--model", choices=("llama8b", "default"), default="llama8b",
                        help="llama8b: the random-weight 8B shape; default: the real embedded model (sanity row)")
    args = parser.parse_args()
    OUT = Path(args.out)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("")
    sections = args.sections.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    bw = bandwidth() if "bw" in sections else 3.0e12
    model = load(args.model)
    emit({"section": "model", "model": args.model, "weights_gb": round(sum(p.nbytes for p in model.parameters()) / GB, 3),
          "weights_read_per_step_gb": round(weight_bytes(model) / GB, 3), "attention_backend": kstatic.ATTENTION})
    jobs = []
    if "baseline" in sections:
        jobs += [(baseline, (model, c, bw)) for c in contexts]
    if "budget" in sections:
        for policy in args.policies.split(","):
            for budget in (int(b) for b in args.budgets.split(",")):
                jobs += [(budgeted, (model, policy, budget, c, bw)) for c in contexts]
    if "profile" in sections:
        jobs.append((profile_section, (model, bw)))
    if "offload" in sections:
        jobs.append((offload_section, (model,)))
    if "batch" in sections:
        jobs.append((batch_section, (model, bw, 32768, 2048, args.batch_engines)))
    for fn, fargs in jobs:
        try:
            fn(*fargs)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            emit({"section": fn.__name__, "args": [str(a) for a in fargs[1:]], "error": repr(exc)[:500]})
            free_memory()
    print("\nsummary")
    for r in ROWS:
        print({k: v for k, v in r.items() if k not in ("device", "torch")})


if __name__ == "__main__":
    main()
