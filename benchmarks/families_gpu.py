"""Model families on the GPU: 8B-class shapes at 32k context, kvbudget (budget 2048) beside plain
transformers in the same run.

Each family's model is built from its published shape (random bf16 weights, on the GPU; speed
and memory do not depend on the weight values) with plain transformers. For each one:

* kvbudget: SnapKV at a 2048-token budget, block-wise prefill (block 2048) of a 32k context:
  prefill seconds, peak GPU memory, KV bytes held; then decode ms/token with static buffers and
  one CUDA graph per step (`Session`'s default on CUDA), and eagerly;
* plain transformers: the same context prefilled by the model with its own `DynamicCache` (one
  forward; models whose attention runs eagerly, Gemma 2's softcapping, in chunks of 2048, since
  a one-shot eager prefill materialises a 32k x 32k matrix per head), peak memory, eager decode
  ms/token.

One JSON row per (family, engine) to ``--out``. Run on the GPU (repository root):
    PYTHONPATH=src python3 benchmarks/families_gpu.py --out $OUT/families_gpu.jsonl
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import kvbudget as kb
from kvbudget.runtime.modelcall import run
from kvbudget.runtime.decoder import StaticDecoder

GB = 1e9

SHAPES = {
    "Llama-3.1-8B": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}),
    "Qwen2.5-7B": Qwen2Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1000000.0, use_sliding_window=False),
    "Qwen3-8B": Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=1000000.0),
    "Mistral-7B-v0.1": MistralConfig(  # every layer a 4096-token sliding window
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096),
    "Gemma-2-9B": Gemma2Config(  # alternating 4096-token sliding windows, logit softcapping
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        max_position_embeddings=131072),
    "Phi-3-medium": Phi3Config(
        vocab_size=32064, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=10, max_position_embeddings=131072, sliding_window=None, pad_token_id=0),
}


def emit(out: Path, row: dict) -> None:
    row = {"device": torch.cuda.get_device_name(), "torch": torch.__version__} | row
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def build(config):
    config.dtype = torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def per_token_ms(step, n: int) -> float:
    step()  # warm-up (a graph's capture)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


@torch.inference_mode()
def transformers_row(model, ids: torch.Tensor, steps: int) -> dict:
    free()
    torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache(config=model.config)
    chunk = 2048 if model.config._attn_implementation == "eager" else ids.shape[1]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(0, ids.shape[1], chunk):
        out = run(model, cache, ids[:, s : s + chunk], logits_to_keep=1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated()
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)

    def step():
        nonlocal tok
        tok = run(model, cache, tok).logits[:, -1].argmax(-1, keepdim=True)

    ms = per_token_ms(step, steps)
    return {"engine": "transformers", "prefill_chunk": chunk, "prefill_s": round(prefill_s, 3),
            "peak_gb": round(peak / GB, 2), "kv_gb": round(kv / GB, 3), "decode_ms": round(ms, 2)}


@torch.inference_mode()
def kvbudget_row(model, ids: torch.Tensor, budget: int, steps: int) -> dict:
    free()
    torch.cuda.reset_peak_memory_stats()
    policy = kb.policy("snapkv", budget=budget)
    cache = policy.new_cache(model)
    logits, stats = kb.prefill(model, cache, policy, ids, 2048)
    peak = torch.cuda.max_memory_allocated()
    row = {"engine": f"kvbudget snapkv {budget}", "prefill_s": round(stats.seconds, 3),
           "compress_share": round(stats.compress_seconds / stats.seconds, 4), "peak_gb": round(peak / GB, 2),
           "kv_gb": round(cache.nbytes() / GB, 4),
           "entries_per_layer": max(layer.max_entries for layer in cache.layers)}
    tok = logits.argmax(-1, keepdim=True)
    with cache.scratch():
        def eager():
            nonlocal tok
            tok = run(model, cache, tok).logits[:, -1].argmax(-1, keepdim=True)

        row["eager_decode_ms"] = round(per_token_ms(eager, 16), 2)
    decoder = StaticDecoder.from_cache(model, cache, capacity=steps + 8)
    first = tok[:, 0]
    row["decode_ms"] = round(per_token_ms(lambda: decoder.step(first), steps), 3)
    decoder.release(cache)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--families", default=",".join(SHAPES))
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=64)
    args = parser.parse_args()
    out = Path(args.out)
    for family in args.families.split(","):
        try:
            model = build(SHAPES[family])
            ids = torch.randint(0, min(32000, model.config.vocab_size), (1, args.context), device="cuda")
            base = {"family": family, "context": args.context, "attn": model.config._attn_implementation,
                    "weights_gb": round(torch.cuda.memory_allocated() / GB, 2)}
            emit(out, base | transformers_row(model, ids, 16))
            emit(out, base | kvbudget_row(model, ids, args.budget, args.steps))
        except Exception as exc:  # noqa: BLE001 - one family's failure must not lose the others
            traceback.print_exc()
            emit(out, {"family": family, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            model = None
            free()


if __name__ == "__main__":
    main()
