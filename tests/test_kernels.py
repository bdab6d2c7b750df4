"""Decode kernels (kvbudget.kernels): the Triton kernels run under Triton's interpreter on CPU
tensors and must match a float64 reference; the dispatch falls back to the torch path on CPU.

CI has no GPU: TRITON_INTERPRET=1 makes the same kernel source run in numpy. It must be set
before triton is first imported: conftest.py sets it (transformers imports triton there), and
so does the top of this module for a run without that conftest.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e .[dev] on Linux)")

import triton.runtime.interpreter as _interp

import kvbudget.kernels as K
from kvbudget.kernels import kivi_decode as KD
from kvbudget.kernels import varlen_decode as VD
from kvbudget.methods.stores.kivi import KIVI
from kvbudget.kv.body import rebuild_body

INTERPRETED = isinstance(triton.language.zeros, _interp.InterpretedFunction)
if not INTERPRETED:
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set: the kernels cannot run on CPU. "
        "Set it in the environment or at the top of conftest.py."
    )


def _shim_numpy_24() -> None:
    """triton 3.6's interpreter converts its one-element scalar arrays with int(array), which
    numpy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream after 3.6): a loop like
    ``range(lo, hi)`` with runtime bounds then fails in the interpreter only. Take the element."""
    original = _interp._patch_lang_tensor
    if getattr(original, "_kvbudget_shim", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._kvbudget_shim = True
    _interp._patch_lang_tensor = patched


_shim_numpy_24()

# bfloat16: the interpreter's float32 -> bfloat16 casts truncate (the GPU rounds to nearest), which
# biases dequantised values and probabilities by ~0.3%: CPU errors reach ~1e-2, GPU ones ~2e-3.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
GQA = [(4, 2), (8, 2)]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Scratch buffers start as NaN, so a slot a kernel forgets to write shows up."""
    real = VD.new_partials

    def new_partials(q, splits, dv):
        o, lse = real(q, splits, dv)
        return o.fill_(float("nan")), lse.fill_(float("nan"))

    monkeypatch.setattr(VD, "new_partials", new_partials)
    monkeypatch.setattr(KD, "new_partials", new_partials)


def _nan_out(b, hq, dv, dtype):
    return torch.full((b, hq, dv), float("nan"), dtype=dtype)


