"""The ragged bookkeeping and Ada-KV selection as they were before they stopped reading sizes
back from the device (commit ab1af40): verbatim copies (but for Ada-KV's tie rule, changed since:
`_topk_indices`), the reference that tests/test_ragged_ops.py compares the current code with. `use_reference` swaps them in (tests only).

Methods are module-level functions here; `use_reference` sets them on their classes."""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

from kvbudget.attention import AttentionPlan, set_plan
from kvbudget.cache import FUSED_KIVI, POSITION_DTYPE, BodyPlan, BudgetedLayer, LayerView, gather_entries
from kvbudget.policies.base import Observation, Policy, _with_body_state, demotion_index, select


def _valid_mask(lens: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=lens.device)[None, :] < lens[:, None]


def ragged_to_padded(flat: Tensor, lens: Tensor, fill: float = 0) -> Tensor:
    """[N, ...] head-after-head -> [H, max(lens), ...] (padding = ``fill``)."""
    width = int(lens.max()) if lens.numel() else 0
    out = flat.new_full((lens.shape[0], width, *flat.shape[1:]), fill)
    out[_valid_mask(lens, width)] = flat
    return out


def padded_to_ragged(padded: Tensor, lens: Tensor) -> Tensor:
    """[H, W, ...] -> [N, ...] keeping the first ``lens[h]`` entries of each head."""
    return padded[_valid_mask(lens, padded.shape[1])]


def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """Append the new tokens to every head; return keys/values padded for this attention call."""
    if not self.is_initialized:
        self.lazy_initialization(key_states, value_states)
    b, h, q, _ = key_states.shape
    new_pos = torch.arange(self.seen, self.seen + q, dtype=POSITION_DTYPE, device=self.device)
    self.seen += q
    if self.transient:
        return self._attend_without_storing(key_states, value_states)
    plan = None
    if self.head_lens is None:
        n_old = self.max_entries
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, new_pos.expand(b, h, q)], dim=-1)
        for name, s in self.state.items():
            self.state[name] = torch.cat([s, s.new_zeros(b, h, q)], dim=-1)
        if q == 1 and self.body is not None and (FUSED_KIVI == "1" or (FUSED_KIVI == "auto" and key_states.is_cuda)):
            plan = BodyPlan(self.keys, self)  # attends to the body as stored: nothing decoded
            keys, values, old_lens = self.keys, self.values, None
        else:
            keys, values, old_lens = self._with_body(self.keys, self.values) + (None,)
    else:
        old_lens = self.head_lens
        n_old = int(old_lens.max())
        # The attention call sees [old entries | padding | new tokens] per head ...
        keys = torch.cat([ragged_to_padded(self.keys, old_lens)[None], key_states], dim=2)
        values = torch.cat([ragged_to_padded(self.values, old_lens)[None], value_states], dim=2)
        # ... while storage stays ragged: each head's segment grows by q.
        self.keys = self._append_ragged(self.keys, key_states[0])
        self.values = self._append_ragged(self.values, value_states[0])
        self.positions = self._append_ragged(self.positions, new_pos.expand(h, q))
        for name, s in self.state.items():
            self.state[name] = self._append_ragged(s, s.new_zeros(h, q))
        self.head_lens = old_lens + q
    self.peak_entries = max(self.peak_entries, self.max_entries)
    set_plan(plan or AttentionPlan(keys=keys, head_lens=old_lens, n_old=n_old, layer=self))
    return keys, values


