"""The CUDA tests: marked ``gpu``, skipped with a reason where CUDA is absent (CI), run on a GPU
by ``make test-gpu`` (``python -m pytest -m gpu tests/gpu``). Each model is built once per run."""

import pytest
import torch

from kvbudget.runtime import fusion

from .gpu_kit import build

CUDA = torch.cuda.is_available()
REASON = "needs a CUDA GPU (torch.cuda.is_available() is False): run `make test-gpu` on a GPU machine"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(pytest.mark.skip(reason=REASON))


@pytest.fixture(scope="session")
def _models() -> dict:
    return {}


def _model(models: dict, dtype: torch.dtype):
    if dtype not in models:
        models[dtype] = build(layers=4, dtype=dtype)
    fusion.unfuse(models[dtype])  # each test starts from the model as transformers built it
    return models[dtype]


@pytest.fixture
def model_f32(_models):
    """4 layers of the 8B shape in float32 (token-exact comparisons between paths)."""
    return _model(_models, torch.float32)


@pytest.fixture
def model_bf16(_models):
    """4 layers of the 8B shape in bfloat16 (the dtype the kernels are tuned for)."""
    return _model(_models, torch.bfloat16)


@pytest.fixture(autouse=True)
def _free_cuda_memory():
    yield
    if CUDA:
        torch.cuda.empty_cache()
