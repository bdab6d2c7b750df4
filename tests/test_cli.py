"""CLI: bad input gives one clear line and a non-zero exit; the happy paths write their files."""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvbudget.cli import BENCH_FULL, BENCH_QUICK, bench_grid, build_parser, main
from kvbudget.compress.budget import parse_budget
from kvbudget.eval.runner import EvalConfig, check_names, plan_cells
from kvbudget.methods import make_policy


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbudget.cli", *args], capture_output=True, text=True, timeout=300)


def test_policies_lists_every_first_policy(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in ["full", "random", "streaming", "snapkv", "pyramidkv", "h2o", "tova", "keydiff", "knorm"]:
        assert f"\n{name} " in out


TASK_ROWS = [{"id": "t1", "context": "Alice keeps a red kite in the shed. " * 30,
              "questions": [{"question": "What colour is Alice's kite?", "answers": ["red"], "metric": "contains"}]}]


@pytest.fixture
def task_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS))
    return path


BAD_INPUT = [
    (["eval", "--tasks", "{tasks}", "--policy", "bogus", "--budget", "64"], "unknown policy 'bogus'"),
    (["eval", "--tasks", "{tasks}", "--policy", "snapkv", "--budget", "0"], "budget must be positive"),
    (["eval", "--tasks", "{tasks}", "--policy", "snapkv", "--budget", "lots"], "cannot read budget"),
    (["eval", "--tasks", "{bad}", "--policy", "snapkv", "--budget", "64"], "line 2"),
    (["eval", "--tasks", "{missing}", "--policy", "snapkv", "--budget", "64"], "missing.jsonl"),
    (["run", "--context", "{empty}", "-q", "Why?", "--policy", "snapkv", "--budget", "64"], "context is empty"),
    (["tasks", "make", "sudoku", "--out", "{out}"], "unknown task set"),
    (["eval", "--tasks", "{tasks}", "--policy", "snapkv", "--budget", "64", "--mode", "one-shot"], "unknown mode"),
    (["report", "{missing}"], "no results.jsonl"),
    (["bench", "--policy", "snapkv,bogus"], "unknown policy 'bogus'"),  # before the model loads
    (["eval", "--tasks", "{tasks}", "--policy", "snapkv", "--budget", "5000", "--no-progress"],
     "larger than the context of task 't1'"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory) -> list[subprocess.CompletedProcess]:
    """Every `BAD_INPUT` command line run as a user runs it (its own process), all at once (each
    pays the interpreter's start and imports: the suite's time)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    tasks, bad, empty = tmp / "tasks.jsonl", tmp / "bad.jsonl", tmp / "empty.txt"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in TASK_ROWS))
    bad.write_text(tasks.read_text() + '{"id": "t2", "context": "x", "questions": []}\n')
    empty.write_text("   \n")
    paths = {"tasks": tasks, "bad": bad, "missing": tmp / "missing.jsonl", "empty": empty, "out": tmp / "o.jsonl"}
    with ThreadPoolExecutor(len(BAD_INPUT)) as pool:
        return list(pool.map(lambda args: _run(*[a.format(**paths) for a in args]), [args for args, _ in BAD_INPUT]))


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[message for _, message in BAD_INPUT])
def test_bad_input_is_one_clear_line(bad_input_runs, case):
    proc, message = bad_input_runs[case], BAD_INPUT[case][1]
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvbudget: error:"), proc.stderr
    assert message in lines[0]


def _bench(*args: str) -> list[tuple[list[str], list[str]]]:
    return bench_grid(build_parser().parse_args(["bench", *args]))


def test_bench_runs_the_quick_grid_by_default_and_the_whole_one_with_full():
    """`kvbudget bench`: quality per byte — the classic baselines, KVzip and EpiCache alone, KVzip over
    a 4-bit store at several byte budgets, the store alone; `--full`: the whole grid (over the same
    tasks); --policy / --budget override either."""
    assert _bench() == BENCH_QUICK
    policies = {p for ps, _ in BENCH_QUICK for p in ps}
    assert {"streaming", "snapkv", "kvzip", "epicache", "kivi4", "kvzip+kivi4"} <= policies
    assert {b for ps, bs in BENCH_QUICK if "kvzip+kivi4" in ps for b in bs} == {"4x", "8x", "16x"}
    assert _bench("--full") == BENCH_FULL
    every = {p for ps, _ in BENCH_FULL for p in ps}
    assert policies <= every and {"epicache", "pyramidkv", "h2o", "tova", "keydiff", "knorm", "random"} <= every
    assert _bench("--policy", "h2o,tova") == [(["h2o", "tova"], ["8x", "4x", "16x"])]  # the grid's budgets
    assert _bench("--policy", "h2o", "--budget", "2x") == [(["h2o"], ["2x"])]
    # --budget replaces every product's budgets; the stores alone keep none.
    assert _bench("--full", "--budget", "16x") == [(ps, ["16x"] if bs else []) for ps, bs in BENCH_FULL]
    args = build_parser().parse_args(["bench"])
    assert (args.tasks, args.length, args.seed, args.mode, args.block_size) == (2, 800, 0, "multi-turn", 128)


@pytest.mark.parametrize("grid", [BENCH_QUICK, BENCH_FULL], ids=["quick", "full"])
def test_bench_grids_name_valid_policies_and_byte_budgets(grid):
    """Every policy of a bench grid parses at each of its budgets, every budget is a byte ratio, and
    the sweep runs each (policy, budget) once beside one full cache, a store alone once."""
    for policies, budgets in grid:
        for b in budgets:
            assert parse_budget(b).ratio is not None, b
        for name in policies:
            for b in budgets or [None]:
                make_policy(name, budget=b)  # raises on an unknown name or a bad budget
            assert make_policy(name, budget=1).evicts == bool(budgets), name  # stores alone: no budget
    (policies, budgets), *more = grid
    cfg = EvalConfig(policies, budgets, more=more)
    check_names(cfg)
    cells = plan_cells(cfg)
    assert cells[0] == ("full", None) and len(cells) == len(set(cells))
    assert len(cells) == 1 + sum(len(ps) * max(len(bs), 1) for ps, bs in grid)


def test_eval_writes_results_summary_report(tmp_path, task_file):
    out = tmp_path / "out"
    proc = _run("eval", "--tasks", str(task_file), "--policy", "snapkv", "--budget", "64,4x",
                "--out", str(out), "--no-progress", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["budget"]) for r in rows} == {("full", "-"), ("snapkv", "64"), ("snapkv", "4x")}
    for key in ["score", "answer_logprob", "retention", "kv_bytes", "peak_bytes", "prefill_s", "decode_s", "prediction"]:
        assert all(key in r for r in rows)
    full = next(r for r in rows if r["policy"] == "full")
    assert full["retention"] in (1.0, None)
    assert all(r["kv_bytes"] < full["kv_bytes"] for r in rows if r["policy"] != "full")
    assert {r["mode"] for r in rows} == {"multi-turn", "multi-request", "query-aware"}  # all three by default
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 3 * 3
    assert (out / "plot.png").stat().st_size > 10_000
    assert "| model |" in (out / "report.md").read_text()
    assert "OPTIMISTIC" in (out / "report.md").read_text()  # the query-aware rows are labelled
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert "snapkv" in proc.stdout and "retain" in proc.stdout and "agree" in proc.stdout
    # `kvbudget report DIR` rewrites both from results.jsonl alone.
    (out / "report.html").unlink()
    proc = _run("report", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_run_decodes_with_static_buffers_on_cpu(tmp_path, capsys):
    """`kvbudget run --decode static` answers with the static-buffer decoder (CPU: no graph), the
    same answer as eager decoding; `--decode graph` on CPU is one clear error line."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The blue door's code is 4711. " * 6 + "The weather is mild.")
    answers = []
    for mode in ("eager", "static"):
        assert main(["run", "--context", str(doc), "-q", "What is the blue door's code?", "--policy", "snapkv",
                     "--budget", "48", "--decode", mode, "--max-new-tokens", "12"]) == 0
        answers.append(capsys.readouterr().out.split("\n")[1])
    assert answers[0] == answers[1] and answers[0].startswith("A:")
    assert main(["run", "--context", str(doc), "-q", "Code?", "--decode", "graph", "--budget", "48"]) != 0
    assert "CUDA" in capsys.readouterr().err
