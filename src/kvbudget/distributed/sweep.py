"""An evaluation sweep on Ray: the cells of `eval.runner` run on worker actors, one per GPU of
the cluster (one per CPU where it has none), each loading the model once.

The driver plans the sweep as the single-process one does (`plan_sweep`: validation, the
directory's settings, the cells a resumed sweep still lacks), hands out cells one at a time to
idle workers (a worker takes the cells of a task it already holds the full-cache reference of,
where any is left), and appends each cell's rows to ``results.jsonl`` as they come back: the
driver is the file's only writer, one cell at a time, so a crash loses at most the cells in
flight and a rerun skips every cell written. A worker that dies (its process killed, its node
lost) has its cell given to another worker and is replaced; its rows were never written, so
none is written twice. The same progress bar and summary close the sweep.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import KVBudgetError
from ..eval.runner import (
    Cell,
    EvalConfig,
    TaskReference,
    append_rows,
    finish_sweep,
    plan_sweep,
    progress_bar,
    run_cell,
    task_reference,
)
from ..eval.taskfile import Task
from ..runtime.models import load_model, load_tokenizer
from .cluster import connect, require_ray

# A cell whose worker died this many times stops the sweep: it kills its workers (out of memory).
MAX_ATTEMPTS = 3
# Full-cache references a worker keeps (each holds the decoding distributions of its questions).
KEEP_REFERENCES = 2


class SweepWorker:
    """Runs cells on one model, loaded once; keeps the references of the tasks it ran last."""

    def __init__(self, model: str | None, device: str | None, cfg: EvalConfig) -> None:
        import ray

        if device is None and ray.get_gpu_ids():
            device = "cuda"  # Ray shows this actor its own GPU only
        self.model, self.tok = load_model(model, device=device)
        self.cfg = cfg
        self.references: dict[str, TaskReference] = {}

    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    def run(self, cell: Cell) -> list[dict]:
        """The rows of ``cell``, ready to append."""
        reference = self.references.pop(cell.task.id, None)
        if reference is None:
            reference = task_reference(self.model, self.tok, cell.task, self.cfg)
        self.references[cell.task.id] = reference  # most recent last
        while len(self.references) > KEEP_REFERENCES:
            del self.references[next(iter(self.references))]
        return run_cell(self.model, self.tok, cell, self.cfg, reference)


@dataclass
class _Worker:
    handle: object
    tasks: set[str] = field(default_factory=set)  # tasks whose reference it computed


def worker_resources(ray) -> tuple[int, dict]:
    """(workers the cluster holds, what each asks for): one GPU each, else one CPU each."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return gpus, {"num_gpus": 1}
    return max(1, int(resources.get("CPU", 1))), {"num_cpus": 1}


def run_eval_ray(tasks: list[Task], cfg: EvalConfig, out_dir: str | Path, model: str | None = None,
                 device: str | None = None, address: str | None = None, workers: int | None = None,
                 progress: bool = True, resume: bool = True) -> dict:
    """Run the grid on Ray workers (``workers``: default one per GPU of the cluster, else one per
    CPU), append to ``results.jsonl`` and write ``summary.json`` as `run_eval` does; return the
    summary (with ``workers`` and ``retried_cells``). ``address``: the cluster to join ("auto",
    "ray://host:10001"); None starts a local one, stopped at the end."""
    ray = require_ray("a sweep on Ray")
    tok = load_tokenizer(model)
    plan = plan_sweep(tok, tasks, cfg, out_dir, resume)  # bad input fails before a cluster starts
    started = connect(address, "a sweep on Ray")
    try:
        available, resources = worker_resources(ray)
        n = workers or available
        if n > available:
            unit = "GPUs" if "num_gpus" in resources else "CPUs"
            raise KVBudgetError(f"{n} workers asked for: the Ray cluster has {available} {unit}, one per worker")
        actor = ray.remote(max_restarts=0, max_task_retries=0, **resources)(SweepWorker)
        start = time.perf_counter()
        retried = _drive(ray, lambda: _Worker(actor.remote(model, device, cfg)), n, plan.cells, plan.results,
                         progress_bar(plan, progress))
        return finish_sweep(plan, cfg, tok, time.perf_counter() - start, workers=n, retried_cells=retried)
    finally:
        if started:
            ray.shutdown()


def _drive(ray, spawn, n: int, cells: list[Cell], results: Path, bar) -> int:
    """Hand ``cells`` to ``n`` workers made by ``spawn``, append the rows that come back; return
    how many cells were retried after their worker died."""
    from ray.exceptions import RayActorError, RayTaskError

    queue = deque(cells)
    attempts: dict[int, int] = {}
    idle: list[_Worker] = []
    running: dict = {}  # object ref -> (worker, cell)
    pool = [spawn() for _ in range(min(n, len(cells)))]
    idle += pool
    retried = 0
    try:
        while queue or running:
            while idle and queue:
                worker = idle.pop(0)
                # A cell of a task the worker holds the reference of, else of a task no other worker
                # holds (each reference is computed once where the tasks outnumber the workers).
                cell = next((c for c in queue if c.task.id in worker.tasks), None)
                if cell is None:
                    held = {t for w in pool if w is not worker for t in w.tasks}
                    cell = next((c for c in queue if c.task.id not in held), queue[0])
                queue.remove(cell)
                worker.tasks.add(cell.task.id)
                running[worker.handle.run.remote(cell)] = (worker, cell)
                bar.set_postfix_str(cell.label)
            done, _ = ray.wait(list(running), num_returns=1)
            worker, cell = running.pop(done[0])
            try:
                rows = ray.get(done[0])
            except RayTaskError as exc:  # the cell failed (bad input, a bug): the sweep stops with its error
                if isinstance(exc.cause, KVBudgetError):
                    raise exc.cause from None
                raise exc.as_instanceof_cause() from None
            except RayActorError as exc:
                attempts[id(cell)] = attempts.get(id(cell), 0) + 1
                if attempts[id(cell)] >= MAX_ATTEMPTS:
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise KVBudgetError(f"cell {cell.label!r} lost its worker {MAX_ATTEMPTS} times (last: {reason}); "
                                        "the rows written so far are kept (rerun to resume)") from None
                bar.write(f"a worker died running {cell.label}; it runs again on another worker")
                retried += 1
                queue.appendleft(cell)
                pool.remove(worker)
                ray.kill(worker.handle, no_restart=True)
                replacement = spawn()
                pool.append(replacement)
                idle.append(replacement)
                continue
            append_rows(results, rows)
            bar.update(1)
            idle.append(worker)
    finally:
        bar.close()
        for worker in pool:
            ray.kill(worker.handle, no_restart=True)
    return retried