def _attend_without_storing(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
    """Scoring passes (query-aware question, KVzip's repetition, EpiCache's patched prompt):
    the tokens attend to the cache and to each other, their queries are observed, but their
    KV is never stored, so they add nothing to the entries held."""
    self.phantom += key_states.shape[2]
    if self.head_lens is None:
        old_keys, old_values = self._with_body(self.keys, self.values)
        old_lens = None
    else:
        old_lens = self.head_lens
        old_keys = ragged_to_padded(self.keys, old_lens)[None]
        old_values = ragged_to_padded(self.values, old_lens)[None]
    keys = torch.cat([old_keys, key_states], dim=2)
    values = torch.cat([old_values, value_states], dim=2)
    set_plan(AttentionPlan(keys=keys, head_lens=old_lens, n_old=old_keys.shape[2], layer=self))
    return keys, values


def _append_ragged(self, flat: Tensor, new: Tensor) -> Tensor:
    """Insert ``new[h]`` ([H, q, ...]) after head h's segment of ``flat``."""
    segments = torch.split(flat, self.head_lens.tolist())
    return torch.cat([part for h, seg in enumerate(segments) for part in (seg, new[h])])


def view(self, tail_only: bool = False) -> LayerView:
    """The entries as padded [B, H, n, ...] tensors (free in the dense layout). ``tail_only``:
    only the full-precision tail of a store (nothing decoded)."""
    if tail_only and self.body is not None:
        b = len(self.body)
        state = {k: s[..., b:] for k, s in self.state.items()}
        return LayerView(self.keys, self.values, self.positions[..., b:], state, None)
    if self.head_lens is None:
        keys, values = self._with_body(self.keys, self.values)
        return LayerView(keys, values, self.positions, dict(self.state), None)
    lens = self.head_lens
    width = int(lens.max())
    return LayerView(
        keys=ragged_to_padded(self.keys, lens)[None],
        values=ragged_to_padded(self.values, lens)[None],
        positions=ragged_to_padded(self.positions, lens, fill=-1)[None],
        state={k: ragged_to_padded(s, lens)[None] for k, s in self.state.items()},
        valid=_valid_mask(lens, width)[None],
    )


def keep(self, index: Tensor, lens: Tensor | None = None, view: LayerView | None = None) -> None:
    """Keep only the entries at ``index`` ([B, H, k], positions in `view()` order, ascending).

    With ``lens`` ([H]) head h keeps only its first ``lens[h]`` indices: different heads keep
    different numbers of entries and storage becomes ragged (batch 1 only). ``view`` passes a
    view already built (with updated state) to avoid building it twice.
    """
    view = view or self.view()
    self._drop_lse()
    if self.store is not None:
        if lens is not None and not bool((lens == index.shape[-1]).all()):
            raise ValueError(
                f"store '{self.store.name}' needs every head to keep the same number of entries "
                "(combine it with a uniform or pyramid allocator, not head-adaptive)"
            )
        kept_positions = view.positions.gather(2, index)
        recent = (kept_positions >= self.seen - self.residual).sum(-1)
        self.rebuild(index, int(recent.min()), view.state)
        return

    keys, values, positions = (gather_entries(t, index) for t in (view.keys, view.values, view.positions))
    state = {k: gather_entries(s, index) for k, s in view.state.items()}
    if lens is None or bool((lens == index.shape[-1]).all()):
        self.keys, self.values, self.positions, self.state, self.head_lens = keys, values, positions, state, None
        return
    if index.shape[0] != 1:
        raise ValueError("per-head variable lengths need batch size 1")
    self._store_ragged(LayerView(keys, values, positions, state, None), lens.to(index.device, torch.long))


def _store_ragged(self, view: LayerView, lens: Tensor) -> None:
    """Keep the first ``lens[h]`` entries of each head of a padded view, ragged."""
    self._drop_lse()
    self.keys = padded_to_ragged(view.keys[0], lens)
    self.values = padded_to_ragged(view.values[0], lens)
    self.positions = padded_to_ragged(view.positions[0], lens)
    self.state = {k: padded_to_ragged(s[0], lens) for k, s in view.state.items()}
    self.head_lens = lens


def drop_last(self, n: int) -> None:
    """Forget the ``n`` most recently appended tokens (they are last in every head)."""
    if n <= 0:
        return
    self.seen -= n
    phantom = min(n, self.phantom)
    self.phantom -= phantom
    n -= phantom
    if n <= 0:
        return
    if self.body is not None and n > self.keys.shape[-2]:
        raise RuntimeError("cannot drop entries that were already encoded by the store")
    self._drop_lse()  # queries observed meanwhile attended to the entries dropped
    if self.head_lens is None:
        self.keys, self.values = self.keys[..., :-n, :], self.values[..., :-n, :]
        self.positions = self.positions[..., :-n]
        self.state = {k: s[..., :-n] for k, s in self.state.items()}
        return
    self._store_ragged(self.view(), self.head_lens - n)


def mask(self, q_len: int, n_query_heads: int) -> Tensor | None:
    """Boolean mask [1, 1 or Hq, q, n_old + q]: True = may attend. None = everything visible."""
    if self.head_lens is None and q_len == 1:
        return None
    device = self.keys.device
    kv_len = self.n_old + q_len
    new = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    if self.head_lens is None:
        old = torch.ones(q_len, self.n_old, dtype=torch.bool, device=device)
        return torch.cat([old, new], dim=1).view(1, 1, q_len, kv_len)
    n_heads = self.head_lens.shape[0]
    old = torch.arange(self.n_old, device=device)[None, :] < self.head_lens.to(device)[:, None]
    old = old[:, None, :].expand(n_heads, q_len, self.n_old)
    full = torch.cat([old, new.expand(n_heads, q_len, q_len)], dim=2)
    # Query heads of one group share their KV head (repeat_kv order: kv head j -> q heads j*g..).
    return full.repeat_interleave(n_query_heads // n_heads, dim=0).unsqueeze(0)


def _ranked(scores: Tensor, obs: Observation, window: int) -> Tensor:
    """Scores with the protected window at +inf and padding at -inf."""
    scores = scores.float().nan_to_num(nan=float("-inf"))
    scores = scores.masked_fill(obs.positions >= obs.seen - window, float("inf"))
    if obs.valid is not None:
        scores = scores.masked_fill(~obs.valid, float("-inf"))
    return scores


def _topk_indices(scores: Tensor, k: int) -> Tensor:
    """The indices of the ``k`` best along the last dimension, ties to the lower index. Not in
    the old code, which called ``scores.topk(k).indices``: Ada-KV's tie rule changed since (a
    stable sort, `policies.base._choose`), and this reference follows it, independently."""
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def select_across_heads(scores: Tensor, obs: Observation, window: int, floor: float = 0.2) -> tuple[Tensor, Tensor]:
    """Ada-KV (Feng et al. 2024): one top-k over all heads of the layer (``budget * heads``
    entries), each head first guaranteed its best ``floor * budget``: heads keep different
    numbers of entries and the cache stores exactly those (ragged, batch 1). The two top-k are
    `_topk_indices` (the one change from the old code)."""
    scores = _ranked(scores, obs, window)[0]  # [H, n]
    h, n = scores.shape
    finite = scores > float("-inf")
    chosen = torch.zeros_like(finite)
    guaranteed = min(int(floor * obs.budget), n)
    if guaranteed:
        chosen.scatter_(1, _topk_indices(scores, guaranteed), True)
        chosen &= finite
    rest = min(obs.budget * h, int(finite.sum())) - int(chosen.sum())
    if rest > 0:
        pick = _topk_indices(scores.masked_fill(chosen, float("-inf")).flatten(), rest)
        chosen.view(-1)[pick] = True
    lens = chosen.sum(-1)
    order = torch.arange(n, device=scores.device).expand(h, n)
    # Chosen entries first, in their original order; the rest pushed behind them.
    index = torch.where(chosen, order, order + n).argsort(dim=-1)[:, : int(lens.max())]
    return index[None], lens


def _unpad_state(state: dict[str, Tensor], layer: BudgetedLayer) -> dict[str, Tensor]:
    if layer.head_lens is None:
        return state
    return {k: padded_to_ragged(s[0], layer.head_lens) for k, s in state.items()}


def _compress_layer(self, layer: BudgetedLayer, i: int, n_layers: int, budget: int, evict: bool) -> None:
    # A demoting store (MiKV) only chooses among full-precision entries (encoded ones never
    # come back), so only the tail is scored: no decoding, no attention over the whole body.
    demotes = self.store is not None and self.store.demotes
    view = layer.view(tail_only=demotes)
    start = layer.max_entries - view.keys.shape[2]
    obs = Observation(
        layer_idx=i,
        n_layers=n_layers,
        keys=view.keys,
        values=view.values,
        positions=view.positions,
        valid=view.valid,
        queries=layer.queries,
        query_positions=layer.query_positions,
        scaling=layer.scaling or view.keys.shape[-1] ** -0.5,
        budget=budget,
        seen=layer.seen,
        seed=zlib.crc32(f"{self.seed}:{i}:{layer.seen}".encode()),
        state=view.state,
        # Scored over the tail only, the softmax spans fewer keys than the queries attended to.
        lse=None if demotes else layer.lse,
    )
    scores = self.scorer.score(obs)
    state = _with_body_state(obs.state, layer, start) if start else obs.state
    if not evict:
        layer.state = _unpad_state(state, layer)
        return
    if demotes:
        layer.rebuild(demotion_index(scores, obs, start, self.protected(budget)), budget, state)
        return
    view.state = state
    choose = select_across_heads if self.head_adaptive else select
    index, lens = choose(scores, obs, self.protected(budget))
    layer.keep(index, lens, view=view)


def use_reference(monkeypatch) -> None:
    """Swap the reference code in (``monkeypatch``: pytest's fixture undoes it after the test)."""
    from kvbudget import attention, cache
    from kvbudget.policies import base

    for name in ("update", "_attend_without_storing", "_append_ragged", "view", "keep", "_store_ragged", "drop_last"):
        monkeypatch.setattr(BudgetedLayer, name, globals()[name])
    monkeypatch.setattr(attention.AttentionPlan, "mask", mask)
    monkeypatch.setattr(Policy, "_compress_layer", _compress_layer)
    for module in (cache, base):
        for name in ("ragged_to_padded", "padded_to_ragged", "select_across_heads", "_unpad_state"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, globals()[name])
