"""Ragged bookkeeping and Ada-KV selection without host<->device syncs: the same results as the
code they replaced (tests/ragged_reference.py, verbatim), on random ragged inputs (heads with no
entries included) and end to end on the tiny models; and the syncs that remain."""

import copy

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import kvbudget as kb
from kvbudget import attention
from kvbudget.attention import AttentionPlan
from kvbudget.cache import BudgetedLayer, padded_to_ragged, ragged_to_padded, true_indices
from kvbudget.policies.base import Observation, _choose, _ranked, pick_across_heads, select_across_heads

import ragged_reference as ref
from conftest import random_ids

LENS = [(3, 0, 5, 2), (0, 0, 0), (4, 4), (1,), (0, 7), (6, 1, 0, 0, 2, 9)]


def _equal(a: Tensor | None, b: Tensor | None) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b)


def _same_layer(a: BudgetedLayer, b: BudgetedLayer) -> None:
    for name in ("keys", "values", "positions", "head_lens"):
        _equal(getattr(a, name), getattr(b, name))
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        _equal(a.state[k], b.state[k])
    assert (a.seen, a.peak_entries, a.max_entries) == (b.seen, b.peak_entries, b.max_entries)
    if a.head_lens is not None:  # the host copy agrees with the device tensor
        assert a.host_lens() == tuple(a.head_lens.tolist())


def _same_view(a, b) -> None:
    for name in ("keys", "values", "positions", "valid"):
        _equal(getattr(a, name), getattr(b, name))
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        _equal(a.state[k], b.state[k])


def _ragged_layer(lens: tuple[int, ...], seed: int = 0, d: int = 4, state: bool = True) -> BudgetedLayer:
    """A ragged layer built by hand: random K/V (values wider than keys), ascending positions."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    layer = BudgetedLayer()
    layer.dtype, layer.device, layer.is_initialized = torch.float32, torch.device("cpu"), True
    layer.keys = torch.randn(n, d, generator=gen)
    layer.values = torch.randn(n, d + 2, generator=gen)
    layer.positions = torch.cat([torch.randperm(50, generator=gen)[:k].sort().values for k in lens]).to(torch.int32)
    layer.state = {"acc": torch.rand(n, generator=gen)} if state else {}
    layer.head_lens = torch.tensor(lens, dtype=torch.long)
    layer.seen = 50
    return layer


def _block(h: int, q: int, d: int = 4, seed: int = 1) -> tuple[Tensor, Tensor]:
    """New keys/values [1, H, q, d] laid out as a model makes them (a transposed view)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, q, h, d, generator=gen).transpose(1, 2)
    v = torch.randn(1, q, h, d + 2, generator=gen).transpose(1, 2)
    return k, v


def test_true_indices_is_nonzero_with_a_known_size():
    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 100):
        for p in (0.0, 0.3, 1.0):
            mask = torch.rand(n, generator=gen) < p
            _equal(true_indices(mask, int(mask.sum())), mask.nonzero()[:, 0])


@pytest.mark.parametrize("lens", LENS)
def test_ragged_padded_conversions_match_reference(lens):
    lens_t = torch.tensor(lens)
    gen = torch.Generator().manual_seed(len(lens))
    n = sum(lens)
    for flat, fill in ((torch.randn(n, 3, generator=gen), 0), (torch.arange(n, dtype=torch.int32), -1),
                       (torch.rand(n, generator=gen), 0)):
        padded = ref.ragged_to_padded(flat, lens_t, fill)
        _equal(ragged_to_padded(flat, lens_t, fill), padded)
        _equal(ragged_to_padded(flat, lens_t, fill, width=max(lens)), padded)
        _equal(padded_to_ragged(padded, lens_t), ref.padded_to_ragged(padded, lens_t))
        _equal(padded_to_ragged(padded, lens_t, total=n), flat)


@pytest.mark.parametrize("lens", LENS)
def test_view_matches_reference(lens):
    layer = _ragged_layer(lens)
    _same_view(layer.view(), ref.view(copy.deepcopy(layer)))
    assert layer.view().sizes == lens


