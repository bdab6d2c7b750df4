"""Pure-torch reference paths of the decode kernels: same signatures, same outputs.

They gather/pad the held entries and run a masked softmax in float32 (float64 when the inputs are
float64, which the tests use as ground truth). They are the fallback where Triton or a GPU is
missing, and the yardstick the kernels are tested against. Not meant to be fast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _attend(q: Tensor, keys: Tensor, values: Tensor, valid: Tensor, scale: float,
            softcap: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """q [B, Hq, D] over keys/values [B, Hkv, n, D] where ``valid`` [B, Hkv, n]; GQA in
    repeat_kv order. A head without valid entries gives zeros. ``softcap``: logits become
    ``softcap * tanh(logit / softcap)``; ``sinks`` [Hq]: one more logit per query head in the
    softmax, with a zero value."""
    ct = torch.promote_types(q.dtype, torch.float32)
    b, hq, d = q.shape
    hkv, dv = keys.shape[1], values.shape[-1]
    qf = q.to(ct).view(b, hkv, hq // hkv, d)
    scores = torch.einsum("bhgd,bhnd->bhgn", qf, keys.to(ct)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.to(ct).view(1, hkv, hq // hkv, 1).expand(b, hkv, hq // hkv, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(valid.any(-1)[:, :, None, None], probs, torch.zeros_like(probs))  # 0 entries: no NaN
    out = torch.einsum("bhgn,bhnd->bhgd", probs, values.to(ct))
    return out.reshape(b, hq, dv).to(q.dtype)


def _into(out: Tensor | None, res: Tensor) -> Tensor:
    if out is None:
        return res
    out.copy_(res)
    return out


def reference_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, lens: Tensor, scale: float,
    max_len: int | None = None, num_splits: int | None = None, out: Tensor | None = None,
) -> Tensor:
    """Torch version of `decode_attention` (``max_len``/``num_splits`` only tune the kernel)."""
    cap = k.shape[2]
    valid = torch.arange(cap, device=k.device) < lens.to(k.device)[..., None]
    return _into(out, _attend(q, k, v, valid, scale))


def reference_varlen_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, starts: Tensor, lens: Tensor, scale: float,
    max_len: int | None = None, num_splits: int | None = None, out: Tensor | None = None,
    softcap: float | None = None, sinks: Tensor | None = None, window: int | None = None,
    kpos: Tensor | None = None, qpos: Tensor | None = None,
) -> Tensor:
    """Torch version of `varlen_decode_attention`: pads the ragged heads (to ``max_len`` when
    given), then masks."""
    b = q.shape[0]
    starts, lens = starts.reshape(-1).long(), lens.reshape(-1).long()
    # ``max_len`` (a bound on every length) keeps this free of host syncs, as inside a CUDA graph.
    width = max_len if max_len is not None else (int(lens.max()) if lens.numel() else 0)
    pos = torch.arange(width, device=k.device)
    valid = pos[None, :] < lens[:, None]
    rows = (starts[:, None] + pos[None, :]).clamp(0, max(k.shape[0] - 1, 0))
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if k.shape[0] == 0:  # nothing held anywhere
        keys = k.new_zeros(*rows.shape, k.shape[-1])
        values = v.new_zeros(*rows.shape, v.shape[-1])
    else:
        keys, values = k[rows], v[rows]
    hkv = lens.numel() // b
    if window:  # entries at positions <= qpos - window are outside the query's window
        oldest = qpos.reshape(b, 1).to(k.device).repeat_interleave(hkv, dim=0) - window  # [B*Hkv, 1]
        valid = valid & (kpos[rows].long() > oldest)
    res = _attend(
        q, keys.view(b, hkv, width, -1), values.view(b, hkv, width, -1), valid.view(b, hkv, width), scale,
        softcap, sinks,
    )
    return _into(out, res)


def reference_kivi_decode_attention(
    q: Tensor, body, store, tail_k: Tensor, tail_v: Tensor, scale: float,
    tail_lens: Tensor | None = None, body_lens: Tensor | None = None,
    num_splits: int | None = None, out: Tensor | None = None,
    softcap: float | None = None, sinks: Tensor | None = None, window: int | None = None,
    body_pos: Tensor | None = None, tail_pos: Tensor | None = None, qpos: Tensor | None = None,
) -> Tensor:
    """Torch version of `kivi_decode_attention`: decode the body with the store (what
    `BudgetedLayer._with_body` does), put it before the tail, attend with a mask. ``window``:
    entries at positions (``body_pos`` [B, Hkv, n], ``tail_pos`` [B, Hkv, t]) ``<= qpos - window``
    (``qpos`` [B]) are masked."""
    b, hkv, t = tail_k.shape[:3]
    device = tail_k.device
    tail_valid = torch.arange(t, device=device) < (
        torch.full((b, hkv), t, device=device) if tail_lens is None else tail_lens.to(device).view(b, hkv)
    )[..., None]
    oldest = None if not window else qpos.reshape(b, 1, 1).to(device) - window
    if oldest is not None:
        tail_valid = tail_valid & (tail_pos.long() > oldest)
    if body is None or len(body) == 0:
        return _into(out, _attend(q, tail_k, tail_v, tail_valid, scale, softcap, sinks))
    body_k, body_v = body.decode(store, tail_k.dtype)
    n = body_k.shape[2]
    body_valid = torch.arange(n, device=device) < (
        torch.full((b, hkv), n, device=device) if body_lens is None else body_lens.to(device).view(b, hkv)
    )[..., None]
    if oldest is not None:
        body_valid = body_valid & (body_pos[:, :, :n].long() > oldest)
    keys = torch.cat([body_k, tail_k], dim=2)
    values = torch.cat([body_v, tail_v], dim=2)
    return _into(out, _attend(q, keys, values, torch.cat([body_valid, tail_valid], dim=2), scale, softcap, sinks))
