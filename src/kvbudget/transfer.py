"""Copies between host and device that leave the host free to run ahead."""

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a small host tensor: offsets, lengths, per-layer counts) on ``device``. On CUDA it goes
    through pinned memory without blocking: a copy from pageable memory waits for the work queued
    before it, and the host would stop launching ahead of the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_copy(t: Tensor) -> Tensor:
    """``t`` copied to host memory: from a GPU into pinned memory without waiting (the copy is
    queued on the current stream, so it reads ``t`` as the work queued before it leaves it; wait
    for that stream, or an event recorded after the copy, before reading the result on the host)."""
    if not t.is_cuda:
        return t.clone()
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
