"""Time to first token of a follow-up turn against the conversation's length, through `kvbudget serve`.

A follow-up turn feeds only its new message: the conversation so far is already in the session's
budgeted cache, so its time to first token should not grow with the conversation. Measured here
for a session loaded from the session directory (its first turn since the server started) and
for a resident one (its next turn).

The server runs in a child process on 127.0.0.1. Before it serves, the child grows one
conversation (user messages of plain words, at most 4000 tokens each, each answered "Noted.")
through every length of ``--lengths`` (tokens fed), saving it at each length under ``--reps``
ids. Then, for each repetition and each length, the client sends a ~``--message-tokens``-token
message to one saved copy twice, streamed: the first turn loads the session from disk (the
server's load counter must rise by one), the second finds it resident (it must not rise). Time
to first token is the client's time from sending the request to the first streamed text (the
file may still be in the OS page cache from the seeding: "from disk" is the server's load path,
not a cold disk). Rows (jsonl): per length and kind, the median, min and max over the
repetitions; then a summary with each kind's spread (largest median / smallest median - 1)
across lengths. A plot is written beside the rows.

CPU (the default model, 8192 positions)::

    python benchmarks/turn_ttft.py --lengths 1000,2000,4000,7800 --out benchmarks/results/turn-ttft-cpu.jsonl

GPU, an 8B-shaped random bf16 model: docs/serving.md has the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

from serve_batch import (build_model, launch, metrics, one_turn, percentile, read_rows, server_arguments, session_store,
                         text_of)

KINDS = ("disk", "resident")
MESSAGE_TOKENS = 4000  # the longest message of the seeded conversation


def child(args) -> None:
    """The server process: build the model, grow and save the conversation, serve."""
    import uvicorn

    import kvbudget as kb
    from kvbudget.serve import Limits, ServeConfig, create_app, parse_memory
    from kvbudget.serve.sessionstore import SessionStore, Snapshot

    model, tok = build_model(args.model, args.device)
    config = ServeConfig(model_name="bench", store=Path(args.store), policies=[args.policy], budget=args.budget,
                         memory=parse_memory(args.memory), block_size=args.block_size,
                         max_tokens=args.max_tokens, default_max_tokens=args.max_tokens)
    config.limits = Limits(max_queue=8, request_timeout_s=3600.0, max_request_tokens=max(8192, 4 * args.message_tokens),
                           max_stored_bytes=2**50, max_stored_bytes_per_key=2**50)
    session = kb.Session(model, tok, kb.policy(args.policy, budget=args.budget), block_size=args.block_size)
    store = SessionStore(config.store)
    for i, length in enumerate(int(x) for x in args.lengths.split(",")):
        start = time.perf_counter()
        while session.tokens_seen < length:
            # Messages of at most MESSAGE_TOKENS; the template and the answer take a few tokens more.
            need = min(MESSAGE_TOKENS, max(1, length - session.tokens_seen - 16))
            words = text_of(tok, need, 1000 * i + session.tokens_seen)
            session.add_context([{"role": "user", "content": words}, {"role": "assistant", "content": "Noted."}])
        snapshot = Snapshot.of(session)
        for r in range(args.reps):
            store.record("", f"len{length}-{r}", snapshot, store.write("", f"len{length}-{r}", snapshot))
        print(f"seeded {session.tokens_seen} tokens in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
    store.close()
    del session
    uvicorn.run(create_app(model, tok, config), host="127.0.0.1", port=args.port, log_level="warning")


def measure(url: str, args, message: str) -> list[dict]:
    """Two turns on each saved copy (from disk, then resident): one row per length and kind."""
    samples: dict[tuple[int, str], list[dict]] = {}
    lengths = [int(x) for x in args.lengths.split(",")]
    with httpx.Client(base_url=url, timeout=3600) as http:
        for r in range(args.reps):
            for length in lengths:
                sid = f"len{length}-{r}"
                seen = http.get(f"/v1/sessions/{sid}").json()["tokens_seen"]
                for kind in KINDS:
                    loads = metrics(url)["kvbudget_session_loads_total"]
                    turn = one_turn(http, sid, message, args.max_tokens)
                    loaded = metrics(url)["kvbudget_session_loads_total"] - loads
                    if loaded != (kind == "disk"):
                        raise RuntimeError(f"{sid}: the {kind} turn loaded {loaded} sessions from disk")
                    samples.setdefault((length, kind), []).append({**turn, "tokens_seen": seen})
    rows = []
    for (length, kind), runs in sorted(samples.items()):
        ttft = [1000 * s["ttft"] for s in runs]
        rows.append({"length": length, "kind": kind, "tokens_seen": min(s["tokens_seen"] for s in runs),
                     "prompt_tokens": runs[0]["prompt_tokens"], "reps": len(runs),
                     "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_min_ms": round(min(ttft), 1),
                     "ttft_max_ms": round(max(ttft), 1)})
    return rows


def summary(rows: list[dict]) -> dict:
    """Each kind's spread of the median across lengths: largest / smallest - 1."""
    out = {"summary": True}
    for kind in KINDS:
        p50 = [r["ttft_p50_ms"] for r in rows if r.get("kind") == kind]
        out[f"{kind}_spread"] = round(max(p50) / min(p50) - 1, 3)
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Time to first token (median, min-max bars) against the conversation's length, per kind."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for kind, label in zip(KINDS, ("loaded from disk", "resident")):
        mine = sorted((r for r in rows if r.get("kind") == kind), key=lambda r: r["tokens_seen"])
        x = [r["tokens_seen"] for r in mine]
        y = [r["ttft_p50_ms"] for r in mine]
        err = [[r["ttft_p50_ms"] - r["ttft_min_ms"] for r in mine], [r["ttft_max_ms"] - r["ttft_p50_ms"] for r in mine]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    seen = sorted({r["tokens_seen"] for r in rows if r.get("kind") == "disk"})
    ax.set_xticks(seen, [str(n) for n in seen])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("conversation length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    server_arguments(p, budget="256", memory="2GiB", block_size=256)
    p.add_argument("--lengths", default="1000,2000,4000,7800", help="conversation lengths (tokens), ascending")
    p.add_argument("--message-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="saved copies per length (each: one turn from disk, one resident)")
    p.add_argument("--start-timeout", type=float, default=1800, help="seconds for the child to seed and start")
    p.add_argument("--out", default=None, help="write the rows here (JSON lines) and the plot beside (.png)")
    p.add_argument("--plot", default=None, help="only plot the rows of this file (written by --out)")
    if argv and argv[0] == "child":
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--store", required=True)
        child(p.parse_args(argv[1:]))
        return 0
    args = p.parse_args(argv)
    if args.plot:
        rows = read_rows(Path(args.plot))
        plot([r for r in rows if "kind" in r], Path(args.plot).with_suffix(".png"), Path(args.plot).stem)
        return 0

    from kvbudget.runtime.models import load_tokenizer

    tok = load_tokenizer(None if args.model in ("default", "random-8b") else args.model)
    message = text_of(tok, args.message_tokens - 8, 1) + " What do you make of that?"
    on = f" on {args.device}" if args.device else ""
    head = (f"model {args.model}{on}, policy {args.policy}, budget {args.budget}, block {args.block_size}, "
            f"message ~{args.message_tokens} tokens, {args.reps} reps")
    print(head, flush=True)
    with session_store("kvbudget-ttft-") as store:
        child_args = ["--store", store]
        for name in ("model", "device", "policy", "budget", "memory", "block_size", "lengths", "message_tokens",
                     "max_tokens", "reps"):
            value = getattr(args, name)
            if value is not None:
                child_args += [f"--{name.replace('_', '-')}", str(value)]
        proc, url = launch(__file__, child_args, args.start_timeout)
        try:
            rows = measure(url, args, message)
        finally:
            proc.terminate()
            proc.wait(120)
    rows = [{"model": args.model, "policy": args.policy, "budget": args.budget, **r} for r in rows]
    rows.append(summary(rows))
    print(f"\n{'length':>8} {'kind':>9} {'prompt':>7} {'TTFT p50':>9} {'min':>8} {'max':>8}  (ms)")
    for r in rows[:-1]:
        print(f"{r['tokens_seen']:>8} {r['kind']:>9} {r['prompt_tokens']:>7} {r['ttft_p50_ms']:>9} "
              f"{r['ttft_min_ms']:>8} {r['ttft_max_ms']:>8}")
    print(json.dumps(rows[-1]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        plot(rows[:-1], out.with_suffix(".png"), head)
    return 0


if __name__ == "__main__":
    sys.exit(main())
