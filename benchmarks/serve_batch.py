"""Many conversations at once through `kvbudget serve`: batched decoding against one turn at a time.

For each mode, a server runs in a child process on 127.0.0.1 (a temporary session directory):
``batch`` (the batching engine, ``--max-batch`` turns decoded together) and ``serial``
(``--max-batch 1``: one turn at a time). Before the clock starts, the child seeds ``max(N)``
conversations of ``--context`` tokens each (one prefilled, saved under every id). For each level
N, N clients at once each send ``--turns`` follow-up turns of about ``--message-tokens`` tokens
to their own conversation (only the new message is sent), streamed, asking for ``--max-tokens``
tokens. Measured at the client: aggregate decode tokens/s (completion tokens of the level / its
wall time), time to first token p50/p99, inter-token latency p50/p99 (gaps between streamed
text events, which carry about one token each), the tail p50/p99 (from the last text event to
the response's end: the answer fed back and the session's file written, before the turn is
answered), and the same TTFT p50 over the turns after the first (their sessions resident; the
first turn reads each session's file). From the server's
/metrics: the mean decode batch, its decode rate (tokens of the batched decode steps / their wall
time: what the batch decodes while it decodes), where those steps' time goes (choosing tokens,
joining slots, the forwards, decode-time compressions; graph captures and slot growths within
them), the wall time spent feeding prompts and answers, the session files read and written
(count, and the I/O threads' seconds), the KV bytes held at most (under ``--memory``) and the GPU
memory allocated at most (weights, KV, slots and activations: against the card's).

Mode ``engine`` is the batching engine alone, in this process, on the same load: N sessions
forked from one seeded conversation (their snapshots on the device, as under the server), the
clients' turns submitted together, round by round, and `Engine.run`: no HTTP, no streaming, no
session files. Its tokens/s against the server's is what serving costs; its decode parts against
the static batch's are what scheduling and decode-time compression cost.

Mode ``static-batch`` (GPU) is the engine's own ceiling at the same N: one `StaticDecoder` over
N sequences holding ``--budget`` + one message of entries per head (random K/V), one CUDA graph
replay per token, no server, no scheduling (`gpu_bench.try_batch`): the server's batched decode
tokens/s against it is the share the serving path keeps.

With ``--anchor`` (GPU), the same load also runs on transformers' own continuous batching
(`model.generate_batch`, paged full cache) with as many conversations as fit in ``--memory`` at
full precision: that count and its decode tokens/s are reported beside ours.

The plot of every row of the ``--out`` file (throughput, TTFT and inter-token latency p50/p99
against N, per mode) is written beside it (.png); ``--plot FILE.jsonl`` redraws one.

CPU (the default model)::

    python benchmarks/serve_batch.py --sessions 1,4,16 --out benchmarks/results/serve-batch-cpu.jsonl

GPU, an 8B-shaped random bf16 model (docs/serving.md has the exact command).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from kvbudget.runtime.engine import DECODE_PARTS

PARTS = tuple(DECODE_PARTS)  # where a decode step's time goes (the server's decode_<part>_seconds)
SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("harbour lighthouse ferry market net tide gull anchor sail rope island keeper lantern storm shell "
         "reef pier dune bell map").split()


def build_model(name: str, device: str | None):
    """The embedded default model, an 8B-shaped random one (``random-8b``: Llama 3 8B's shapes,
    bf16, random weights, the default tokenizer), or a path."""
    import kvbudget as kb

    if name != "random-8b":
        return kb.load_model(None if name == "default" else name, device=device)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvbudget.runtime.models import load_tokenizer

    tok = load_tokenizer()  # the default model's tokenizer alone: the weights are random
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rope_theta=500000.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no float32 copy of 8B weights
    try:
        with torch.device(device or "cuda"):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: answers run to max_tokens
    return model, tok


def text_of(tok, n: int, seed: int) -> str:
    """About ``n`` tokens of plain words."""
    import random

    rng = random.Random(seed)
    words = []
    while len(tok(" ".join(words), add_special_tokens=False).input_ids) < n:
        words.extend(rng.choice(WORDS) for _ in range(max(1, (n - len(words)) // 2)))
    return " ".join(words)


def child(args) -> None:
    """The server process: build the model, seed the conversations, serve."""
    import uvicorn

    import kvbudget as kb
    from kvbudget.serve import Limits, ServeConfig, create_app, parse_memory
    from kvbudget.serve.sessionstore import SessionStore, Snapshot

    model, tok = build_model(args.model, args.device)
    config = ServeConfig(model_name="bench", store=Path(args.store), policies=[args.policy], budget=args.budget,
                         memory=parse_memory(args.memory), block_size=args.block_size,
                         max_batch=args.max_batch, max_tokens=args.max_tokens, default_max_tokens=args.max_tokens,
                         decode=args.decode, **({} if args.prefill_tokens is None else {"prefill_tokens": args.prefill_tokens}))
    # Limits sized for the load (not what is measured): every client queued, big session directories.
    config.limits = Limits(max_queue=4 * args.conversations + 8, request_timeout_s=3600.0,
                           max_request_tokens=max(8192, 4 * args.message_tokens), max_stored_bytes=2**50,
                           max_stored_bytes_per_key=2**50)
    session = kb.Session(model, tok, kb.policy(args.policy, budget=args.budget), block_size=args.block_size)
    session.add_context([{"role": "user", "content": text_of(tok, args.context, 0)},
                         {"role": "assistant", "content": "Noted."}])
    store, snapshot = SessionStore(config.store), Snapshot.of(session)
    for i in range(args.conversations):
        store.record("", f"conv-{i}", snapshot, store.write("", f"conv-{i}", snapshot))
    store.close()
    del session
    print(f"seeded {args.conversations} conversations of {args.context} tokens", file=sys.stderr, flush=True)
    uvicorn.run(create_app(model, tok, config), host="127.0.0.1", port=args.port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, mode: str, store: str, levels: list[int]) -> tuple[subprocess.Popen, str]:
    cmd = ["--store", store, "--max-batch", "1" if mode == "serial" else str(args.max_batch),
           "--conversations", str(max(levels))]
    for name in ("model", "device", "policy", "budget", "memory", "block_size", "max_tokens", "context",
                 "message_tokens", "decode", "prefill_tokens"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return launch(__file__, cmd, args.start_timeout)


LAUNCHED: list[subprocess.Popen] = []  # the servers `launch` started (`session_store` kills them when cut)


@contextmanager
def session_store(prefix: str) -> Iterator[str]:
    """A temporary session directory that goes with the run even where the run is cut (SIGTERM, as
    `timeout` sends): the servers launched are killed first, so that none writes into it as it
    goes (the store of 128 conversations of 32k holds tens of GB)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as store:
        def cut(signum, frame) -> None:
            for proc in LAUNCHED:
                proc.kill()
                proc.wait()
            shutil.rmtree(store, ignore_errors=True)
            os._exit(128 + signum)

        previous = signal.signal(signal.SIGTERM, cut)
        try:
            yield store
        finally:
            signal.signal(signal.SIGTERM, previous)


