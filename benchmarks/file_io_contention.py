"""How much session files read and written on I/O threads slow the model thread.

A server reads and writes session files on I/O threads while its model thread decodes
(`serve.saved`). The model thread's decode step is mostly Python (kernel launches on a GPU, the
layers' code on a CPU), so whatever an I/O thread does while holding the interpreter lock holds
the decoding up. This measures it on the CPU: one model thread steps a static slot batch
(`runtime.slots.SlotBatch`, 8 sessions of a 32-layer model, thin so that a step is Python-bound
like a GPU step) alone, then beside I/O threads that read or write, in a loop, a session file of
the 8B shape at a 2048 budget (32 layers x 8 KV heads x 2048 entries x 128, bf16, keys and
values: 256 MiB), through `runtime.sessionfile`'s own `read_session_file` / `write_file`.
Rows (jsonl): per load, the step's mean, median and longest wall time, and the files done.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/file_io_contention.py \
        --out benchmarks/results/file-io-contention-cpu.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvbudget as kb
from kvbudget.runtime.models import load_tokenizer
from kvbudget.runtime.sessionfile import read_session_file, write_file
from kvbudget.runtime.slots import SlotBatch

LOADS = {"alone": (), "one reader": ("read",), "one writer": ("write",), "a reader and a writer": ("read", "write")}


def slot_batch(sessions: int, steps: int) -> tuple[SlotBatch, list]:
    """A slot batch of ``sessions`` snapkv sessions (budget 128, ~400 tokens of context each) of
    a random 32-layer Llama (hidden 64), room for ``steps`` tokens per load."""
    torch.manual_seed(0)
    tok = load_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).eval()
    words = "harbour lighthouse ferry market net tide gull anchor sail rope island keeper " * 30
    batch = SlotBatch(model, graph=False)
    rows = []
    for i in range(sessions):
        session = kb.Session(model, tok, kb.policy("snapkv", budget="128"), block_size=128)
        session.add_context([{"role": "user", "content": words[i:]}])
        rows.append(batch.join(session.cache, steps * len(LOADS)))
    return batch, rows


def step_times(batch: SlotBatch, rows: list, steps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            start = time.perf_counter()
            batch.step(rows, [5] * len(rows))
            times.append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="decode steps timed per load")
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--out", default=None, help="append one JSON line per load here")
    args = p.parse_args()
    batch, rows = slot_batch(args.sessions, args.steps)
    tensors = {f"layers.{i}.{kv}": torch.randn(8, 2048, 128).to(torch.bfloat16) for i in range(32) for kv in "kv"}
    folder = Path(tempfile.mkdtemp())
    write_file(folder / "read.kvb", tensors, {})
    for load, kinds in LOADS.items():
        stop, files = threading.Event(), [0]

        def io(kind: str, i: int) -> None:
            while not stop.is_set():
                if kind == "read":
                    read_session_file(folder / "read.kvb")
                else:
                    write_file(folder / f"write{i}.kvb", tensors, {})
                files[0] += 1

        threads = [threading.Thread(target=io, args=(kind, i)) for i, kind in enumerate(kinds)]
        for t in threads:
            t.start()
        times = step_times(batch, rows, args.steps)
        stop.set()
        for t in threads:
            t.join()
        row = {"load": load, "steps": args.steps, "step_mean_ms": round(1000 * statistics.mean(times), 1),
               "step_p50_ms": round(1000 * statistics.median(times), 1), "step_max_ms": round(1000 * max(times), 1),
               "files": files[0]}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