@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("lens", LENS)
def test_update_matches_reference(lens, q):
    """Padded keys/values for the attention call, ragged storage after it, the plan's mask (GQA:
    2 query heads per KV head), and the same for tokens attended without being stored."""
    for transient in (False, True):
        new, old = _ragged_layer(lens), _ragged_layer(lens)
        new.transient = old.transient = transient
        k, v = _block(len(lens), q)
        got = new.update(k, v)
        new_plan = attention._take_plan(got[0])
        want = ref.update(old, k, v)
        old_plan = attention._take_plan(want[0])
        _equal(got[0], want[0])
        _equal(got[1], want[1])
        _same_layer(new, old)
        hq = 2 * len(lens)
        _equal(new_plan.mask(q, hq), ref.mask(old_plan, q, hq))
        assert (new_plan.n_old, new_plan.head_lens.tolist()) == (old_plan.n_old, old_plan.head_lens.tolist())


@pytest.mark.parametrize("lens", LENS)
def test_append_and_drop_last_match_reference(lens):
    new, old = _ragged_layer(lens), _ragged_layer(lens)
    add = torch.randn(len(lens), 3, 2)
    _equal(new._append_ragged(new.keys[:, :2], add), ref._append_ragged(old, old.keys[:, :2], add))
    k, v = _block(len(lens), 4)
    new.update(k, v)
    attention.discard_plan()  # no attention call here to take it
    ref.update(old, k, v)
    attention.discard_plan()
    new.drop_last(3)
    ref.drop_last(old, 3)
    _same_layer(new, old)


def _observation(lens: tuple[int, ...], n: int, budget: int, seed: int, special: bool) -> tuple[Tensor, Observation]:
    """Random tied scores over a padded view of ``lens`` (None valid when every head is full);
    ``special``: some valid entries score NaN or -inf (never kept)."""
    gen = torch.Generator().manual_seed(seed)
    h = len(lens)
    valid = torch.arange(n)[None, :] < torch.tensor(lens)[:, None]
    positions = torch.where(valid, torch.arange(n), -1)[None].to(torch.int32)
    scores = torch.randint(0, 6, (1, h, n), generator=gen).float()  # many ties
    if special:
        scores[torch.rand(1, h, n, generator=gen) < 0.2] = float("nan")
        scores[torch.rand(1, h, n, generator=gen) < 0.2] = float("-inf")
    obs = Observation(
        layer_idx=0, n_layers=1, keys=torch.zeros(1, h, n, 4), values=torch.zeros(1, h, n, 4),
        positions=positions, valid=None if all(k == n for k in lens) else valid[None], queries=None,
        query_positions=None, scaling=1.0, budget=budget, seen=n, seed=0,
    )
    return scores, obs


SELECT_CASES = [((9, 0, 4, 9), 6), ((9, 0, 4, 9), 40), ((5, 5), 3), ((12, 12, 12), 5), ((0, 0), 4), ((7, 2), 1)]


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("lens,budget", SELECT_CASES)
def test_select_across_heads_matches_reference(lens, budget, special):
    n = max(lens)
    for seed in range(6):
        scores, obs = _observation(lens, n, budget, seed, special)
        for window in (0, 2):
            for floor in (0.2, 0.5, 0.0):
                want = ref.select_across_heads(scores, obs, window, floor)
                got = select_across_heads(scores, obs, window, floor)
                _equal(got[0], want[0])
                _equal(got[1], want[1])
                chosen, lens_t, kept = pick_across_heads(scores, obs, window, floor)
                assert kept == tuple(want[1].tolist())
                _equal(lens_t, want[1])
                for h, k in enumerate(kept):
                    assert chosen[h].nonzero()[:, 0].tolist() == want[0][0, h, :k].tolist()


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("lens,budget", SELECT_CASES)
def test_keep_chosen_matches_reference_keep(lens, budget, special):
    """The policy's path (pick a mask, keep it) stores what select + keep stored: same entries,
    per-head lengths, state, and dense layout where every head keeps as many."""
    for seed in range(4):
        new, old = _ragged_layer(lens, seed), _ragged_layer(lens, seed)
        view, old_view = new.view(), ref.view(old)
        scores, obs = _observation(lens, max(lens), budget, seed, special)
        obs.positions, obs.valid = view.positions, view.valid
        chosen, lens_t, kept = pick_across_heads(scores, obs, 1)
        new.keep_chosen(chosen, lens_t, kept, view)
        index, lens_ref = ref.select_across_heads(scores, obs, 1)
        ref.keep(old, index, lens_ref, view=old_view)
        _same_layer(new, old)