def launch(script: str, child_args: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """``python SCRIPT child --port P CHILD_ARGS`` (a server on a free loopback port), once its
    /healthz answers: the process and its URL."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, script, "child", "--port", str(port), *child_args], env=env)
    LAUNCHED.append(proc)
    url = f"http://127.0.0.1:{port}"
    name = Path(script).stem
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name}: the server exited at startup")
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"{name}: the server did not start in {timeout} s")


def one_turn(http: httpx.Client, session_id: str, message: str, max_tokens: int) -> dict:
    """One streamed turn: latency, time to first token, the gaps between text events, prompt and
    completion tokens, and the turn's `kvbudget` block (bytes held, compression)."""
    start = time.perf_counter()
    times: list[float] = []
    usage, stats = None, None
    body = {"session_id": session_id, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": message}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
            usage, stats = event.get("usage", usage), event.get("kvbudget", stats)
    gaps = [b - a for a, b in zip(times, times[1:])]
    end = time.perf_counter()
    return {"latency": end - start, "ttft": times[0] - start if times else None, "gaps": gaps,
            "tail": end - times[-1] if times else None,
            "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"], "kvbudget": stats}


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=60).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def run_level(url: str, n: int, messages: list[str], args) -> dict:
    """N clients at once, ``args.turns`` turns each to conversations conv-0 .. conv-(N-1)."""
    before = metrics(url)
    results, errors, lock = [], [], threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=3600) as http:
            for t in range(args.turns):
                try:
                    r = one_turn(http, f"conv-{i}", messages[(i + t) % len(messages)], args.max_tokens)
                except (RuntimeError, httpx.HTTPError) as exc:
                    with lock:
                        errors.append(str(exc))
                    return
                with lock:
                    results.append({**r, "turn": t})

    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(client, range(n)))
    wall = time.perf_counter() - start
    after = metrics(url)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    later = [r["ttft"] for r in results if r["ttft"] is not None and r["turn"] > 0]
    gaps = [g for r in results for g in r["gaps"]]
    tails = [r["tail"] for r in results if r["tail"] is not None]
    delta = {name: after[f"kvbudget_{name}"] - before[f"kvbudget_{name}"]
             for name in ("decode_steps", "decode_batch_tokens", "decode_step_seconds", "feed_seconds",
                          "graph_captures", "graph_capture_seconds", "slot_regrow_seconds",
                          "decode_eager_tokens", "decode_slot_waits",
                          "session_loads_total", "session_load_seconds_total", "session_saves_total",
                          "session_save_seconds_total",
                          *(f"decode_{part}_seconds" for part in PARTS))}
    steps, batched = delta["decode_steps"], delta["decode_batch_tokens"]

    def ms(x):
        return None if x is None else round(1000 * x, 1)

    return {"sessions": n, "turns": len(results), "errors": len(errors), "wall_s": round(wall, 2),
            "decode_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": ms(percentile(ttft, 50)), "ttft_p99_ms": ms(percentile(ttft, 99)),
            "ttft_resident_p50_ms": ms(percentile(later, 50)),
            "itl_p50_ms": ms(percentile(gaps, 50)), "itl_p99_ms": ms(percentile(gaps, 99)),
            "tail_p50_ms": ms(percentile(tails, 50)), "tail_p99_ms": ms(percentile(tails, 99)),
            "mean_batch": round(batched / steps, 2) if steps else None,
            "decode_rate_tok_s": round(batched / delta["decode_step_seconds"], 1) if steps else None,
            "decode_step_s": round(delta["decode_step_seconds"], 2), "feed_s": round(delta["feed_seconds"], 2),
            "graph_captures": int(delta["graph_captures"]), "capture_s": round(delta["graph_capture_seconds"], 2),
            "regrow_s": round(delta["slot_regrow_seconds"], 2),
            "eager_tokens": int(delta["decode_eager_tokens"]), "slot_waits": int(delta["decode_slot_waits"]),
            "loads": int(delta["session_loads_total"]), "load_s": round(delta["session_load_seconds_total"], 2),
            "saves": int(delta["session_saves_total"]), "save_s": round(delta["session_save_seconds_total"], 2),
            **{f"{part}_s": round(delta[f"decode_{part}_seconds"], 2) for part in PARTS},
            "kv_bytes_peak": after["kvbudget_kv_bytes_peak"], "device_bytes_peak": after.get("kvbudget_device_bytes_peak"),
            "evictions": after["kvbudget_evictions_total"] - before["kvbudget_evictions_total"],
            "first_error": errors[0] if errors else None}


