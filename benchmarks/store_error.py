"""How far each store's attention output is from full precision, on the default model.

For every budgeted layer, the last ``--probe`` context tokens' queries (from the full-cache run)
attend over the full cache and over the store's cache; the relative L2 error of the outputs is
averaged over layers (`kvbudget.eval.fidelity.attention_error`). Also prints bytes held and the
compression in bytes. Context: a seeded `needle` task of ``--length`` tokens.

    python benchmarks/store_error.py --length 1000 --out benchmarks/results/store-error-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import kvbudget as kb
from kvbudget.eval.fidelity import attention_error
from kvbudget.eval.generators import make_tasks

STORES = ["kivi4", "kivi2", "rotate4", "rotate2", "think", "mikv", "snapkv+kivi4", "snapkv+kivi2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1000)
    parser.add_argument("--budget", default="4x", help="for policies that evict or demote")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--policies", default=",".join(STORES))
    parser.add_argument("--out")
    args = parser.parse_args()
    model, tok = kb.load_model()
    task = make_tasks("needle", tok, n=1, length=args.length, seed=0)[0]
    ids = tok(task.context, return_tensors="pt").input_ids
    full = kb.policy("full")
    full_cache = full.new_cache(model)
    kb.prefill(model, full_cache, full, ids, args.block_size)
    rows = []
    print(f"context {ids.shape[1]} tokens, full cache {full_cache.nbytes() / 2**20:.2f} MiB")
    print(f"{'policy':16s} {'mean err':>9s} {'max err':>9s} {'MiB':>7s} {'compr':>6s}")
    for name in args.policies.split(","):
        policy = kb.policy(name, budget=args.budget)
        errors = attention_error(model, ids, policy, args.block_size)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, ids, args.block_size)
        row = {
            "policy": name,
            "mean_error": statistics.mean(errors),
            "max_error": max(errors),
            "kv_bytes": cache.nbytes(),
            "compression": full_cache.nbytes() / cache.nbytes(),
            "per_layer": errors,
        }
        rows.append(row)
        print(f"{name:16s} {row['mean_error']:9.4f} {row['max_error']:9.4f} {row['kv_bytes'] / 2**20:7.2f} {row['compression']:6.2f}")
    if args.out:
        env = {"context_tokens": ids.shape[1], "torch": torch.__version__, "threads": torch.get_num_threads()}
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
