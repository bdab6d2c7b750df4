"""Compression overhead per policy: time spent scoring + evicting as a share of prefill.

Every policy prefills the same seeded random token ids block-wise (`kb.prefill`); the
prefill's own timers give total seconds and ``compress_seconds`` (scoring + eviction). Per
policy and context: one warm-up prefill, then ``--repeats`` timed ones, each on a fresh
cache; reported are median prefill and compress seconds, share = compress / prefill,
overhead vs full = prefill / prefill(full) - 1, KV bytes after prefill, peak cache bytes,
and on CUDA torch.cuda.max_memory_allocated. `full` is always run, first, as the reference.
Timings on a shared machine are noisy: compare ratios within one run.

Run (quick CPU check, then the GPU shape):
    OMP_NUM_THREADS=1 python benchmarks/policy_overhead.py --model tiny --device cpu \\
        --context 1024 --budget 256 --block-size 256 --policies all --out /tmp/ovh.jsonl
    python benchmarks/policy_overhead.py --model llama8b --device cuda --context 8192,32768 \\
        --budget 2048 --block-size 2048 --policies all --repeats 3 --out ovh-h100.jsonl
One JSON object per line goes to --out; a table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for gpu_bench.build
try:
    import kvbudget as kb
except ImportError:  # not installed: use this checkout's source
    sys.path.insert(0, str(HERE.parent / "src"))
    import kvbudget as kb


def load(name: str, device: str) -> torch.nn.Module:
    """The model to measure, eval mode, kvbudget's attention hook attached."""
    if name == "llama8b":
        if device != "cuda":
            sys.exit("--model llama8b needs --device cuda")
        from gpu_bench import build

        return build()
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        from kvbudget.kv.hook import attach

        cfg = LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=65536,
            attn_implementation="sdpa",
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval().to(device)
        attach(model)
        return model
    try:
        model, _ = kb.load_model(device=device)
    except (kb.KVBudgetError, ImportError) as exc:
        sys.exit(f"--model default: {exc} (or use --model tiny / llama8b)")
    return model


def policy_names(spec: str) -> list[str]:
    names = (
        [r["name"] for r in kb.list_policies()] if spec == "all" else spec.split(",")
    )
    return ["full"] + [n.strip() for n in names if n.strip() and n.strip() != "full"]


def git(*cmd: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(HERE), *cmd], check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.decode().strip()


def environment(device: str, model_name: str) -> dict:
    gpu = device == "cuda"
    return {
        "model": model_name,
        "device": torch.cuda.get_device_name() if gpu else platform.machine() + " cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def run_once(model, policy: kb.Policy, ids: torch.Tensor, block: int) -> dict:
    """One prefill on a fresh cache."""
    cuda = ids.device.type == "cuda"
    cache = policy.new_cache(model)
    cache.tokens = policy.resolve(cache, context_tokens=ids.shape[1])  # ratio budgets need the context
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, stats = kb.prefill(model, cache, policy, ids, block_size=block)
    if cuda:
        torch.cuda.synchronize()
    return {
        "prefill_s": stats.seconds,
        "compress_s": stats.compress_seconds,
        "wall_s": time.perf_counter() - t0,
        "kv_bytes": cache.nbytes(),
        "peak_bytes": cache.peak_bytes,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "budget_tokens": cache.tokens,
    }


def measure(model, policy: kb.Policy, ids: torch.Tensor, block: int, n: int) -> dict:
    """Warm-up, then ``n`` timed prefills: medians of the times, the last run's bytes."""
    run_once(model, policy, ids, block)
    runs = [run_once(model, policy, ids, block) for _ in range(n)]
    row = runs[-1] | {
        k: statistics.median(r[k] for r in runs)
        for k in ("prefill_s", "compress_s", "wall_s")
    }
    row["share"] = row["compress_s"] / row["prefill_s"]
    row["runs"] = [[round(r["prefill_s"], 5), round(r["compress_s"], 5)] for r in runs]
    return row


HEADER = "context policy           budget prefill_s   compr_s   share  vs_full"
HEADER += "   kv_MiB peak_MiB cuda_GiB"


def show(row: dict) -> str:
    start = f"{row['context']:>7} {row['policy']:<16}"
    if "error" in row:
        return f"{start} ERROR {row['error']}"
    vs_full = "-" if row["vs_full"] is None else f"{100 * row['vs_full']:+.1f}%"
    gpu = row["cuda_peak_bytes"]
    return (
        f"{start} {row['budget_tokens'] or '-':>6} {row['prefill_s']:9.3f} "
        f"{row['compress_s']:9.3f} {100 * row['share']:6.1f}% {vs_full:>8} "
        f"{row['kv_bytes'] / 2**20:8.2f} {row['peak_bytes'] / 2**20:8.2f} "
        + ("-" if gpu is None else f"{gpu / 2**30:8.2f}")
    )


def bench(model, args: argparse.Namespace, ids: torch.Tensor) -> list[dict]:
    """Every policy on one context; `full` first, so the others compare against it."""
    budget = int(args.budget) if args.budget.isdigit() else args.budget
    rows: list[dict] = []
    full_s = None
    for name in policy_names(args.policies):
        row = {"context": ids.shape[1], "policy": name, "budget": args.budget}
        row |= {"block_size": args.block_size, "repeats": args.repeats}
        try:
            policy = kb.policy(name, budget=budget)
        except (kb.KVBudgetError, TypeError) as exc:
            print(f"{row['context']:>7} {name:<16} skipped: {exc}")
            continue
        try:
            row |= measure(model, policy, ids, args.block_size, args.repeats)
        except Exception as exc:  # noqa: BLE001 - one broken policy must not lose the rest
            row["error"] = f"{type(exc).__name__}: {exc}"
        else:
            full_s = row["prefill_s"] if name == "full" else full_s
            row["vs_full"] = row["prefill_s"] / full_s - 1 if full_s else None
        print(show(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("default", "llama8b", "tiny"), default="default")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--context", default="2048", help="token counts, comma-separated")
    p.add_argument("--budget", default="512", help="tokens (512) or a ratio (4x)")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--policies", default="all", help="'all' or names, comma-separated")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    contexts = [int(c) for c in args.context.split(",")]
    model = load(args.model, args.device)
    env = environment(args.device, args.model) | {"seed": args.seed}
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(model.config.vocab_size, (1, max(contexts)), generator=gen)
    print(json.dumps(env))
    print(HEADER)
    failed = False
    with open(args.out, "w") as out:
        # Written per context: a long run cut short keeps what it measured.
        for context in contexts:
            rows = bench(model, args, ids[:, :context].to(args.device))
            out.writelines(json.dumps(row | env) + "\n" for row in rows)
            out.flush()
            failed |= any("error" in row for row in rows)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