def cb_settings(**settings) -> dict:
    """``settings`` as this transformers' `ContinuousBatchingConfig` names them: releases before
    ``page_size`` call a page a block (``block_size``); a setting it does not have is left out."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    known = inspect.signature(ContinuousBatchingConfig.__init__).parameters
    if "page_size" not in known:
        settings["block_size"] = settings.pop("page_size")
    return {k: v for k, v in settings.items() if k in known}


def anchor(args, messages: list[str]) -> Iterator[dict]:
    """transformers' continuous batching (`generate_batch`, paged full cache) in this process,
    with as many conversations as its cache holds at full precision (each of ``--context`` + one
    message + the answer). The cache gets ``--memory`` of KV pages, or as many as transformers
    accepts below that (it also reserves room for its activations)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from kvbudget.serve import parse_memory

    model, tok = build_model(args.model, args.device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    token_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * model.dtype.itemsize
    gen = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=None)

    def batching(pages: int) -> ContinuousBatchingConfig:
        # Pages of 256 tokens of every layer; no prefix sharing (the conversations here share
        # their context, real ones do not).
        return ContinuousBatchingConfig(**cb_settings(page_size=256, num_blocks=pages, max_batch_tokens=args.prefill_tokens_hf,
                                                      allow_block_sharing=False))

    pages = max(1, parse_memory(args.memory) // (256 * token_bytes))
    while True:  # a one-token request with the cache allocated: the most pages transformers accepts
        try:
            model.generate_batch(inputs=[[1]], generation_config=GenerationConfig(max_new_tokens=1, do_sample=False),
                                 continuous_batching_config=batching(pages))
            break
        except MemoryError:
            if pages == 1:
                raise
            pages = max(1, int(pages * 0.95))
    per_conv = args.context + args.message_tokens * 2 + args.max_tokens
    fit = max(1, pages * 256 // per_conv)
    context = text_of(tok, args.context, 0)
    for m in sorted({min(n, fit) for n in args.levels}):
        n = max(x for x in args.levels if min(x, fit) == m)
        prompts = [tok(context + " " + messages[i % len(messages)],
                       add_special_tokens=False).input_ids for i in range(m)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=batching(pages))
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        tokens = sum(len(o.generated_tokens) for o in out.values())
        yield {"mode": "transformers-generate_batch", "sessions": n, "kv_bytes": pages * 256 * token_bytes,
               "conversations_that_fit": fit, "ran": m, "wall_s": round(wall, 2), "decode_tokens": tokens,
               "tokens_per_s": round(tokens / wall, 2), "note": "the prefill of every whole conversation included"}


def engine_levels(args, messages: list[str]) -> Iterator[dict]:
    """The batching engine alone at each N (mode ``engine``): ``args.turns`` rounds of N turns
    submitted together, each round run to its end."""
    import torch

    import kvbudget as kb

    model, tok = build_model(args.model, args.device)
    seed = kb.Session(model, tok, kb.policy(args.policy, budget=args.budget), block_size=args.block_size)
    seed.add_context([{"role": "user", "content": text_of(tok, args.context, 0)},
                      {"role": "assistant", "content": "Noted."}])
    for n in args.levels:
        sessions = [seed.fork() for _ in range(n)]
        for session in sessions:
            session.cache.host_snapshots = False  # as under the server (`serve.manager`)
        engine = kb.Engine(model, tok, max_batch=args.max_batch, decode=args.decode,
                           **({} if args.prefill_tokens is None else {"prefill_tokens": args.prefill_tokens}))
        start, tokens = time.perf_counter(), 0
        for t in range(args.turns):
            turns = [engine.submit(s, messages[(i + t) % len(messages)], args.max_tokens) for i, s in enumerate(sessions)]
            engine.run()
            tokens += sum(len(turn.result().token_ids) for turn in turns)
        wall = time.perf_counter() - start
        counters = engine.slot_counters()
        yield {"mode": "engine", "sessions": n, "wall_s": round(wall, 2), "decode_tokens": tokens,
               "tokens_per_s": round(tokens / wall, 2),
               "mean_batch": round(engine.decoded_tokens / engine.decode_steps, 2),
               "decode_rate_tok_s": round(engine.decoded_tokens / engine.decode_seconds, 1),
               "decode_step_s": round(engine.decode_seconds, 2), "feed_s": round(engine.feed_seconds, 2),
               "graph_captures": int(counters["captures"]), "capture_s": round(counters["capture_seconds"], 2),
               "regrow_s": round(counters["regrow_seconds"], 2),
               **{f"{part}_s": round(seconds, 2) for part, seconds in engine.decode_parts.items()}}
        del sessions, engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    del seed, model


def static_batch(args, levels: list[int]) -> Iterator[dict]:
    """The engine's static-batch figure at each N: decode tokens/s of one `StaticDecoder` over N
    sequences of ``--budget`` + one message of entries per head (one graph replay per token)."""
    import torch
    from gpu_bench import try_batch  # benchmarks/ is this script's directory

    from kvbudget.compress.budget import parse_budget
    from kvbudget.kv.hook import attach

    model, _ = build_model(args.model, args.device)
    attach(model)
    entries = int(parse_budget(args.budget).tokens) + args.message_tokens
    for n in levels:
        ms = try_batch(model, n, entries, steps=32)
        yield {"mode": "static-batch", "sessions": n, "entries_per_head": entries,
               "ms_per_step": None if ms is None else round(ms, 3),
               "tokens_per_s": None if ms is None else round(n * 1000 / ms, 1),
               "note": "one StaticDecoder, N sequences, random K/V: no server" if ms is not None else "out of memory"}
    del model
    torch.cuda.empty_cache()


def plot(rows: list[dict], path: Path) -> None:
    """Decode tokens/s, time to first token and inter-token latency (p50 solid, p99 dashed)
    against N, per mode, on log scales; the static batch and transformers' generate_batch on the throughput
    panel where they ran."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4))
    panels = fig.subplots(1, 3)
    names = {"batch": "batched", "serial": "one at a time", "engine": "the engine alone (no server)",
             "static-batch": "engine's static batch (no server)",
             "transformers-generate_batch": "transformers generate_batch"}
    for mode, label in names.items():
        # (a level whose every turn failed has no tokens: its error is in the row, not on a log scale)
        mine = sorted((r for r in rows if r.get("mode") == mode and r.get("tokens_per_s")), key=lambda r: r["sessions"])
        if not mine:
            continue
        n = [r["sessions"] for r in mine]
        line = panels[0].plot(n, [r["tokens_per_s"] for r in mine], marker="o", label=label)[0]
        for ax, key in zip(panels[1:], ("ttft", "itl")):
            if mine[0].get(f"{key}_p50_ms") is not None:
                ax.plot(n, [r[f"{key}_p50_ms"] for r in mine], marker="o", color=line.get_color(), label=f"{label} p50")
                ax.plot(n, [r[f"{key}_p99_ms"] for r in mine], marker="x", ls="--", color=line.get_color(),
                        label=f"{label} p99")
    levels = sorted({r["sessions"] for r in rows if "sessions" in r})
    for ax, ylabel in zip(panels, ("decode tokens/s (all sessions)", "time to first token (ms)",
                                   "inter-token latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_xlabel("concurrent conversations (N)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:  # log: transformers' generate_batch and the static batch lie orders of magnitude apart
            ax.legend(fontsize=7)
            ax.set_yscale("log")
    first = next((r for r in rows if "context" in r), {})
    fig.suptitle(f"{path.stem}: model {first.get('model')}, {first.get('policy')} budget {first.get('budget')}, "
                 f"context {first.get('context')}, {first.get('max_tokens')} tokens per answer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def server_arguments(p: argparse.ArgumentParser, budget: str, memory: str, block_size: int) -> None:
    """The model and the server's policy, budget, memory bound and block size (with this
    benchmark's defaults)."""
    p.add_argument("--model", default="default", help="default (embedded), random-8b, or a path")
    p.add_argument("--device", default=None)
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--budget", default=budget)
    p.add_argument("--memory", default=memory, help="the server's --memory (serve_batch: also the anchor's KV memory)")
    p.add_argument("--block-size", type=int, default=block_size)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    server_arguments(p, budget="64", memory="1GiB", block_size=64)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--context", type=int, default=256, help="tokens of each conversation before the clock starts")
    p.add_argument("--message-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--turns", type=int, default=2, help="follow-up turns per conversation and level")
    p.add_argument("--sessions", default="1,4,16", help="comma list of concurrent conversations (N)")
    p.add_argument("--modes", default="batch,serial",
                   help="batch, serial (--max-batch 1), engine (the engine alone, in process), static-batch (GPU: "
                   "the engine's static batch), or none")
    p.add_argument("--decode", default="auto", help="the server's --decode (auto: graph slots on CUDA)")
    p.add_argument("--prefill-tokens", type=int, default=None, help="the server's --prefill-tokens (default: its own)")
    p.add_argument("--serial-sessions", default=None, help="levels of the serial mode (default: --sessions)")
    p.add_argument("--anchor", action="store_true", help="also transformers' generate_batch (GPU)")
    p.add_argument("--prefill-tokens-hf", type=int, default=8192, help="generate_batch's max_batch_tokens")
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--out", default=None, help="append one JSON line per mode and level here; the plot of all "
                   "the file's rows goes beside it (.png)")
    p.add_argument("--plot", default=None, help="only plot the rows of this file (written by --out)")
    if argv and argv[0] == "child":
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--store", required=True)
        p.add_argument("--conversations", type=int, required=True)
        child(p.parse_args(argv[1:]))
        return 0
    args = p.parse_args(argv)
    if args.plot:
        plot(read_rows(Path(args.plot)), Path(args.plot).with_suffix(".png"))
        return 0
    args.levels = [int(x) for x in args.sessions.split(",")]
    rows = []

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    from kvbudget.runtime.models import load_tokenizer

    tok = load_tokenizer(None if args.model in ("default", "random-8b") else args.model)
    messages = [text_of(tok, args.message_tokens, s) + " What do you make of that?" for s in range(1, 9)]
    print(f"model {args.model}, policy {args.policy}, budget {args.budget}, memory {args.memory}, context "
          f"{args.context}, {args.turns} turns of ~{args.message_tokens} tokens, max_tokens {args.max_tokens}", flush=True)
    modes = [m for m in args.modes.split(",") if m != "none"]
    for mode in [m for m in modes if m not in ("none", "engine", "static-batch")]:
        levels = [int(x) for x in args.serial_sessions.split(",")] if mode == "serial" and args.serial_sessions \
            else args.levels
        with session_store("kvbudget-batch-") as store:
            proc, url = start_server(args, mode, store, levels)
            try:
                for n in levels:
                    row = {"mode": mode, "model": args.model, "policy": args.policy, "budget": args.budget,
                           "context": args.context, "max_tokens": args.max_tokens, **run_level(url, n, messages, args)}
                    rows.append(row)
                    emit(row)
            finally:
                proc.terminate()
                proc.wait(120)
    if "engine" in modes:  # after the servers, in this process
        for row in engine_levels(args, messages):
            rows.append({"model": args.model, "policy": args.policy, "budget": args.budget, "context": args.context,
                         "max_tokens": args.max_tokens, **row})
            emit(rows[-1])
    if "static-batch" in modes:  # after the servers: what it leaves on the GPU is not theirs to lose
        for row in static_batch(args, args.levels):
            rows.append(row)
            emit(row)
    if args.anchor:
        try:
            for row in anchor(args, messages):
                emit(row)
        except Exception as exc:  # the anchor is another library's: its failure is a result, not a crash
            emit({"mode": "transformers-generate_batch", "error": f"{type(exc).__name__}: {exc}"})
    columns = {"tokens_per_s": "tok/s", "ttft_p50_ms": "TTFT p50", "ttft_p99_ms": "p99", "ttft_resident_p50_ms": "resident",
               "itl_p50_ms": "ITL p50", "itl_p99_ms": "p99", "tail_p50_ms": "tail p50", "mean_batch": "batch", "decode_rate_tok_s": "decode/s",
               "decode_step_s": "steps s", **{f"{part}_s": part for part in PARTS}, "capture_s": "capture",
               "regrow_s": "regrow"}
    print(f"\n{'mode':>8} {'N':>4} " + " ".join(f"{title:>9}" for title in columns.values()))
    for r in rows:
        if "mean_batch" in r:
            cells = ["-" if r.get(k) is None else r[k] for k in columns]
            print(f"{r['mode']:>8} {r['sessions']:>4} " + " ".join(f"{cell:>9}" for cell in cells))
    if args.out:
        plot(read_rows(Path(args.out)), Path(args.out).with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
