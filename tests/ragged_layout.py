"""The padded layout a ragged layer gives the masked attention path, built from its storage: a
test helper shared with tests/gpu/test_ragged_cuda.py (the varlen flash path reads the storage)."""

from torch import Tensor


def padded_segments(flat_k: Tensor, flat_v: Tensor, old: list[int], m: int) -> tuple[Tensor, Tensor]:
    """``flat_k`` / ``flat_v`` [sum(old) + H*m, d]: head h's ``old[h]`` entries then its m new
    tokens, heads one after another. Returns keys and values [1, H, max(old) + m, d], each head
    [its old entries | zeros | its new tokens] (`BudgetedLayer._ragged_block`'s layout)."""
    h, n_old, d = len(old), max(old), flat_k.shape[-1]
    pad_k = flat_k.new_zeros(1, h, n_old + m, d)
    pad_v = flat_v.new_zeros(1, h, n_old + m, flat_v.shape[-1])
    start = 0
    for i, n in enumerate(old):
        seg = slice(start, start + n + m)
        pad_k[0, i, :n], pad_k[0, i, n_old:] = flat_k[seg][:n], flat_k[seg][n:]
        pad_v[0, i, :n], pad_v[0, i, n_old:] = flat_v[seg][:n], flat_v[seg][n:]
        start += n + m
    return pad_k, pad_v
