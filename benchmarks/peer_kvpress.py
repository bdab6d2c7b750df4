"""kvbudget and NVIDIA's kvpress side by side: same model, tasks, budgets; accuracy, bytes, time.

kvpress (PyPI ``kvpress``, the optional extra ``[peer]``) needs transformers < 5.3 while kvbudget
runs on the newest, so the two sides run in two interpreters: this script runs kvbudget itself
and kvpress in ``--peer-python`` (a virtual environment with the extra installed), which it
calls with ``--side kvpress`` and reads back as JSON. Setup (once)::

    python -m venv --system-site-packages /tmp/peer-venv     # reuses this torch
    /tmp/peer-venv/bin/pip install kvpress==0.5.5 'transformers>=5.2,<5.3'

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/peer_kvpress.py --peer-python /tmp/peer-venv/bin/python \\
        --tasks needle,kv --n 1 --length 600 --budget 64,128,256 --out benchmarks/results/peer-kvpress.json

Both sides answer every question of a context from the same compressed context (kvpress's
pipeline with ``questions=[...]`` is our ``multi-request`` mode) with greedy decoding. A token
budget B becomes kvpress's ``compression_ratio = 1 - B / context_tokens``. Bytes are what each
cache holds after the context: kvpress's DynamicCache K/V tensors; ours K, V and positions.
Scoring is ours for both sides (``kvbudget.eval.metrics.score``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# Method names shared by both libraries -> kvpress press factories (built in the kvpress process).
METHODS = ("snapkv", "streaming", "knorm", "tova", "pyramidkv", "keydiff", "adakv")
# Also shared (`--methods`); FINCH (a delimiter token added to the model) and SimLayerKV (no
# compression ratio: lazy layers keep a fixed recent window) take no budget in kvpress, nor does
# DuoAttention (a share of streaming heads; its on-the-fly pattern downloads BookSum samples); its
# CAMPress compresses only while decoding (to a fixed size), not the context.
MORE_METHODS = ("expected-attention", "criticalkv", "criticaladakv", "chunkkv", "chunkkv-entropy", "compactor",
                "curdkv", "lagkv", "capkv", "snapkv+merge")


# --------------------------------------------------------------------------- kvpress side


def _press(name: str, ratio: float):
    import kvpress as kp

    simple = {"snapkv": kp.SnapKVPress, "streaming": kp.StreamingLLMPress, "knorm": kp.KnormPress,
              "tova": kp.TOVAPress, "pyramidkv": kp.PyramidKVPress, "keydiff": kp.KeyDiffPress}
    simple |= {"expected-attention": kp.ExpectedAttentionPress, "compactor": kp.CompactorPress,
               "curdkv": kp.CURPress, "lagkv": kp.LagKVPress, "capkv": kp.CapPress}
    wrappers = {"adakv": kp.AdaKVPress, "criticalkv": kp.CriticalKVPress, "criticaladakv": kp.CriticalAdaKVPress,
                "chunkkv": kp.ChunkKVPress, "chunkkv-entropy": kp.EntropyGatedChunkKVPress}
    if name == "snapkv+merge":
        return kp.MergingPress(press=kp.SnapKVPress(compression_ratio=ratio))
    if name in wrappers:  # over SnapKV's scores, as ours
        return wrappers[name](kp.SnapKVPress(compression_ratio=ratio))
    return simple[name](compression_ratio=ratio)


def _kvpress_side(spec: dict) -> dict:
    """Run kvpress on every (method, budget) and task; runs in the peer interpreter."""
    import torch
    import transformers
    from kvpress import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=tok)
    rows = []
    for cell in spec["cells"]:
        for task in spec["tasks"]:
            context_ids = pipe.preprocess(task["context"], [q["question"] for q in task["questions"]], "", 10**6)["context_ids"]
            n = context_ids.shape[1]
            budget = cell["budget"]
            ratio = 0.0 if budget is None else max(0.0, 1 - budget / n)
            press = None if cell["method"] == "full" else _press(cell["method"], ratio)
            cache = DynamicCache()
            start = time.perf_counter()
            out = pipe(task["context"], questions=[q["question"] for q in task["questions"]], press=press,
                       cache=cache, max_new_tokens=spec["max_new_tokens"])
            seconds = time.perf_counter() - start
            # After the pipeline the cache holds the compressed context again (answers removed).
            held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            for i, answer in enumerate(out["answers"]):
                rows.append({"method": cell["method"], "budget": budget, "task": task["id"], "question_index": i,
                             "prediction": answer.strip(), "kv_bytes": held, "seconds": seconds / len(out["answers"]),
                             "context_tokens": n, "ratio": ratio})
    return {"rows": rows, "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                                       "kvpress": _version("kvpress")}}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# --------------------------------------------------------------------------- kvbudget side


def _kvbudget_side(model, tok, tasks, cells: list[dict], max_new_tokens: int, block_size: int) -> list[dict]:
    from kvbudget.eval.runner import EvalConfig, run_task

    rows = []
    for cell in cells:
        cfg = EvalConfig(policies=[cell["method"]], budgets=[], block_size=block_size, max_new_tokens=max_new_tokens,
                         mode="multi-request")
        budget = None if cell["budget"] is None else str(cell["budget"])
        for task in tasks:
            start = time.perf_counter()
            got = run_task(model, tok, task, cell["method"], budget, cfg)
            seconds = time.perf_counter() - start
            for r in got:
                rows.append({"method": cell["method"], "budget": cell["budget"], "task": task.id,
                             "question_index": r["question_index"], "prediction": r["prediction"],
                             "kv_bytes": r["kv_bytes"], "seconds": seconds / len(got),
                             "context_tokens": r["context_tokens"]})
    return rows


def _table(tasks, sides: dict[str, list[dict]], cells: list[dict]) -> list[dict]:
    from kvbudget.eval.metrics import score

    questions = {(t.id, i): q for t in tasks for i, q in enumerate(t.questions)}
    out = []
    for cell in cells:
        line = {"method": cell["method"], "budget": cell["budget"]}
        for side, rows in sides.items():
            rs = [r for r in rows if r["method"] == cell["method"] and r["budget"] == cell["budget"]]
            scores = [score(r["prediction"], questions[(r["task"], r["question_index"])].answers,
                            questions[(r["task"], r["question_index"])].metric) for r in rs]
            per_task = {r["task"]: r["kv_bytes"] for r in rs}
            line[side] = {"accuracy": sum(scores) / len(scores) if scores else None,
                          "kv_mb": sum(per_task.values()) / len(per_task) / 1e6 if per_task else None,
                          "seconds": sum(r["seconds"] for r in rs)}
        out.append(line)
    return out


def _print(table: list[dict], sides: list[str]) -> None:
    head = f"{'method':<11}{'budget':>7}" + "".join(f"{s + ' acc':>14}{'KV MB':>8}{'s':>7}" for s in sides)
    print(head)
    print("-" * len(head))
    for line in table:
        cells = "".join(
            f"{line[s]['accuracy']:>14.2f}{line[s]['kv_mb']:>8.2f}{line[s]['seconds']:>7.1f}" if line[s]["accuracy"] is not None
            else f"{'-':>14}{'-':>8}{'-':>7}" for s in sides)
        print(f"{line['method']:<11}{line['budget'] or '-'!s:>7}{cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=["both", "kvpress"], default="both", help=argparse.SUPPRESS)
    p.add_argument("--peer-python", default="/tmp/peer-venv/bin/python", help="interpreter with kvpress installed")
    p.add_argument("--tasks", default="needle,kv", help="built-in generators (comma list)")
    p.add_argument("--n", type=int, default=1, help="contexts per generator")
    p.add_argument("--length", type=int, default=600, help="context length in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", default="64,128,256", help="token budgets (comma list)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS + MORE_METHODS)}")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--block-size", default="128", help="our prefill block size(s), comma list; each is one kvbudget column")
    p.add_argument("--out", default=None, help="write the rows and the table as JSON here")
    args = p.parse_args(argv)
    if args.side == "kvpress":  # worker: spec on stdin, result on stdout
        print(json.dumps(_kvpress_side(json.load(sys.stdin))))
        return 0

    import kvbudget as kb
    from kvbudget.eval.generators import make_tasks
    from kvbudget.eval.taskfile import task_to_dict

    unknown = set(args.methods.split(",")) - set(METHODS + MORE_METHODS)
    if unknown:
        print(f"peer_kvpress: error: not shared with kvpress: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    model, tok = kb.load_model()
    tasks = [t for i, name in enumerate(args.tasks.split(",")) for t in make_tasks(name, tok, args.n, args.length, args.seed + i)]
    budgets = [int(b) for b in args.budget.split(",")]
    cells = [{"method": "full", "budget": None}] + [
        {"method": m, "budget": b} for m in args.methods.split(",") for b in budgets]
    model_dir = str(Path(model.name_or_path))
    spec = {"model_dir": model_dir, "tasks": [task_to_dict(t) for t in tasks], "cells": cells,
            "max_new_tokens": args.max_new_tokens}
    start = time.perf_counter()
    proc = subprocess.run([args.peer_python, __file__, "--side", "kvpress"], input=json.dumps(spec),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"peer_kvpress: error: kvpress side failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return 2
    peer = json.loads(proc.stdout.strip().splitlines()[-1])
    peer_s = time.perf_counter() - start
    sides = {"kvpress": peer["rows"]}
    for bs in args.block_size.split(","):
        sides[f"ours b{bs}"] = _kvbudget_side(model, tok, tasks, cells, args.max_new_tokens, int(bs))
    table = _table(tasks, sides, cells)
    print(f"model {model_dir}; {len(tasks)} contexts, {sum(len(t.questions) for t in tasks)} questions, "
          f"~{args.length} tokens; kvpress {peer['versions']['kvpress']} on transformers "
          f"{peer['versions']['transformers']} ({peer_s:.0f} s); multi-request mode; CPU")
    _print(table, list(sides))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "versions": peer["versions"], "table": table,
                                              "rows": sides}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
