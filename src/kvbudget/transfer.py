"""Copies between host and device that leave the host free to run ahead."""

import threading

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


_SIDE = threading.local()  # per thread: one copy stream per CUDA device


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The calling thread's own copy stream on ``device`` (made once, then reused)."""
    streams = _SIDE.__dict__.setdefault("streams", {})
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    return streams[index]


def copy_to_device(tensors: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """Copies on ``device`` of host ``tensors`` (pinned, for the copies to run asynchronously),
    complete when this returns. On CUDA they run on a copy stream of the calling thread (an I/O
    thread loading a session): a copy on the stream the model runs on would wait for the work
    queued there, and that work for the copy. The copies are made in the current stream's
    memory and start after the work queued on it, which may still read memory just freed."""
    device = torch.device(device)
    if device.type != "cuda":
        return {name: t.to(device, copy=True) for name, t in tensors.items()}
    out = {name: torch.empty(t.shape, dtype=t.dtype, device=device) for name, t in tensors.items()}
    side = _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for name, t in tensors.items():
            out[name].copy_(t, non_blocking=True)
    side.synchronize()
    return out


def copy_to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous copies in host memory of ``tensors`` (on any device), complete when this
    returns. From CUDA they run on a copy stream of the calling thread into pinned memory (an
    I/O thread saving a session, beside the model's stream, as in `copy_to_device`), after the
    work queued on the current stream, which is what leaves the tensors as they are copied."""
    out: dict[str, Tensor] = {}
    sides = []
    for name, t in tensors.items():
        if not t.is_cuda:
            out[name] = t.detach().to("cpu", copy=True).contiguous()
            continue
        side = _side_stream(t.device)
        if side not in sides:
            side.wait_stream(torch.cuda.current_stream(t.device))
            sides.append(side)
        with torch.cuda.stream(side):
            out[name] = host_copy(t)
    for side in sides:
        side.synchronize()
    return out
