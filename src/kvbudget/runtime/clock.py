"""Wall time of work queued on a device: on CUDA the clock stops once the queued work is done,
so that a part of a step is charged its own GPU time, not the next part's wait for it."""

from __future__ import annotations

import time

import torch


def synced(start: float, device, wait: bool = True) -> float:
    """Seconds since ``start`` (a `time.perf_counter` reading) once the work queued on
    ``device`` is done (``wait=False``: now, where the caller queued nothing worth waiting for;
    a wait costs a host-device round trip and lets other threads take the interpreter lock)."""
    if wait and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
