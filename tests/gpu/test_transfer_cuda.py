"""Session files' copies between host and GPU (`transfer.copy_to_device`, `copy_to_host`): on a
copy stream of the calling thread, ordered after the work queued on the model's stream, complete
when they return."""

import pytest
import torch

from kvbudget.transfer import copy_to_device, copy_to_host

pytestmark = pytest.mark.gpu


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"keys": torch.randn(1, 8, 300, 128, generator=g).to(torch.bfloat16),
            "positions": torch.randint(0, 10**6, (1, 8, 300), generator=g, dtype=torch.int32),
            "strided": torch.randn(64, 32, generator=g).t()}


def test_a_round_trip_gives_the_same_tensors():
    host = {name: t.contiguous().pin_memory() for name, t in _tensors().items()}
    on_gpu = copy_to_device(host, "cuda")
    back = copy_to_host(on_gpu)
    for name, t in _tensors().items():
        assert on_gpu[name].is_cuda and torch.equal(on_gpu[name].cpu(), t)
        assert back[name].is_pinned() and back[name].is_contiguous() and torch.equal(back[name], t)


def test_a_copy_to_the_host_reads_what_the_queued_work_leaves():
    x = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the write
    x.fill_(7.0)
    assert bool((copy_to_host({"x": x})["x"] == 7.0).all())


def test_a_copy_from_a_strided_device_tensor_is_contiguous_on_the_host():
    t = torch.arange(12.0, device="cuda").reshape(3, 4).t()
    out = copy_to_host({"t": t})["t"]
    assert out.is_contiguous() and torch.equal(out, t.cpu())
