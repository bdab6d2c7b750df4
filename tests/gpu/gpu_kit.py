"""What the CUDA tests share: a random-weight model of the Llama-3.1-8B attention shape, greedy
decoding the way `Session` decodes an answer, and comparisons of two caches.

This module is the one place where the GPU tests reach below the public API (the session's
decode loop, layer views, environment switches): when those internals move, only this file and
the checks that name a kernel follow them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import kvbudget as kb
from kvbudget.kv.hook import attach
from kvbudget.runtime.answer import greedy_decode

VOCAB = 128000  # token ids are drawn below this (the 8B vocabulary has 128256)


# The Llama-3.1-8B attention and MLP shape; the tests build 4 layers of it.
LLAMA_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 131072, "rope_theta": 500000.0}


def build(layers: int = 4, dtype: torch.dtype = torch.float32):
    """A random-weight model of the Llama-3.1-8B shape with ``layers`` layers on CUDA, built from
    its config with plain transformers, kvbudget's hook attached. float32 removes bf16 rounding
    differences between two paths' reductions where a check compares tokens."""
    cfg = LlamaConfig(**LLAMA_8B, num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    attach(model)
    return model


def random_ids(n: int, seed: int | None = None) -> torch.Tensor:
    """[1, n] random token ids on CUDA (seeded when ``seed`` is given)."""
    gen = torch.Generator(device="cuda").manual_seed(seed) if seed is not None else None
    return torch.randint(0, VOCAB, (1, n), device="cuda", generator=gen)


def decode(model, name: str, mode: str, context: int = 3000, n_new: int = 48, **kw) -> tuple[list[int], object]:
    """Prefill ``context`` random tokens under policy ``name`` (blocks of 512, decode-time
    compression every 16 tokens), then decode ``n_new`` tokens greedily as `Session` does, in
    decode ``mode`` (eager, static, graph). Returns (tokens, cache)."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, context), device="cuda")
    policy = kb.policy(name, decode_interval=16, **kw)
    cache = policy.new_cache(model)
    logits, _ = kb.prefill(model, cache, policy, ids, block_size=512)
    with torch.inference_mode():
        out = answer(model, cache, policy, logits, n_new, mode)
    return out, cache


def answer(model, cache, policy, logits, n_new: int, mode: str) -> list[int]:
    """Greedy decoding of ``n_new`` tokens from ``logits`` through `Session`'s decode loop."""
    return greedy_decode(model, cache, policy, logits, n_new, eos=set(), mode=mode)


def compare_caches(a, b) -> float:
    """Largest |difference| of the keys and values of two caches that hold the same entries
    (same tokens seen, same positions: asserted)."""
    worst = 0.0
    for la, lb in zip(a.layers, b.layers):
        va, vb = la.view(), lb.view()
        assert la.seen == lb.seen, (la.seen, lb.seen)
        assert torch.equal(va.positions, vb.positions)
        worst = max(worst, float((va.keys - vb.keys).abs().max()), float((va.values - vb.values).abs().max()))
    return worst


def differing_share(a, b, tol: float = 1e-3) -> float:
    """The share of key and value elements of two caches holding the same entries (asserted, as
    `compare_caches`) that differ by more than ``tol``."""
    compare_caches(a, b)
    over = total = 0
    for la, lb in zip(a.layers, b.layers):
        va, vb = la.view(), lb.view()
        for x, y in ((va.keys, vb.keys), (va.values, vb.values)):
            over += int(((x - y).abs() > tol).sum())
            total += x.numel()
    return over / max(1, total)


def overlap(a, b) -> list[float]:
    """Per layer: the share of kept (head, position) pairs the two caches have in common."""
    out = []
    for la, lb in zip(a.layers, b.layers):
        pa, pb = la.view().positions[0], lb.view().positions[0]
        # Padding (ragged layers: heads shorter than the longest) is at position -1: not an entry.
        common = sum(len((set(x.tolist()) & set(y.tolist())) - {-1}) for x, y in zip(pa, pb))
        out.append(common / max(1, int((pa >= 0).sum())))
    return out


@contextmanager
def env(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` inside, as it was afterwards."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextmanager
def lse_env(mode: str) -> Iterator[list[bool]]:
    """``KVBUDGET_ATTENTION_LSE=mode`` inside; records, at each `scoring.attention_reduce`,
    whether an LSE came with the observation (the list yielded)."""
    from kvbudget.compress import scoring

    seen: list[bool] = []
    real = scoring.attention_reduce

    def spy(*args, lse=None, **kwargs):
        seen.append(lse is not None)
        return real(*args, lse=lse, **kwargs)

    scoring.attention_reduce = spy
    try:
        with env("KVBUDGET_ATTENTION_LSE", mode):
            yield seen
    finally:
        scoring.attention_reduce = real
