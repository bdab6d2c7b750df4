"""Command line: kvbudget policies | tasks make | eval | bench | report | run | serve.

Bad input ends the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from .distributed import require_ray
from .distributed.replicas import serve_replicas
from .distributed.sweep import run_eval_ray
from .errors import KVBudgetError
from .eval.generators import make_tasks
from .eval.loaders.registry import load_tasks
from .eval.report import best_lines, environment, write_report
from .eval.ruler import make_ruler
from .eval.runner import EvalConfig, check_names, format_table, run_eval
from .eval.taskfile import write_tasks
from .fileio import atomic_write_text
from .methods import describe, make_policy
from .runtime.engine import MAX_BATCH, PREFILL_TOKENS
from .runtime.models import DEFAULT_MODEL, cache_dir, load_model, load_tokenizer
from .runtime.prefill import BLOCK_SIZE
from .runtime.profile import profile, save_profile
from .runtime.session import Session
from .serve import Limits, ServeConfig, parse_duration, parse_memory, serve
from .serve.keys import check_key, read_key_file

# The bench's two grids, each a list of (policies, budgets) products run in one sweep over the same
# tasks (the rows they share are equal); a store alone (kivi4) has no budget: one point, its own
# compression. The quick one, the default: quality per byte — the classic baselines, KVzip and
# EpiCache at 8x, KVzip over a 4-bit store at 4x, 8x and 16x, the 4-bit store alone — in about
# 480 s of CPU on the default model (docs/benchmarks.md). The 2-bit stores are left to the whole
# one (`--full`): the eight first eviction policies at 2x, 4x and 8x, KVzip, EpiCache and the
# store combinations at 4x, 8x and 16x, and the stores alone.
Grid = list[tuple[list[str], list[str]]]
QUICK_NOTE = (" The 2-bit stores (kivi2, kvzip+kivi2) are left to `kvbudget bench --full`: at the same bytes "
              "they keep less than the 4-bit one (docs/benchmarks.md).")
BENCH_QUICK: Grid = [
    (["streaming", "snapkv", "kvzip", "epicache"], ["8x"]),
    (["kvzip+kivi4"], ["4x", "8x", "16x"]),
    (["kivi4"], []),
]
BENCH_FULL: Grid = [
    (["streaming", "snapkv", "pyramidkv", "h2o", "tova", "keydiff", "knorm", "random"], ["2x", "4x", "8x"]),
    (["kvzip", "epicache", "kvzip+kivi4", "snapkv+kivi4", "kvzip+kivi2"], ["4x", "8x", "16x"]),
    (["kivi4", "kivi2"], []),
]


def _split(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise KVBudgetError(f"empty list: {value!r}")
    return items


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {n}")
    return n


def cmd_policies(args: argparse.Namespace) -> int:

    rows = describe()
    print(f"{'name':<13} {'kind':<7} {'attention':<9}  {'paper':<44} {'saves':<42} what it does")
    for r in rows:
        attention = "yes" if r["needs_attention"] else "no"
        print(f"{r['name']:<13} {r['kind']:<7} {attention:<9}  {r['paper']:<44} {r['saves']:<42} {r['summary']}")
    print("\nCompose with '+': a scorer, an allocator (uniform, pyramid, head-adaptive) and a store,")
    print("e.g. snapkv+pyramid, snapkv+kivi4, h2o+mikv. A store alone (kivi4) keeps every token.")
    print("A merger folds evicted entries into kept ones (any scorer, no store): snapkv+merge, adakv+cam.")
    print("Budgets: tokens (512), bytes (24MiB), a ratio of the context (4x) or of every token seen (0.25seen).")
    print("+rerotate (any evicting policy without a store, e.g. streaming+rerotate) re-rotates the kept keys to")
    print("contiguous positions after each eviction: a conversation may outlast the model's positions.")
    return 0


def cmd_tasks_make(args: argparse.Namespace) -> int:

    if args.name != "ruler" and (args.task or args.haystack or args.essay):
        raise KVBudgetError("--task, --haystack and --essay are options of `tasks make ruler`")
    if args.name == "ruler" and not args.task:
        raise KVBudgetError("tasks make ruler needs --task NAME or --task all")
    tok = load_tokenizer(args.model)
    if args.name == "ruler":
        tasks = make_ruler(tok, args.task, n=args.n, length=args.length, seed=args.seed, haystack=args.haystack,
                           essay=args.essay, tokenizer_name=args.model or DEFAULT_MODEL)
    else:
        tasks = make_tasks(args.name, tok, n=args.n, length=args.length, seed=args.seed)
    write_tasks(args.out, tasks)
    name = f"ruler {args.task}" if args.name == "ruler" else args.name
    print(f"wrote {len(tasks)} {name} tasks ({sum(len(t.questions) for t in tasks)} questions) to {args.out}")
    return 0


def _run_grid(args, sweep, policies, budgets, model_name: str, command: str, out: Path, more: Grid = (),
              note: str | None = None) -> dict:
    """Run ``sweep(cfg)`` (the single-process one or the one on Ray) and write its report (``note``:
    a paragraph under its command)."""
    cfg = EvalConfig(
        policies=policies,
        budgets=budgets,
        more=list(more),
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        mode=args.mode,
        decode_interval=args.decode_interval,
        model=model_name,
    )
    summary = sweep(cfg)
    print(format_table(summary))
    env = {**environment(model_name, summary["seconds"], seed=args.seed), "prompt": summary["prompt"],
           "command": command, **({"note": note} if note else {})}
    atomic_write_text(out / "env.json", json.dumps(env, indent=2))
    write_report(out, env)
    return summary


def cmd_eval(args: argparse.Namespace) -> int:

    tasks = load_tasks(args.tasks, args.format)
    policies, budgets = _split(args.policy), _split(args.budget)
    check_names(EvalConfig(policies, budgets, mode=args.mode))  # before the model loads
    out = Path(args.out)
    if args.workers is not None and args.ray is None:
        raise KVBudgetError("--workers sets the workers of a sweep on Ray: add --ray [ADDRESS]")
    if args.ray is not None:
        require_ray("kvbudget eval --ray")

        def sweep(cfg: EvalConfig) -> dict:
            return run_eval_ray(tasks, cfg, out, model=args.model, device=args.device, address=args.ray or None,
                                workers=args.workers, progress=not args.no_progress)
    else:
        model, tok = load_model(args.model, device=args.device)

        def sweep(cfg: EvalConfig) -> dict:
            return run_eval(model, tok, tasks, cfg, out, progress=not args.no_progress)
    _run_grid(args, sweep, policies, budgets, args.model or "smollm2-135m", _command(), out)
    print(f"results: {out / 'results.jsonl'}, {out / 'summary.json'}, {out / 'report.md'}, {out / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:

    md, page = write_report(args.dir)
    print(f"report: {md}, {page}")
    return 0


def grid_text(grid: Grid) -> str:
    """``streaming, snapkv at 8x; kvzip+kivi4 at 4x,8x,16x; kivi4`` (a product without budgets: stores alone)."""
    return "; ".join(", ".join(ps) + (f" at {','.join(bs)}" if bs else "") for ps, bs in grid)


def bench_grid(args: argparse.Namespace) -> Grid:
    """The bench's (policies, budgets) products: the quick or the whole grid; --budget replaces every
    product's budgets, --policy the policies (one product, at --budget or the grid's budgets)."""
    grid = BENCH_FULL if args.full else BENCH_QUICK
    budgets = _split(args.budget) if args.budget else None
    if args.policy:
        every = list(dict.fromkeys(b for _, bs in grid for b in bs))
        return [(_split(args.policy), budgets or every)]
    return [(ps, budgets if budgets and bs else bs) for ps, bs in grid]


def cmd_bench(args: argparse.Namespace) -> int:

    start = time.perf_counter()
    grid = bench_grid(args)
    (policies, budgets), *more = grid
    cfg = EvalConfig(policies, budgets, mode=args.mode, more=more)
    check_names(cfg)  # before the model loads
    model, tok = load_model(args.model, device=args.device)
    tasks = make_tasks("needle", tok, n=args.tasks, length=args.length, seed=args.seed)
    tasks += make_tasks("kv", tok, n=args.tasks, length=args.length, seed=args.seed + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tasks(out / "tasks.jsonl", tasks)
    print(
        f"bench: {len(tasks)} tasks x {sum(len(t.questions) for t in tasks) // len(tasks)} questions, "
        f"~{args.length} tokens; full cache; {grid_text(grid)}"
    )
    # The bench measures this code: it starts afresh instead of resuming an older run.
    summary = _run_grid(args, lambda cfg: run_eval(model, tok, tasks, cfg, out, progress=not args.no_progress,
                                                   resume=False),
                        policies, budgets, args.model or "smollm2-135m", _command(), out, more,
                        note=f"Grid: the full cache; {grid_text(grid)}." + (QUICK_NOTE if grid == BENCH_QUICK else ""))
    print(f"report: {out / 'report.md'} (plot {out / 'plot.png'})")
    best = best_lines(summary)
    if best:
        print("best per byte budget (pooled retention; tied = intervals overlap):\n  " + "\n  ".join(best))
    print(f"bench time: {time.perf_counter() - start:.0f} s")
    if not (args.full or args.policy or args.budget):
        print(f"the whole grid ({grid_text(BENCH_FULL)}): kvbudget bench --full")
    return 0


def cmd_run(args: argparse.Namespace) -> int:

    path = Path(args.context)
    if not path.exists():
        raise KVBudgetError(f"context file not found: {path}")
    text = path.read_text()
    if not text.strip():  # before the model loads (a first load converts its GGUF: seconds)
        raise KVBudgetError(f"context is empty: {path}")
    policy = make_policy(args.policy, budget=args.budget)
    model, tok = load_model(args.model, device=args.device)
    session = Session(model, tok, policy, block_size=args.block_size, decode=args.decode)
    stats = session.add_context(text, question=args.question[0] if args.mode == "query-aware" else None)
    for q in args.question:
        print(f"Q: {q}\nA: {session.ask(q, args.max_new_tokens)}")
    print(
        f"[{policy.name} budget={policy.budget}: {stats.tokens} context tokens, "
        f"{session.kv_bytes / 1e6:.2f} MB KV held, peak {session.cache.peak_bytes / 1e6:.2f} MB, "
        f"prefill {stats.seconds:.2f} s]"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise KVBudgetError("kvbudget serve needs FastAPI and uvicorn: pip install 'kvbudget[serve]'") from None
    keys = [check_key(k) for k in args.api_key or []]
    for path in args.api_key_file or []:
        keys += read_key_file(path)
    given = {
        "max_body_bytes": args.max_body_bytes and parse_memory(args.max_body_bytes),
        "max_message_chars": args.max_message_chars, "max_request_tokens": args.max_request_tokens,
        "max_json_depth": args.max_json_depth, "max_sessions_per_key": args.max_sessions_per_key,
        "max_stored_bytes_per_key": args.max_stored_bytes_per_key and parse_memory(args.max_stored_bytes_per_key),
        "max_stored_bytes": args.max_stored_bytes and parse_memory(args.max_stored_bytes),
        "session_ttl_s": args.session_ttl and parse_duration(args.session_ttl),
        "max_queue": args.max_queue,
        "request_timeout_s": args.request_timeout and parse_duration(args.request_timeout),
    }
    limits = Limits(**{k: v for k, v in given.items() if v is not None})
    config = ServeConfig(
        model_name=args.model or DEFAULT_MODEL,
        store=Path(args.store) if args.store else cache_dir() / "sessions",
        policies=_split(args.policy),
        budget=args.budget,
        memory=parse_memory(args.memory),
        block_size=args.block_size,
        max_batch=args.max_batch,
        prefill_tokens=args.prefill_tokens,
        decode=args.decode,
        max_tokens=args.max_tokens,
        default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        api_keys=keys,
        limits=limits,
    )
    for name in config.policies:  # bad names and budgets fail before the model loads
        make_policy(name, budget=config.budget)
    if args.ray is not None and args.replicas is None:
        raise KVBudgetError("--ray names the cluster of --replicas N: add --replicas")
    if args.replicas is not None:
        require_ray("kvbudget serve --replicas")
        serve_replicas(config, args.replicas, args.model, device=args.device, host=args.host, port=args.port,
                       address=args.ray or None, insecure=args.insecure)
        return 0
    serve(config, args.model, device=args.device, host=args.host, port=args.port, log_level=args.log_level,
          insecure=args.insecure)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """EpiCache's layer sensitivity of a model on a seeded conversation sample."""

    model, tok = load_model(args.model, device=args.device)
    task = make_tasks("conversation", tok, n=1, length=args.length, seed=args.seed)[0]
    text = tok.apply_chat_template(task.context, tokenize=False) if tok.chat_template else str(task.context)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    start = time.perf_counter()
    data = profile(model, ids, block=args.block_size, sinks=args.sinks)
    data.update(model=getattr(model, "kvbudget_name", args.model), seed=args.seed, seconds=time.perf_counter() - start)
    save_profile(data, args.out)
    print(" ".join(f"{s:.4f}" for s in data["sensitivity"]))
    print(f"wrote {args.out} ({len(data['sensitivity'])} layers, {data['tokens']} tokens, {data['seconds']:.1f} s)")
    return 0


