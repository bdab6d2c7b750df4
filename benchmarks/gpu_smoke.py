"""GPU smoke run of the foundation: correctness on CUDA and a first look at peak memory.

Random-weight model of the Llama-3.1-8B shape (32 layers, 32 query / 8 KV heads, head_dim 128,
bf16; speed does not depend on weight values). Checks that `full` equals the model's own greedy
generate on CUDA, then prefills 8k and 32k tokens block-wise with `full` and `snapkv` (budget
2048, block 2048) and reports peak GPU memory, prefill time and decode time per token.
One JSON line per measurement. Run: ``python benchmarks/gpu_smoke.py --out results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvbudget as kb
from kvbudget.attention import attach


def build(layers: int = 32, dtype: torch.dtype = torch.bfloat16) -> LlamaForCausalLM:
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


def check_full_equals_generate() -> dict:
    # float32 and 4 layers: bf16 rounding differs between block-wise and one-shot prefill.
    model = build(layers=4, dtype=torch.float32)
    ids = torch.randint(0, 128000, (1, 300), device="cuda")
    policy = kb.policy("full")
    cache = policy.new_cache(model)
    logits, _ = kb.prefill(model, cache, policy, ids, block_size=128)
    ours = []
    with torch.inference_mode():
        for _ in range(16):
            tok = logits.argmax(-1, keepdim=True)
            ours.append(int(tok))
            logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1]
        ref = model.generate(ids, max_new_tokens=16, do_sample=False)[0, 300:].tolist()
    del model
    return {"check": "full==generate", "equal": ours == ref, "ours": ours[:8], "ref": ref[:8]}


def measure(model, name: str, budget, context: int, block: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    policy = kb.policy(name, budget=budget, block_size=block)
    cache = policy.new_cache(model)
    ids = torch.randint(0, 128000, (1, context), device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits, stats = kb.prefill(model, cache, policy, ids, block_size=block)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    steps = 32
    with torch.inference_mode():
        tok = logits.argmax(-1, keepdim=True)
        for i in range(steps + 4):
            if i == 4:
                torch.cuda.synchronize()
                t1 = time.perf_counter()
            tok = model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
    decode_ms = (time.perf_counter() - t1) / steps * 1e3
    return {
        "policy": name, "budget": budget, "context": context, "block": block,
        "prefill_s": round(prefill_s, 3), "compress_share": round(stats.compress_seconds / prefill_s, 4),
        "peak_gb": round(peak / 1e9, 2), "weights_gb": round(base / 1e9, 2), "kv_gb": round(cache.nbytes() / 1e9, 3),
        "decode_ms_per_token": round(decode_ms, 2), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = [check_full_equals_generate()]
    torch.cuda.empty_cache()
    model = build()
    print(json.dumps(rows[-1]), flush=True)
    for context in (8192, 32768):
        for name, budget in (("full", None), ("snapkv", 2048)):
            rows.append(measure(model, name, budget, context, block=2048))
            print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
