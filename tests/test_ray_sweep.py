"""Sweeps on a local Ray cluster of 2 CPU workers: with a worker killed mid-sweep (its cell runs
again elsewhere) the rows are those of the single-process sweep, each written once; a rerun
resumes (runs and writes nothing); the message where Ray is missing. One cluster for the module;
it leaves no process behind.

Contexts are ~150 tokens, one question each and answers of 2 tokens: a cell takes a second or two.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import psutil
import pytest
import ray

from kvbudget import cli
from kvbudget.distributed import sweep as ray_sweep
from kvbudget.eval.generators import make_tasks
from kvbudget.eval.runner import EvalConfig, read_results, run_eval
from kvbudget.eval.taskfile import write_tasks

TIMINGS = ("prefill_s", "compress_s", "decode_s")  # wall-clock columns: the only ones that may differ


def _descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=timeout)
    return {p.pid for p in alive}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs (2 workers); stopped at the end, with every process it started."""
    before = _descendants()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    started = _descendants() - before
    ray.shutdown()
    assert not _wait_gone(started), "the Ray cluster left processes behind"


@pytest.fixture(scope="module")
def tasks(default_model):
    _, tok = default_model
    tasks = make_tasks("needle", tok, 2, 150, seed=3)
    for t in tasks:
        t.questions = t.questions[:1]
    return tasks


CFG = EvalConfig(policies=["snapkv", "streaming"], budgets=["64"], max_new_tokens=2, mode="multi-turn", block_size=64)


def _rows(path) -> list[dict]:
    rows = [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_results(path)]
    return sorted(rows, key=lambda r: (r["task"], r["mode"], r["policy"], r["budget"], r["question_index"]))


@pytest.fixture(scope="module")
def single(default_model, tasks, tmp_path_factory):
    """The rows of the single-process sweep (with one torch thread, as each Ray worker has)."""
    import torch

    model, tok = default_model
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_eval(model, tok, tasks, CFG, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return _rows(out / "results.jsonl")


def _kill_a_worker_after_the_first_cell(monkeypatch) -> list[int]:
    """SIGKILL one worker process as the first cell's rows are written (one busy with a cell where
    there is one); the killed process ids are returned."""
    killed: list[int] = []
    real_append = ray_sweep.append_rows

    def append_then_kill(path, rows):
        real_append(path, rows)
        if killed:
            return
        workers = [p for p in psutil.Process().children(recursive=True)
                   if p.cmdline() and p.cmdline()[0].startswith("ray::SweepWorker")]
        workers.sort(key=lambda p: not p.cmdline()[0].startswith("ray::SweepWorker.run"))
        assert workers, "no worker process found"
        os.kill(workers[0].pid, signal.SIGKILL)
        killed.append(workers[0].pid)

    monkeypatch.setattr(ray_sweep, "append_rows", append_then_kill)
    return killed


def test_two_workers_one_killed_give_the_single_process_rows_once_and_resume(cluster, tasks, single, tmp_path,
                                                                              monkeypatch):
    killed = _kill_a_worker_after_the_first_cell(monkeypatch)
    summary = ray_sweep.run_eval_ray(tasks, CFG, tmp_path, workers=2, progress=False)
    assert killed and summary["workers"] == 2 and summary["retried_cells"] == 1
    raw = read_results(tmp_path / "results.jsonl")
    keys = [(r["task"], r["mode"], r["policy"], r["budget"], r["question_index"]) for r in raw]
    assert len(keys) == len(set(keys)) == len(tasks) * 3, "a row missing or written twice"
    assert _rows(tmp_path / "results.jsonl") == single  # full, snapkv, streaming: as in one process

    written = (tmp_path / "results.jsonl").read_bytes()
    again = ray_sweep.run_eval_ray(tasks, CFG, tmp_path, workers=2, progress=False)
    assert again["resumed_cells"] == len(tasks) * 3
    assert (tmp_path / "results.jsonl").read_bytes() == written  # nothing ran, nothing written twice
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_cells"] == len(tasks) * 3


def test_without_ray_eval_says_what_to_install(tasks, tmp_path, monkeypatch, capsys):
    path = tmp_path / "tasks.jsonl"
    write_tasks(path, tasks)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code = cli.main(["eval", "--tasks", str(path), "--policy", "snapkv", "--budget", "64", "--ray",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == "kvbudget: error: kvbudget eval --ray needs Ray: pip install 'kvbudget[ray]'"
