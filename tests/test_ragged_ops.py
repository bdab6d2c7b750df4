"""Ragged bookkeeping and Ada-KV selection without host<->device syncs: the ragged layout's
operations against per-head loops on random ragged inputs (heads with no entries included),
Ada-KV's choice against its rule written as a loop, the batched engine against the per-layer
reference end to end on the tiny models, and the host reads that remain."""

import copy

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import kvbudget as kb
from kvbudget.compress import Observation, batched, engine
from kvbudget.compress.select import choose, pick_across_heads, ranked, select_across_heads
from kvbudget.kv import plan as attention
from kvbudget.kv.layer import BudgetedLayer
from kvbudget.kv.plan import AttentionPlan
from kvbudget.kv.ragged import RaggedEntries, padded_to_ragged, ragged_to_padded, true_indices
from kvbudget.runtime.modelcall import run

from conftest import random_ids

LENS = [(3, 0, 5, 2), (0, 0, 0), (4, 4), (1,), (0, 7), (6, 1, 0, 0, 2, 9)]


def _equal(a: Tensor | None, b: Tensor | None) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b)


def _heads(flat: Tensor, lens: tuple[int, ...]) -> list[Tensor]:
    """A ragged field split per head."""
    return list(flat.split(list(lens)))


def _ragged_layer(lens: tuple[int, ...], seed: int = 0, d: int = 4, state: bool = True) -> BudgetedLayer:
    """A ragged layer built by hand: random K/V (values wider than keys), ascending positions."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    layer = BudgetedLayer()
    layer.dtype, layer.device, layer.is_initialized = torch.float32, torch.device("cpu"), True
    layer.entries = RaggedEntries(
        torch.randn(n, d, generator=gen), torch.randn(n, d + 2, generator=gen),
        torch.cat([torch.randperm(50, generator=gen)[:k].sort().values for k in lens]).to(torch.int32),
        {"acc": torch.rand(n, generator=gen)} if state else {},
        torch.tensor(lens, dtype=torch.long), tuple(lens))
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
def test_ragged_padded_conversions(lens):
    lens_t = torch.tensor(lens)
    gen = torch.Generator().manual_seed(len(lens))
    n, width = sum(lens), max(lens)
    for flat, fill in ((torch.randn(n, 3, generator=gen), 0), (torch.arange(n, dtype=torch.int32), -1),
                       (torch.rand(n, generator=gen), 0)):
        padded = ragged_to_padded(flat, lens_t, fill)
        assert padded.shape[:2] == (len(lens), width)
        for h, part in enumerate(_heads(flat, lens)):
            _equal(padded[h, : lens[h]], part)
            assert (padded[h, lens[h]:] == fill).all()
        _equal(ragged_to_padded(flat, lens_t, fill, width=width), padded)
        _equal(padded_to_ragged(padded, lens_t), flat)
        _equal(padded_to_ragged(padded, lens_t, total=n), flat)


@pytest.mark.parametrize("lens", LENS)
def test_view_pads_each_head(lens):
    layer = _ragged_layer(lens)
    view, e = layer.view(), layer.entries
    assert view.sizes == lens and view.valid[0].sum(-1).tolist() == list(lens)
    for h, (k, v, p, s) in enumerate(zip(_heads(e.keys, lens), _heads(e.values, lens), _heads(e.positions, lens),
                                         _heads(e.state["acc"], lens))):
        n = lens[h]
        _equal(view.keys[0, h, :n], k)
        _equal(view.values[0, h, :n], v)
        _equal(view.positions[0, h, :n], p)
        _equal(view.state["acc"][0, h, :n], s)
        assert (view.positions[0, h, n:] == -1).all()


@pytest.mark.parametrize("q", [1, 5])
@pytest.mark.parametrize("lens", LENS)
def test_update_appends_to_each_head(lens, q):
    """The attention call sees [old entries | padding | new tokens] per head, with a mask that
    hides the padding and is causal in the block (GQA: 2 query heads per KV head); storage stays
    ragged, each head grown by q; tokens attended without being stored leave it as it was."""
    for transient in (False, True):
        layer = _ragged_layer(lens)
        before = copy.deepcopy(layer.entries)
        layer.transient = transient
        k, v = _block(len(lens), q)
        keys, values = layer.update(k, v)
        plan = attention.take_plan(keys)
        n_old = max(lens)
        assert plan.n_old == n_old and plan.head_lens.tolist() == list(lens)
        mask = plan.mask(q, 2 * len(lens))[0]
        for h, n in enumerate(lens):
            _equal(keys[0, h, :n], _heads(before.keys, lens)[h])
            _equal(keys[0, h, n_old:], k[0, h])
            _equal(values[0, h, n_old:], v[0, h])
            for g in (2 * h, 2 * h + 1):
                want = torch.zeros(q, n_old + q, dtype=torch.bool)
                want[:, :n] = True
                want[:, n_old:] = torch.ones(q, q, dtype=torch.bool).tril()
                _equal(mask[g], want)
        e = layer.entries
        if transient:
            _equal(e.keys, before.keys)
            assert e.sizes == lens
            continue
        grown = tuple(n + q for n in lens)
        assert e.sizes == grown and e.head_lens.tolist() == list(grown)
        for h, n in enumerate(lens):
            _equal(_heads(e.keys, grown)[h], torch.cat([_heads(before.keys, lens)[h], k[0, h]]))
            _equal(_heads(e.positions, grown)[h][n:], torch.arange(50, 50 + q, dtype=torch.int32))
            assert (_heads(e.state["acc"], grown)[h][n:] == 0).all()


@pytest.mark.parametrize("lens", LENS)
def test_append_rows_and_drop_last(lens):
    layer = _ragged_layer(lens)
    e = layer.entries
    add = torch.randn(len(lens), 3, 2)
    out = e.append_rows(e.keys[:, :2], add)
    for h, n in enumerate(lens):
        _equal(_heads(out, tuple(k + 3 for k in lens))[h], torch.cat([_heads(e.keys[:, :2], lens)[h], add[h]]))
    before = copy.deepcopy(layer.entries)
    k, v = _block(len(lens), 4)
    layer.update(k, v)
    attention.discard_plan()  # no attention call here to take it
    layer.drop_last(4)
    for name in ("keys", "values", "positions"):
        _equal(getattr(layer.entries, name), getattr(before, name))
    _equal(layer.entries.state["acc"], before.state["acc"])
    assert layer.entries.sizes == lens and layer.seen == 50


def _ada_kv_rule(scores: Tensor, obs: Observation, window: int, floor: float) -> list[list[int]]:
    """Ada-KV's choice as a loop: each head first keeps its best floor*budget entries, then the
    layer its best among the rest over all heads, up to budget * H in all; never an entry at
    -inf (padding, NaN); ties to the lower index (heads in order, then entries)."""
    r = ranked(scores, obs, window)[0]
    h, n = r.shape
    budget = obs.budget
    kept: list[set[int]] = [set() for _ in range(h)]
    for head in range(h):
        order = sorted(range(n), key=lambda i: (-r[head, i].item(), i))
        kept[head] = {i for i in order[: min(int(floor * budget), n)] if r[head, i] > float("-inf")}
    rest = sorted(((-r[hd, i].item(), hd * n + i) for hd in range(h) for i in range(n)
                   if i not in kept[hd] and r[hd, i] > float("-inf")))
    for _, flat in rest[: max(budget * h - sum(map(len, kept)), 0)]:
        kept[flat // n].add(flat % n)
    return [sorted(k) for k in kept]


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
def test_select_across_heads_follows_the_rule(lens, budget, special):
    n = max(lens)
    for seed in range(6):
        scores, obs = _observation(lens, n, budget, seed, special)
        for window in (0, 2):
            for floor in (0.2, 0.5, 0.0):
                want = _ada_kv_rule(scores, obs, window, floor)
                index, got_lens = select_across_heads(scores, obs, window, floor)
                chosen, lens_t, kept = pick_across_heads(scores, obs, window, floor)
                assert kept == tuple(len(k) for k in want) == tuple(got_lens.tolist())
                _equal(lens_t, got_lens)
                for h, k in enumerate(want):
                    assert chosen[h].nonzero()[:, 0].tolist() == k == index[0, h, : len(k)].tolist()


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("lens,budget", SELECT_CASES)
def test_keep_chosen_keeps_the_chosen_entries(lens, budget, special):
    """The engine's path (pick a mask, keep it) stores what select_across_heads + keep store:
    the same entries, per-head lengths and state, dense where every head keeps as many."""
    for seed in range(4):
        new, old = _ragged_layer(lens, seed), _ragged_layer(lens, seed)
        view = new.view()
        scores, obs = _observation(lens, max(lens), budget, seed, special)
        obs.positions, obs.valid = view.positions, view.valid
        chosen, lens_t, kept = pick_across_heads(scores, obs, 1)
        new.hold(RaggedEntries.chosen(view, chosen, lens_t, kept))
        index, lens_ref = select_across_heads(scores, obs, 1)
        old.keep(index, lens_ref, view=old.view())
        a, b = new.view(), old.view()
        for name in ("keys", "values", "positions"):
            _equal(getattr(a, name), getattr(b, name))
        _equal(a.state["acc"], b.state["acc"])
        assert type(new.entries) is type(old.entries)


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
                alone.append(choose(ranked(scores, obs, 1), 2, budget)[0])
                wide, wide_obs = _widened(scores, obs, width, seed)
                stacked.append(ranked(wide, wide_obs, 1)[0])
            together = choose(torch.stack(stacked), 2, budget)
            for got, want in zip(together, alone):
                n = want.shape[-1]
                _equal(got[:, :n], want)
                assert not got[:, n:].any()


def _snapshot(cache) -> list:
    out = []
    for layer in cache.layers:
        view, e = layer.view(), layer.entries
        out.append([t.clone() for t in (view.positions, view.lengths, e.keys, e.values)]
                   + [e.head_lens.clone() if isinstance(e, RaggedEntries) else None]
                   + [s.clone() for s in e.state.values()])
    return out


def _run(model, name: str, kwargs: dict, query_aware: bool) -> dict:
    """Block-wise prefill (query-aware: scored by 6 extra tokens), greedy decoding with
    decode-time compression every 4 tokens, then the same inside `scratch` (rolled back)."""
    policy = kb.policy(name, budget=24, decode_interval=4, **kwargs)
    cache = policy.new_cache(model)
    scoring = random_ids(6, seed=9) if query_aware else None
    logits, _ = kb.prefill(model, cache, policy, random_ids(150, seed=5), 16, scoring_ids=scoring)
    snaps, tokens = [_snapshot(cache)], []

    def decode(logits: Tensor, steps: int) -> Tensor:
        for step in range(steps):
            tok = logits.argmax(-1, keepdim=True)
            tokens.append(int(tok))
            logits = run(model, cache, tok).logits[:, -1]
            if (step + 1) % policy.decode_interval == 0:
                kb.compress(cache, policy)
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
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_eager", "tiny_gemma"])
def test_batched_engine_keeps_what_the_reference_path_keeps(request, monkeypatch, fixture, name, kwargs, query_aware):
    """End to end: the same kept positions, per-head lengths, K/V, state, tokens and logits after
    every compression whether the layers are compressed together or one by one."""
    model = request.getfixturevalue(fixture)
    got = _run(model, name, kwargs, query_aware)
    with monkeypatch.context() as m:
        m.setattr(engine, "BATCHED", False)
        want = _run(model, name, kwargs, query_aware)
    assert got["tokens"] == want["tokens"]
    assert len(got["snaps"]) == len(want["snaps"])
    for snap_got, snap_want in zip(got["snaps"], want["snaps"]):
        for layer_got, layer_want in zip(snap_got, snap_want):
            for a, b in zip(layer_got, layer_want, strict=True):
                _equal(a, b)
    _equal(got["logits"], want["logits"])
    if fixture != "tiny_gemma":  # one KV head: every head keeps as many, nothing is ragged
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


@pytest.mark.parametrize("stack", [True, False], ids=["batched", "loop"])
def test_adakv_reads_the_device_once_per_compression(tiny_llama, monkeypatch, stack):
    """The one remaining host read of a compression is the kept counts: once for all layers
    compressed together, however many groups they are chosen in, once per layer in the
    reference loop (`pick_across_heads`); a block over ragged layers (update + mask) reads
    nothing."""
    monkeypatch.setattr(engine, "BATCHED", stack)
    policy = kb.policy("adakv", budget=24)
    cache = policy.new_cache(tiny_llama)
    kb.prefill(tiny_llama, cache, policy, random_ids(100, seed=3), 16)
    assert all(isinstance(layer.entries, RaggedEntries) for layer in cache.layers)
    reads = _HostReads()
    for cls, name in ((BudgetedLayer, "update"), (AttentionPlan, "mask")):
        monkeypatch.setattr(cls, name, _counted(getattr(cls, name), reads))
    groups = []
    chosen = batched._choose
    monkeypatch.setattr(batched, "_choose", lambda policy, layers, *a: groups.append(len(layers))
                        or chosen(policy, layers, *a))
    with torch.inference_mode():
        run(tiny_llama, cache, random_ids(16, seed=4))
        assert reads.count == 0
        with _HostReads() as compress_reads:
            kb.compress(cache, policy)
        assert compress_reads.count == (1 if stack else len(cache.layers))
        assert groups == ([len(cache.layers)] if stack else [])
        if stack:  # one layer per group: still one read
            monkeypatch.setattr(batched, "GROUP_BYTES", 1)
            groups.clear()
            run(tiny_llama, cache, random_ids(16, seed=5))
            with _HostReads() as compress_reads:
                kb.compress(cache, policy)
            assert compress_reads.count == 1
            assert groups == [1] * len(cache.layers)
