"""Full-cache accuracy of built-in task sets on a model: the calibration of specs/tasks.md.

Each question is asked alone on a copy of the full-cache context (multi-request mode), greedy.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/calibrate_tasks.py \\
        '[["prefix_suffix", 600, {}], ["multihop", 600, {"hops": 1}]]' --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import json
import time

import kvbudget as kb
from kvbudget.eval.generators import make_tasks
from kvbudget.eval.metrics import score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", help='JSON list of [generator, length, options], e.g. [["kv", 600, {"pairs": 5}]]')
    p.add_argument("--n", type=int, default=3, help="contexts per configuration")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args()
    model, tok = kb.load_model()
    for name, length, options in json.loads(args.configs):
        start, scores, examples = time.perf_counter(), [], []
        for task in make_tasks(name, tok, args.n, length, args.seed, **options):
            session = kb.Session(model, tok, "full")
            session.add_context(task.context)
            for q in task.questions:
                text = session.fork().ask(q.question, args.max_new_tokens)
                scores.append(score(text, q.answers, q.metric))
                examples.append((text[:100], q.answers[0]))
        print(f"{name} {length} {options}: full-cache accuracy {sum(scores) / len(scores):.2f} "
              f"({len(scores)} questions, {time.perf_counter() - start:.0f} s)")
        for text, gold in examples[:3]:
            print(f"    {text!r} <- gold {gold!r}")


if __name__ == "__main__":
    main()
