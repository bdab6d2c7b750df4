"""Pass-2 tile settings of the scoring kernels, A/B inside whole prefills (one process, one model).

`scoring_bench.py --sweep-reduce` times pass 2 alone on one layer's shape; this checks that a
setting it favours also shortens what the user sees: the compression share of a block-wise
prefill at 32k on the Llama-3.1-8B shape. For each round, for each setting: `TILES[mode]` of
`kvbudget.kernels.attn_scores` is set, then `policy_overhead.measure` runs (one warm-up, then
``--repeats`` prefills, medians). Settings interleave across rounds, so drift hits them alike.

    PYTHONPATH=src python3 benchmarks/score_tiles_ab.py --policy lazy --mode lazy \\
        --tiles "64,64,4,-,0;64,128,4,-,0;32,128,4,3,1" --rounds 2 --out tiles-lazy.jsonl

A setting is "block_m,block_n,num_warps,num_stages,query_axis" ("-": triton's default stages).
One JSON object per line (--out and stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from policy_overhead import environment, load, measure  # noqa: E402

import kvbudget as kb  # noqa: E402
from kvbudget.kernels import attn_scores  # noqa: E402


def parse(spec: str) -> attn_scores.Tiles:
    try:
        bm, bn, warps, stages, axis = spec.split(",")
        return attn_scores.Tiles(int(bm), int(bn), int(warps), None if stages == "-" else int(stages), int(axis))
    except ValueError:
        sys.exit(f"--tiles: '{spec}' is not block_m,block_n,num_warps,num_stages,query_axis ('-': default stages)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--policy", default="lazy")
    p.add_argument("--mode", default="lazy", choices=sorted(attn_scores.TILES))
    p.add_argument("--tiles", required=True, help="settings separated by ';' (see the top of this file)")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("score_tiles_ab needs CUDA")
    settings = [parse(s) for s in args.tiles.split(";")]  # checked before the model is built
    model = load("llama8b", "cuda")
    env = environment("cuda", "llama8b")
    ids = torch.randint(model.config.vocab_size, (1, args.context), generator=torch.Generator().manual_seed(0))
    ids = ids.to("cuda")
    with open(args.out, "w") as out:
        for r in range(args.rounds):
            for tiles in settings:
                attn_scores.TILES[args.mode] = tiles
                policy = kb.policy(args.policy, budget=args.budget, block_size=args.block_size)
                row = measure(model, policy, ids, args.block_size, args.repeats)
                keep = {k: row[k] for k in ("prefill_s", "compress_s", "share", "runs", "cuda_peak_bytes")}
                line = json.dumps({"round": r, "policy": args.policy, "mode": args.mode, "tiles": vars(tiles)}
                                  | keep | {"context": args.context} | env)
                print(line, flush=True)
                out.write(line + "\n")
                out.flush()


if __name__ == "__main__":
    main()