def _widened(scores: Tensor, obs: Observation, width: int, seed: int) -> tuple[Tensor, Observation]:
    """The same layer padded to ``width``: tied random scores on the padding (which `_ranked`
    puts at -inf), positions -1, `valid` False there."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n = scores.shape
    pad = width - n
    wide = copy.copy(obs)
    wide.positions = torch.cat([obs.positions, obs.positions.new_full((b, h, pad), -1)], dim=-1)
    valid = torch.ones_like(obs.positions, dtype=torch.bool) if obs.valid is None else obs.valid
    wide.valid = torch.cat([valid, valid.new_zeros(b, h, pad)], dim=-1)
    return torch.cat([scores, torch.randint(0, 6, (b, h, pad), generator=gen).float()], dim=-1), wide


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("lens,budget", SELECT_CASES)
def test_adakv_picks_do_not_depend_on_padding(lens, budget, special):
    """Ada-KV's picks (ties to the lower index) are the same whether a layer's row is padded to
    a wider width or not, with many exactly tied scores: what lets the stacked path choose
    layers of any widths together."""
    n = max(lens)
    for seed in range(6):
        scores, obs = _observation(lens, n, budget, seed, special)
        for window in (0, 2):
            for floor in (0.2, 0.5, 0.0):
                chosen, lens_t, kept = pick_across_heads(scores, obs, window, floor)
                for width in (n + 1, n + 7, 3 * n + 2):
                    wide, wide_obs = _widened(scores, obs, width, seed)
                    got, got_lens, got_kept = pick_across_heads(wide, wide_obs, window, floor)
                    assert got_kept == kept
                    _equal(got_lens, lens_t)
                    _equal(got[:, :n], chosen)
                    assert not got[:, n:].any()


def test_adakv_choice_of_stacked_layers_is_each_layers_own():
    """`_choose` over layers of different widths and per-head lengths (so different counts to
    add after the guaranteed picks: heads shorter than the guarantee), stacked and padded to
    the widest, with tied, NaN and -inf scores: each layer's choice is the one it makes alone."""
    layer_lens = [(9, 0, 4, 9), (3, 3, 3, 3), (1, 12, 2, 0), (6, 6, 6, 6), (0, 0, 0, 0), (2, 1, 7, 5)]
    width = max(max(lens) for lens in layer_lens)
    for budget in (1, 3, 6, 20):
        for seed in range(4):
            alone, stacked = [], []
            for i, lens in enumerate(layer_lens):
                scores, obs = _observation(lens, max(lens), budget, 10 * seed + i, special=seed % 2 == 1)
                ranked = _ranked(scores, obs, 1)
                alone.append(_choose(ranked, 2, budget)[0])
                wide, wide_obs = _widened(scores, obs, width, seed)
                stacked.append(_ranked(wide, wide_obs, 1)[0])
            together = _choose(torch.stack(stacked), 2, budget)
            for got, want in zip(together, alone):
                n = want.shape[-1]
                _equal(got[:, :n], want)
                assert not got[:, n:].any()


def _snapshot(cache) -> list:
    out = []
    for layer in cache.budgeted_layers():
        view = layer.view()
        out.append([t.clone() for t in (view.positions, view.lengths, layer.keys, layer.values)]
                   + [None if layer.head_lens is None else layer.head_lens.clone()]
                   + [s.clone() for s in layer.state.values()])
    return out


def _run(model, name: str, kwargs: dict, query_aware: bool, stack: bool = True) -> dict:
    """Block-wise prefill (query-aware: scored by 6 extra tokens), greedy decoding with
    decode-time compression every 4 tokens, then the same inside `scratch` (rolled back).
    ``stack``: layers compressed together where they allow it (else the per-layer loop)."""
    policy = kb.policy(name, budget=24, block_size=16, decode_interval=4, **kwargs)
    policy.stack_layers = stack
    cache = policy.new_cache(model)
    scoring = random_ids(6, seed=9) if query_aware else None
    logits, _ = kb.prefill(model, cache, policy, random_ids(150, seed=5), scoring_ids=scoring)
    snaps, tokens = [_snapshot(cache)], []

    def decode(logits: Tensor, steps: int) -> Tensor:
        for step in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(int(tok))
            logits = model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1]
            if (step + 1) % policy.decode_interval == 0:
                policy.compress(cache)
                snaps.append(_snapshot(cache))
        return logits

    with torch.inference_mode():
        logits = decode(logits, 10)
        with cache.scratch():
            decode(logits, 6)
        snaps.append(_snapshot(cache))
        logits = decode(logits, 3)
    return {"tokens": tokens, "snaps": snaps, "logits": logits}


