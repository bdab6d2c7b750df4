"""Host -> device copies of small index tensors that leave the host free to run ahead."""

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` (a small host tensor: offsets, lengths, per-layer counts) on ``device``. On CUDA it goes
    through pinned memory without blocking: a copy from pageable memory waits for the work queued
    before it, and the host would stop launching ahead of the GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