def _command() -> str:
    return "kvbudget " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _common(p: argparse.ArgumentParser, budget_default: str | None, mode_default: str = "single",
            budget_help: str | None = None) -> None:
    p.add_argument("--model", default=None, help="model name or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--block-size", type=_positive, default=BLOCK_SIZE,
                   help=f"prefill block size in tokens (default {BLOCK_SIZE})")
    p.add_argument("--max-new-tokens", type=_positive, default=24, help="answer length cap (default 24)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-interval", type=int, default=None,
                   help="compress during generation every N new tokens (default: 64, or the policy's own; 0 = never)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if mode_default == "single":
        p.add_argument("--mode", default="multi-turn", choices=["multi-turn", "query-aware"],
                       help="multi-turn (default): questions unknown at compression; query-aware: optimistic reference")
    else:
        p.add_argument("--mode", default=mode_default,
                       help="comma list of multi-turn, multi-request, query-aware (optimistic reference), or all "
                       f"(default {mode_default})")
    if budget_help is not None:
        p.add_argument("--budget", default=None, help=budget_help)
    elif budget_default is None:
        p.add_argument("--budget", required=True,
                       help="comma list: tokens (512), bytes (24MiB), ratios (4x) or fractions of the tokens seen (0.25seen)")
    else:
        p.add_argument("--budget", default=budget_default, help=f"comma list of budgets (default {budget_default})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvbudget", description="LLM inference with the KV cache under a hard memory budget")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("policies", help="list the policies")
    p.set_defaults(func=cmd_policies)

    p = sub.add_parser("tasks", help="synthetic task sets")
    tsub = p.add_subparsers(dest="tasks_command", required=True)
    m = tsub.add_parser("make", help="generate a seeded task set")
    m.add_argument("name", help="generator: needle, kv, prefix_suffix, multihop, math_find, conversation, chat, ruler")
    m.add_argument("--task", default=None,
                   help="ruler: niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe, "
                   "or all")
    m.add_argument("--haystack", default=None, choices=["noise", "essay", "prose"],
                   help="ruler: replace RULER's text haystack (noise, or essays) by noise, essays or built-in seeded "
                   "prose (default: RULER's per task)")
    m.add_argument("--essay", default=None,
                   help="ruler: text file for the essay haystack (RULER uses Paul Graham's essays; without one, "
                   "built-in seeded prose stands in)")
    m.add_argument("--n", type=_positive, default=10, help="number of contexts")
    m.add_argument("--length", type=_positive, default=1000, help="context length in model tokens")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="output JSONL file")
    m.add_argument("--model", default=None, help="tokenizer to measure lengths with (default: the embedded model)")
    m.set_defaults(func=cmd_tasks_make)

    p = sub.add_parser("eval", help="run policies x budgets on a task file in three modes (resumable sweep)")
    p.add_argument("--tasks", required=True,
                   help="task file (ours, or SCBench / LongMemEval / LoCoMo data), or a dataset id owner/name[:config] "
                   "read with HF datasets (pip install 'kvbudget[datasets]')")
    p.add_argument("--format", default="auto", choices=["auto", "kvbudget", "scbench", "longmemeval", "locomo"],
                   help="schema of --tasks (default: recognised from its fields)")
    p.add_argument("--policy", required=True, help="comma list of policies (see `kvbudget policies`), or all")
    p.add_argument("--out", default="kvbudget-eval",
                   help="output directory; a rerun into it skips the cells already in its results.jsonl")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the cells on Ray workers (docs/distributed.md): on the cluster at ADDRESS ('auto', "
                   "'ray://host:10001'), or on a local one without it (pip install 'kvbudget[ray]')")
    p.add_argument("--workers", type=_positive, default=None,
                   help="with --ray: workers to start (default: one per GPU of the cluster, else one per CPU)")
    _common(p, None, mode_default="all")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="the main job: quality per byte of the main methods beside the full cache on the "
                       "default model (--full: the whole grid)")
    p.add_argument("--out", default="kvbudget-results", help="output directory (default ./kvbudget-results)")
    p.add_argument("--tasks", type=_positive, default=2, help="contexts per task family (default 2)")
    p.add_argument("--length", type=_positive, default=800, help="context length in tokens (default 800)")
    p.add_argument("--full", action="store_true", help=f"the whole grid: {grid_text(BENCH_FULL)}")
    p.add_argument("--policy", default=None,
                   help=f"comma list, at --budget or the grid's budgets (default: {grid_text(BENCH_QUICK)})")
    _common(p, None, mode_default="multi-turn",
            budget_help="comma list of budgets, replacing each product's (default: the grid's)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="write report.md and a self-contained report.html for an eval directory")
    p.add_argument("dir", help="directory written by `kvbudget eval` or `kvbudget bench`")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="answer questions about one document under a policy")
    p.add_argument("--context", required=True, help="text file with the document")
    p.add_argument("--question", "-q", action="append", required=True, help="question (repeatable: multi-turn)")
    p.add_argument("--policy", default="snapkv")
    p.add_argument("--decode", choices=("auto", "eager", "static", "graph"), default="auto",
                   help="decoding: static buffers + one CUDA graph per token on CUDA ('auto'), or forced")
    _common(p, "4x")
    p.set_defaults(func=cmd_run)

    _add_profile(sub)
    _add_serve(sub)
    return parser


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="EpiCache layer sensitivity of a model (for the sensitivity allocator)")
    p.add_argument("--model", default=None, help="model name or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--length", type=_positive, default=2048, help="sample length in tokens (default 2048)")
    p.add_argument("--block-size", type=_positive, default=128, help="prefill block size profiled (default 128)")
    p.add_argument("--sinks", type=int, default=8, help="sink tokens always visible (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_profile)


def _size(nbytes: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def _add_serve(sub) -> None:

    lim = Limits()
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server over persistent sessions in bounded memory")
    p.add_argument("--model", default=None, help="model name or local path (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--policy", default="snapkv", help="policy, or a comma list (the first is the default; default snapkv)")
    p.add_argument("--budget", default="512", help="budget of every session: tokens, bytes (24MiB) or a ratio (default 512)")
    p.add_argument("--memory", default="2GiB", help="KV bytes all sessions in memory may hold together (default 2GiB)")
    p.add_argument("--store", default=None, help="session directory (default $KVBUDGET_CACHE/sessions)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1); another than loopback needs an API key or --insecure")
    p.add_argument("--port", type=_positive, default=8000)
    p.add_argument("--block-size", type=_positive, default=BLOCK_SIZE,
                   help=f"prefill block size in tokens (default {BLOCK_SIZE})")
    p.add_argument("--max-tokens", type=_positive, default=512, help="the most tokens a request may generate (default 512)")
    p.add_argument("--default-max-tokens", type=_positive, default=128,
                   help="tokens generated when a request names no max_tokens (default 128)")
    p.add_argument("--max-batch", type=_positive, default=MAX_BATCH,
                   help=f"turns decoded together at most; 1 serves one turn at a time (default {MAX_BATCH})")
    p.add_argument("--prefill-tokens", type=_positive, default=PREFILL_TOKENS,
                   help=f"prompt tokens fed between two batched decode steps, at most (default {PREFILL_TOKENS})")
    p.add_argument("--decode", choices=("auto", "eager", "static", "graph"), default="auto",
                   help="batched decoding: slots of static buffers + one CUDA graph per batch size on CUDA "
                        "('auto'; eager on CPU), or forced")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    g = p.add_argument_group("replicas on Ray (docs/distributed.md; pip install 'kvbudget[ray]')")
    g.add_argument("--replicas", type=_positive, default=None,
                   help="serve N replicas (one GPU each, else one CPU) behind a session-affinity router on Ray Serve; "
                   "--store must be a directory every node sees")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="with --replicas: the Ray cluster to join ('auto', 'ray://host:10001'; default: a local one)")
    g = p.add_argument_group("access (docs/serving.md)")
    g.add_argument("--api-key", action="append", metavar="KEY",
                   help="accept 'Authorization: Bearer KEY' (repeatable); each key owns the sessions it creates")
    g.add_argument("--api-key-file", action="append", metavar="FILE",
                   help="a file of API keys, one a line (repeatable; keeps keys out of the process list)")
    g.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without any API key")
    g = p.add_argument_group("limits (each hit answers a 4xx naming it and counts in /metrics)")
    g.add_argument("--max-body-bytes", default=None, help=f"request body size (default {_size(lim.max_body_bytes)})")
    g.add_argument("--max-message-chars", type=_positive, default=None,
                   help=f"characters of one message (default {lim.max_message_chars})")
    g.add_argument("--max-request-tokens", type=_positive, default=None,
                   help=f"prompt tokens of one request (default {lim.max_request_tokens})")
    g.add_argument("--max-json-depth", type=_positive, default=None,
                   help=f"nesting of a JSON body (default {lim.max_json_depth})")
    g.add_argument("--max-sessions-per-key", type=_positive, default=None,
                   help=f"sessions one key may hold (default {lim.max_sessions_per_key})")
    g.add_argument("--max-stored-bytes-per-key", default=None,
                   help=f"disk the session files of one key may take (default {_size(lim.max_stored_bytes_per_key)})")
    g.add_argument("--max-stored-bytes", default=None,
                   help=f"disk all session files may take (default {_size(lim.max_stored_bytes)})")
    g.add_argument("--session-ttl", default=None,
                   help="delete a session (and its file) idle this long: seconds or 90s, 15m, 12h, 7d; 0 = never "
                   f"(default {lim.session_ttl_s / 86400:g}d)")
    g.add_argument("--max-queue", type=_positive, default=None,
                   help=f"requests admitted to the model at once, running or waiting; more get 429 (default {lim.max_queue})")
    g.add_argument("--request-timeout", default=None,
                   help=f"seconds from admission to answer, queueing included; then 408 (default {lim.request_timeout_s:g})")
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KVBudgetError as exc:
        print(f"kvbudget: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvbudget: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