@pytest.mark.parametrize("query_aware", [False, True], ids=["self", "query-aware"])
# LazyEviction keeps per-entry state (gathered and appended with the entries, ragged too).
@pytest.mark.parametrize("name,kwargs", [("adakv", {}), ("lazy", {"heads": "adaptive"}),
                                         ("snapkv", {"heads": "adaptive", "window": 4})])
# Models without sliding-window layers: the reference code masks no window.
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_eager"])
def test_prefill_and_decoding_keep_what_the_reference_kept(request, monkeypatch, fixture, name, kwargs, query_aware):
    """End to end: the same kept positions, per-head lengths, K/V, state, tokens and logits after
    every compression as the replaced code (swapped in by `ragged_reference.use_reference`), which
    compresses layer by layer; the current code compresses the layers together."""
    model = request.getfixturevalue(fixture)
    got = _run(model, name, kwargs, query_aware)
    with monkeypatch.context() as m:
        ref.use_reference(m)
        assert BudgetedLayer.view is ref.view
        want = _run(model, name, kwargs, query_aware, stack=False)
    assert got["tokens"] == want["tokens"]
    assert len(got["snaps"]) == len(want["snaps"])
    for snap_got, snap_want in zip(got["snaps"], want["snaps"]):
        for layer_got, layer_want in zip(snap_got, snap_want):
            for a, b in zip(layer_got, layer_want, strict=True):
                _equal(a, b)
    _equal(got["logits"], want["logits"])
    assert any(s[4] is not None for snap in got["snaps"] for s in snap)


READS = frozenset({Tensor.tolist, Tensor.item, Tensor.__int__, Tensor.__bool__, Tensor.__float__, Tensor.__index__,
                   Tensor.nonzero, torch.nonzero})


class _HostReads(TorchFunctionMode):
    """Counts what would be a host<->device sync on a GPU: Python reads of tensor values, and
    boolean-mask indexing (its result's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS or (func in (Tensor.__getitem__, Tensor.__setitem__) and _bool_index(args[1])):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


def _counted(fn, reads: _HostReads):
    def wrapper(*args, **kwargs):
        with reads:
            return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("stack", [True, False], ids=["stacked", "loop"])
def test_adakv_reads_the_device_once_per_compression(tiny_llama, monkeypatch, stack):
    """The one remaining sync of a compression is reading the kept counts: once for all layers
    stacked together, however many groups they are chosen in (`Policy._compress_adaptive`),
    once per layer in the loop (`pick_across_heads`); a block over ragged layers (update +
    mask) reads nothing (it was nine per layer)."""
    policy = kb.policy("adakv", budget=24, block_size=16)
    policy.stack_layers = stack
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(100, seed=3))
    assert all(layer.head_lens is not None for layer in cache.budgeted_layers())
    reads = _HostReads()
    for cls, name in ((BudgetedLayer, "update"), (AttentionPlan, "mask")):
        monkeypatch.setattr(cls, name, _counted(getattr(cls, name), reads))
    groups = []
    choose = kb.Policy._choose_adaptive
    monkeypatch.setattr(kb.Policy, "_choose_adaptive", lambda self, layers, *a: groups.append(len(layers))
                        or choose(self, layers, *a))
    with torch.inference_mode():
        tiny_llama(input_ids=random_ids(16, seed=4), cache=cache, use_cache=True)
        assert reads.count == 0
        with _HostReads() as compress_reads:
            policy.compress(cache)
        assert compress_reads.count == (1 if stack else len(cache.budgeted))
        assert groups == ([len(cache.budgeted)] if stack else [])
        if stack:  # one layer per group: still one read
            policy.STACK_BYTES = 1
            groups.clear()
            tiny_llama(input_ids=random_ids(16, seed=5), cache=cache, use_cache=True)
            with _HostReads() as compress_reads:
                policy.compress(cache)
            assert compress_reads.count == 1
            assert groups == [1] * len(cache.budgeted)