def _naive(q, heads_k, heads_v, scale):
    """Float64 ground truth: one head at a time. heads_k[b][h]: [n, D] (n may be 0)."""
    b, hq, _ = q.shape
    hkv = len(heads_k[0])
    g = hq // hkv
    out = torch.zeros(b, hq, heads_v[0][0].shape[-1], dtype=torch.float64)
    for i in range(b):
        for j in range(hq):
            k, v = heads_k[i][j // g].double(), heads_v[i][j // g].double()
            if k.shape[0]:
                p = torch.softmax(k @ q[i, j].double() * scale, dim=0)
                out[i, j] = p @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_dense_decode_matches_float64(poisoned, dtype, d, hq, hkv):
    gen = torch.Generator().manual_seed(hash((str(dtype), d, hq)) % 2**31)
    b, cap = 2, 200
    # A view of a larger buffer (static capacity with room to spare): strides, not a copy.
    big_k = torch.randn(b, hkv, cap + 37, d, generator=gen).to(dtype)
    big_v = torch.randn(b, hkv, cap + 37, d, generator=gen).to(dtype)
    k, v = big_k[:, :, :cap], big_v[:, :, :cap]
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    lens = torch.tensor([[0, 1], [130, 200]], dtype=torch.int32)  # empty, one, non-multiple of 64, full
    scale = d**-0.5
    ref = _naive(q, [[k[i, h, : lens[i, h]] for h in range(hkv)] for i in range(b)],
                 [[v[i, h, : lens[i, h]] for h in range(hkv)] for i in range(b)], scale)
    for splits in (None, 1, 3):
        out = VD.decode_attention(q, k, v, lens, scale, num_splits=splits, out=_nan_out(b, hq, d, dtype))
        assert out.dtype == dtype and out.shape == (b, hq, d)
        assert _rel(out, ref) < TOL[dtype], splits
        assert (out[0, : hq // hkv] == 0).all()  # a head of length 0 gives zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_ragged_decode_matches_float64(poisoned, dtype, hq, hkv):
    gen = torch.Generator().manual_seed(11 + hq)
    b, d, dv = 3, 64, 128  # value dim differs from key dim
    lens = torch.tensor([0, 1, 64, 65, 250, 7], dtype=torch.int32)[: b * hkv]
    # Heads laid out in a shuffled order with gaps between them.
    order = torch.randperm(b * hkv, generator=gen)
    starts = torch.zeros(b * hkv, dtype=torch.int64)
    pos = 5
    for i in order.tolist():
        starts[i] = pos
        pos += int(lens[i]) + 3
    k = torch.randn(pos, d, generator=gen).to(dtype)
    v = torch.randn(pos, dv, generator=gen).to(dtype)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    heads = [[slice(int(starts[i * hkv + h]), int(starts[i * hkv + h] + lens[i * hkv + h])) for h in range(hkv)] for i in range(b)]
    ref = _naive(q, [[k[s] for s in row] for row in heads], [[v[s] for s in row] for row in heads], 0.1)
    out = VD.varlen_decode_attention(q, k, v, starts, lens, 0.1, num_splits=4)
    assert out.shape == (b, hq, dv) and _rel(out, ref) < TOL[dtype]
    out = VD.varlen_decode_attention(q, k, v, starts, lens, 0.1)  # max_len read from lens
    assert _rel(out, ref) < TOL[dtype]
    # An under-estimated max_len only slows down: the last split runs to each head's end.
    out = VD.varlen_decode_attention(q, k, v, starts, lens, 0.1, max_len=64, num_splits=2)
    assert _rel(out, ref) < TOL[dtype]


def _naive_extras(q, heads_k, heads_v, heads_pos, qpos, scale, softcap, sinks, window):
    """Float64 ground truth with softcapping, sinks and a sliding window, one head at a time."""
    b, hq, _ = q.shape
    hkv = len(heads_k[0])
    g = hq // hkv
    out = torch.zeros(b, hq, heads_v[0][0].shape[-1], dtype=torch.float64)
    for i in range(b):
        for j in range(hq):
            k, v, pos = heads_k[i][j // g].double(), heads_v[i][j // g].double(), heads_pos[i][j // g]
            logits = k @ q[i, j].double() * scale
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            if window:
                logits = logits.masked_fill(pos <= qpos[i] - window, float("-inf"))
            if sinks is not None:
                logits = torch.cat([logits, sinks[j : j + 1].double()])
            p = torch.softmax(logits, dim=0) if logits.numel() else logits
            p = torch.nan_to_num(p[: k.shape[0]])
            out[i, j] = p @ v
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extra", ["softcap", "sinks", "window", "all"])
def test_ragged_decode_with_softcap_sinks_and_window(poisoned, dtype, extra):
    """What Gemma 2 (softcapping), GPT-OSS (sinks) and sliding-window layers add: the Triton
    kernel and the torch reference both match float64, heads of 0 entries and heads whose every
    entry lies outside the window included."""
    gen = torch.Generator().manual_seed(5)
    b, hq, hkv, d = 2, 4, 2, 64
    lens = torch.tensor([0, 70, 130, 9], dtype=torch.int32)
    starts = torch.cumsum(lens.long() + 2, 0) - lens.long() - 2
    n = int(starts[-1] + lens[-1])
    k = torch.randn(n, d, generator=gen).to(dtype) * 2
    v = torch.randn(n, d, generator=gen).to(dtype)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    # Positions ascend within a head with gaps (entries evicted); the last head ends far back.
    kpos = torch.zeros(n, dtype=torch.int32)
    for i in range(b * hkv):
        s, m = int(starts[i]), int(lens[i])
        kpos[s : s + m] = torch.sort(torch.randperm(300, generator=gen)[:m]).values.to(torch.int32)
    qpos = torch.tensor([300, 400])
    kw = {"softcap": 5.0 if extra in ("softcap", "all") else None,
          "sinks": torch.randn(hq, generator=gen) if extra in ("sinks", "all") else None,
          "window": 96 if extra in ("window", "all") else None}
    if kw["window"]:
        kw.update(kpos=kpos, qpos=qpos)
    heads = [[slice(int(starts[i * hkv + h]), int(starts[i * hkv + h] + lens[i * hkv + h])) for h in range(hkv)]
             for i in range(b)]
    ref = _naive_extras(q, [[k[s] for s in row] for row in heads], [[v[s] for s in row] for row in heads],
                        [[kpos[s] for s in row] for row in heads], qpos, 0.1, kw["softcap"], kw["sinks"], kw["window"])
    for fn in (VD.varlen_decode_attention, K.reference_varlen_decode_attention):
        out = fn(q, k, v, starts, lens, 0.1, num_splits=3, **kw)
        assert out.shape == (b, hq, d) and _rel(out, ref) < TOL[dtype], fn.__name__
    if kw["window"]:  # the second batch's second head: every entry lies before the window
        assert int(kpos[int(starts[3]) : int(starts[3] + lens[3])].max()) <= 400 - 96
        assert (out[1, 2:] == 0).all()


def test_split_choice_fills_the_machine():
    splits, per = VD.choose_splits(programs=8, max_len=32768, block_n=64, sms=132)
    assert 8 * splits >= 132 and per % 64 == 0 and splits * per >= 32768
    assert VD.choose_splits(programs=256, max_len=2048, block_n=64, sms=132)[0] == 2
    assert VD.choose_splits(programs=8, max_len=10, block_n=64, sms=132) == (1, 64)
    assert VD.choose_splits(programs=8, max_len=0, block_n=64, sms=132) == (1, 64)


def _kivi_layer(store, b, hkv, d, dtype, gen, m=300, tail=30):
    """A real KIVI body built by the store machinery: encode ``m - 44`` entries (a partial last
    chunk included), then evict a random subset per head (chunk ids become irregular, emptied
    chunks are dropped) and encode more tail entries into the body."""
    k = torch.randn(b, hkv, m, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, m, d, generator=gen).to(dtype)
    k[..., 3] *= 8  # an outlier channel, as in real keys
    idx = torch.arange(m).expand(b, hkv, m)
    body, tk, tv = rebuild_body(store, None, k, v, idx, 44, None)
    nb, keep = len(body), 150
    sel = torch.stack([torch.randperm(nb, generator=gen)[:keep].sort().values for _ in range(b * hkv)]).view(b, hkv, keep)
    idx = torch.cat([sel, nb + torch.arange(44).expand(b, hkv, 44)], -1)
    return rebuild_body(store, body, tk, tv, idx, tail, None)


def _dequant_then_attend(q, body, store, tk, tv, scale, body_lens=None, tail_lens=None):
    """What kvbudget does today: decode the body in the model dtype, then attend (float64)."""
    bk, bv = body.decode(store, tk.dtype)
    b, hkv = tk.shape[:2]
    bl = body_lens if body_lens is not None else torch.full((b, hkv), bk.shape[2])
    tl_ = tail_lens if tail_lens is not None else torch.full((b, hkv), tk.shape[2])
    return _naive(
        q,
        [[torch.cat([bk[i, h, : bl[i, h]], tk[i, h, : tl_[i, h]]]) for h in range(hkv)] for i in range(b)],
        [[torch.cat([bv[i, h, : bl[i, h]], tv[i, h, : tl_[i, h]]]) for h in range(hkv)] for i in range(b)],
        scale,
    )


# (d, hq, hkv, dtype, bits): every head size, dtype and bit width runs once in CI (the Triton
# interpreter's time); the whole grid in `make test-slow`.
KIVI_FUSED = [(d, hq, hkv, dtype, bits) for d, hq, hkv in [(128, 4, 2), (64, 8, 2)]
              for dtype in (torch.float32, torch.bfloat16) for bits in (2, 4)]
KIVI_FUSED_CI = [(128, 4, 2, torch.bfloat16, 4), (64, 8, 2, torch.float32, 2)]


@pytest.mark.parametrize(("d", "hq", "hkv", "dtype", "bits"),
                         [c if c in KIVI_FUSED_CI else pytest.param(*c, marks=pytest.mark.slow) for c in KIVI_FUSED])
def test_kivi_fused_equals_dequantize_then_attend(poisoned, bits, dtype, d, hq, hkv):
    gen = torch.Generator().manual_seed(bits * 1000 + d + hq)
    store = KIVI(bits=bits)
    b = 2
    body, tk, tv = _kivi_layer(store, b, hkv, d, dtype, gen)
    assert body.chunk_id is not None and len(body) > 64
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    scale = d**-0.5
    assert KD.kivi_supported(q, body, store, tk) is None
    ref = _dequant_then_attend(q, body, store, tk, tv, scale)
    out = KD.kivi_decode_attention(q, body, store, tk, tv, scale, num_splits=3, out=_nan_out(b, hq, d, dtype))
    assert out.dtype == dtype and _rel(out, ref) < TOL[dtype]
    out = KD.kivi_decode_attention(q, body, store, tk, tv, scale)  # automatic split count
    assert _rel(out, ref) < TOL[dtype]
    # Per-head lengths (a static-capacity layout): an empty body head, an empty tail head.
    body_lens = torch.tensor([[0, 70], [len(body), 1]], dtype=torch.int32)
    tail_lens = torch.tensor([[5, 0], [tk.shape[2], 17]], dtype=torch.int32)
    ref = _dequant_then_attend(q, body, store, tk, tv, scale, body_lens, tail_lens)
    out = KD.kivi_decode_attention(q, body, store, tk, tv, scale, tail_lens=tail_lens, body_lens=body_lens, num_splits=2)
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_kivi_fold_handles_any_chunk_ids(poisoned, order):
    """Blocks over many chunks, gaps in the ids (evicted chunks never freed), single-entry chunks,
    ids out of order: the fold kernel (one scale row per chunk) still equals dequantise-then-attend."""
    gen = torch.Generator().manual_seed(21)
    store = KIVI(bits=4)
    b, hkv, hq, d, dtype = 2, 2, 4, 64, torch.float32
    body, tk, tv = _kivi_layer(store, b, hkv, d, dtype, gen)
    n, c = len(body), body.chunks["k_scale"].shape[2]
    # Ids: runs of 1..40 entries, then jumps of 1..3 chunks (wrapping inside the table).
    steps = (torch.rand(b, hkv, n, generator=gen) < 0.15).long() * torch.randint(1, 4, (b, hkv, n), generator=gen)
    ids = steps.cumsum(-1) % c
    if order == "shuffled":
        ids = ids.gather(-1, torch.stack([torch.randperm(n, generator=gen) for _ in range(b * hkv)]).view(b, hkv, n))
    body.chunk_id = ids.to(torch.int16)
    q = torch.randn(b, hq, d, generator=gen).to(dtype)
    ref = _dequant_then_attend(q, body, store, tk, tv, 0.125)
    assert KD.fold_supported(q, body, d, d, 32)
    for splits in (None, 1, 5):
        out = KD.kivi_decode_attention(q, body, store, tk, tv, 0.125, num_splits=splits)
        assert _rel(out, ref) < TOL[dtype], splits


def _run_unpack_ptx(asm: str, word: int, fp16: bool) -> list[float]:
    """The few PTX instructions `kivi_parts._unpack_asm` emits, executed in Python on one 32-bit
    input register ``$2``: the four 16-bit results of ``$0``, ``$1`` as floats."""
    to_float = (lambda h: float(torch.tensor([h], dtype=torch.int32).to(torch.int16).view(torch.float16))) if fp16 \
        else (lambda h: float(torch.tensor([h << 16], dtype=torch.int64).to(torch.int32).view(torch.float32)))
    regs: dict[str, object] = {"$2": word}

    def val(x: str) -> int:
        return regs[x] if x in regs else int(x, 0)  # type: ignore[return-value]

    for ins in (i.strip() for i in asm.strip("{} ").split(";")):
        if not ins or ins.startswith(".reg"):
            continue
        op, *args = ins.replace(",", " ").split()
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "prmt.b32":  # bytes of {b, a}, one selector nibble per result byte
            pool = [(val(args[1]) >> 8 * i) & 255 for i in range(4)] + [(val(args[2]) >> 8 * i) & 255 for i in range(4)]
            regs[args[0]] = sum(pool[(val(args[3]) >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "shl.b32":
            regs[args[0]] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "lop3.b32":
            assert args[4] == "0xEA"  # (a & b) | c
            regs[args[0]] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op in ("sub.rn.bf16x2", "sub.rn.f16x2"):
            a, b = val(args[1]), val(args[2])
            regs[args[0]] = [to_float((a >> 16 * i) & 0xFFFF) - to_float((b >> 16 * i) & 0xFFFF) for i in range(2)]
        else:
            raise AssertionError(f"unexpected PTX instruction {op}")
    return regs["$0"] + regs["$1"]  # type: ignore[operator]


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_parts_ptx_unpack_gives_the_centred_codes(bits, fp16):
    """The GPU path of the parts body unpacks codes with inline PTX, which CI cannot run: executed
    instruction by instruction here, it must give ``(field_s - centre) / 2**bits`` for every byte
    value, sub-position, both centres (keys 2^(b-1), values (2^b - 1)/2) and both dtypes, in byte
    order (element i of the four from byte i), exactly as the interpreter path does. The
    subtraction's operands and result are exact in 16 bits, so float arithmetic here is exact."""
    from kvbudget.kernels.kivi_parts import _unpack_asm

    gen = torch.Generator().manual_seed(bits)
    words = torch.randint(0, 2**32, (64,), generator=gen, dtype=torch.int64).tolist() + [0, 0xFFFFFFFF, 0x0F1E2D3C]
    for centre in (1 << (bits - 1), ((1 << bits) - 1) / 2):
        for s in range(8 // bits):
            asm = _unpack_asm.fn(bits, s, centre, fp16)
            for w in words:
                got = _run_unpack_ptx(asm, w, fp16)
                want = [(((w >> 8 * i >> bits * s) & ((1 << bits) - 1)) - centre) / (1 << bits) for i in range(4)]
                assert got == want, (bits, s, centre, hex(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kivi_gather_kernel_and_odd_head_dims(poisoned, monkeypatch, dtype):
    """The general kernel (`_kivi_stage_kernel`): forced, and chosen for a head dim that is not a
    power of two."""
    gen = torch.Generator().manual_seed(31)
    store = KIVI(bits=4)
    for d in (64, 96):
        body, tk, tv = _kivi_layer(store, 2, 2, d, dtype, gen)
        q = torch.randn(2, 4, d, generator=gen).to(dtype)
        ref = _dequant_then_attend(q, body, store, tk, tv, d**-0.5)
        assert KD.fold_supported(q, body, d, d, 32) == (d == 64)
        with monkeypatch.context() as m:
            if d == 64:
                m.setattr(KD, "fold_supported", lambda *a: False)
            out = KD.kivi_decode_attention(q, body, store, tk, tv, d**-0.5, num_splits=3)
        assert _rel(out, ref) < TOL[dtype], d


def test_kivi_fused_on_a_prefilled_layer(poisoned):
    """A layer filled by the real prefill loop (snapkv eviction + kivi4): the fused kernel over
    its body and tail equals attention over the decoded entries (`LayerView`: dequantized body,
    then tail)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import kvbudget as kb
    from kvbudget.kv.hook import attach

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    attach(model)
    policy = kb.policy("snapkv+kivi4", budget=160, residual=32)
    cache = policy.new_cache(model)
    kb.prefill(model, cache, policy, torch.randint(0, 96, (1, 300)), 64)
    layer = cache.layers[0]
    assert layer.entries.body is not None and isinstance(layer.store, KIVI)
    view = layer.view()
    keys, values = view.keys, view.values
    q = torch.randn(1, 4, 64)
    ref = _naive(q, [[keys[0, h] for h in range(2)]], [[values[0, h] for h in range(2)]], 0.125)
    out = KD.kivi_decode_attention(q, layer.entries.body, layer.store, layer.keys, layer.values, 0.125)
    assert _rel(out, ref) < TOL[torch.float32]


def test_dispatch_uses_the_torch_path_on_cpu(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 64, generator=gen)
    k, v = torch.randn(1, 2, 90, 64, generator=gen), torch.randn(1, 2, 90, 64, generator=gen)
    lens = torch.tensor([[0, 77]])
    calls = []
    monkeypatch.setattr(VD, "decode_attention", lambda *a, **kw: calls.append(1))
    out = K.decode_attention(q, k, v, lens, 0.125)
    assert not calls  # CPU tensors never reach the Triton path outside the interpreter tests
    assert torch.equal(out, K.reference_decode_attention(q, k, v, lens, 0.125))
    monkeypatch.undo()
    assert _rel(out, VD.decode_attention(q, k, v, lens, 0.125)) < 1e-5
    assert torch.equal(out[0, :2], torch.zeros(2, 64))
    flat_k, flat_v = k[0].reshape(-1, 64), v[0].reshape(-1, 64)
    starts = torch.tensor([0, 90])
    ragged = K.varlen_decode_attention(q, flat_k, flat_v, starts, lens[0], 0.125)
    assert torch.allclose(ragged, out, atol=1e-6)


def test_kivi_dispatch_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    from kvbudget.methods.stores.mikv import MiKV

    gen = torch.Generator().manual_seed(6)
    store = KIVI(bits=4)
    body, tk, tv = _kivi_layer(store, 1, 2, 64, torch.float32, gen)
    q = torch.randn(1, 4, 64, generator=gen)
    out = K.kivi_decode_attention(q, body, store, tk, tv, 0.125)
    ref = K.reference_kivi_decode_attention(q, body, store, tk, tv, 0.125)
    assert torch.equal(out, ref)
    assert _rel(ref, _dequant_then_attend(q, body, store, tk, tv, 0.125)) < 1e-5
    assert "not plain KIVI" in KD.kivi_supported(q, body, MiKV(), tk)
    small = KIVI(bits=2)
    body2, tk2, _ = _kivi_layer(small, 1, 2, 32, torch.float32, gen)
    assert "too small" in KD.kivi_supported(torch.randn(1, 4, 32), body2, small, tk2)
    assert K.HAVE_TRITON
    # Only a tail (nothing encoded yet): the varlen kernel alone.
    out = KD.kivi_decode_attention(q, None, store, tk, tv, 0.125)
    assert _rel(out, _naive(q, [[tk[0, h] for h in range(2)]], [[tv[0, h] for h in range(2)]], 0.125)) < 1e-5


KIVI_COMPILE = r'''
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvbudget.kernels import kivi_decode as KD

fn = KD._kivi_fold_kernel
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
for dt in ("bf16", "fp32"):
    block_n, warps, stages, _, maxnreg = KD.FOLD_CONFIG_FP32 if dt == "fp32" else KD.FOLD_CONFIG
    for bits in (4, 2):
        consts = dict(BITS=bits, PACK=8 // bits, GV=32, NG=4, BLOCK_N=block_n, BLOCK_D=128, BLOCK_DV=128,
                      G_PAD=max(KD.FOLD_MIN_ROWS, 4), HAS_LENS=False, TAIL_LENS=False, TAIL_BLOCK=KD.TAIL_BLOCK_FOLD,
                      DOT_PREC="ieee" if dt == "fp32" else "tf32", UPCAST=False, stride_qd=1, stride_kcj=1,
                      stride_vcj=1, stride_vsg=1, stride_td=1, stride_cn=1, stride_tkd=1, stride_tvd=1,
                      ASM=dt == "bf16")
        names = [a for a in fn.arg_names if a not in consts]
        ptr = {"kc_ptr": "*u8", "vc_ptr": "*u8", "cid_ptr": "*i16", "blens_ptr": "*i32", "tlens_ptr": "*i32",
               "po_ptr": "*fp32", "plse_ptr": "*fp32"}
        sig = {a: (ptr.get(a, f"*{dt}") if a.endswith("_ptr") else "fp32" if a == "qk_scale"
                   else "i64" if a.startswith("stride") else "i32") for a in names}
        sig |= {k: "constexpr" for k in consts}
        where = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        # What the launcher specialises for real tensors: 16-byte aligned pointers and strides.
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in names
                 if a.endswith("_ptr") or (a.startswith("stride") and a != "stride_cn")}
        opts = {"num_warps": warps, "num_stages": stages, **({"maxnreg": maxnreg} if maxnreg else {})}
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=where, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=opts)
        assert "cubin" in c.asm and ("mma" in c.asm["ptx"] or dt == "fp32")  # bf16: tensor cores
        assert ("sub.rn.bf16x2" in c.asm["ptx"]) == (dt == "bf16")  # the PTX unpack
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(c.asm["ptx"])
        log = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        os.unlink(f.name)
        spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        print(dt, bits, re.findall(r"Used (\d+) registers", log), "spill", spills)
        # The parts body's prefetched block costs a few spilled registers at one warp (ptxas 12.x:
        # 104 B at 4 bits, 8 B at 2; measured on H100 as fast as without the prefetch at 4 bits and
        # 1.24x faster at 2): a bound, so that a change which spills in earnest fails here.
        if dt == "bf16":
            assert spills <= 128, log
print("compiled")
'''


def test_kivi_fold_kernel_compiles_for_hopper_without_spills():
    """The real compiler takes the fold kernel and the tail path down to sm_90 with their launch
    settings; ptxas must report few register spills for bfloat16 (float32 only has to compile),
    and only the bf16 build carries the PTX unpack."""
    import subprocess
    import sys
    from pathlib import Path

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = str(Path(__file__).resolve().parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", KIVI_COMPILE], check=False, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, (done.stdout + done.stderr)[-3000:]


def test_fused_kivi_decode_step_equals_decoding_the_body(tiny_llama, monkeypatch):
    """With KVBUDGET_FUSED_KIVI=1, a one-token step over a KIVI body attends through
    kivi_decode_attention (torch reference on CPU, the Triton kernel on CUDA) and gives the
    tokens of the path that decodes the body first."""
    import kvbudget as kb
    from kvbudget.kv import layer as klayer
    from conftest import random_ids

    import kvbudget.kernels as kernels

    calls = []
    real = kernels.kivi_decode_attention
    monkeypatch.setattr(kernels, "kivi_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    answers = []
    for fused in ("0", "1"):
        monkeypatch.setattr(klayer, "FUSED_KIVI", fused)
        policy = kb.policy("kivi4")
        c = policy.new_cache(tiny_llama)
        logits, _ = kb.prefill(tiny_llama, c, policy, random_ids(300), block_size=64)
        assert c.layers[0].entries.body is not None
        ids = []
        with torch.inference_mode():
            for _ in range(12):
                tok = logits.argmax(-1, keepdim=True)
                ids.append(int(tok))
                logits = tiny_llama(input_ids=tok, cache=c, use_cache=True).logits[:, -1]
        answers.append((ids, logits))
    assert len(calls) == 12 * len(c.layers)  # the fused run only, every layer, every step
    calls.clear()
    monkeypatch.setattr(klayer, "FUSED_KIVI", "auto")  # the default: CUDA only
    with torch.inference_mode():
        tiny_llama(input_ids=logits.argmax(-1, keepdim=True), cache=c, use_cache=True)
    assert not calls
    assert answers[0][0] == answers[1][0]
    torch.testing.assert_close(answers[0][1], answers[1][1], rtol=1e-4, atol=1e-4)
