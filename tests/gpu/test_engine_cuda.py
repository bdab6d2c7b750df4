"""The batching engine on CUDA: sessions of mixed policies, budgets, stores and lengths decoded
together answer, token for token, what each answers alone with `Session`'s own decoding on CUDA
(static buffers and one CUDA graph per token), over two turns each, joining the batch at
different steps and leaving it at different lengths: with the engine's slots of static buffers
and one CUDA graph per batch-size bucket (``decode="auto"`` on CUDA, `runtime.slots`), and eager.
Graphs are captured once per (bucket, buffers): counted.

float32 (4 layers of the 8B shape): the batched matrix products round differently than one row's
(about 1e-6 relative), which changes a token only where two candidates are that close. The
tokenizer is the default model's: the model's vocabulary is larger, and the ids beyond the
tokenizer's decode to nothing, the same in both runs."""

import random

import pytest

import kvbudget as kb
from kvbudget.runtime.models import load_tokenizer

from .gpu_kit import compare_caches, differing_share

pytestmark = pytest.mark.gpu

WORDS = ("harbour lighthouse ferry market net tide gull anchor sail rope island keeper lantern storm shell reef pier "
         "dune bell map north tower code blue door brother tavern Friday spring cod herring dawn logbook").split()

# (policy, its options, context words, answer tokens): dense, evicting, per-head lengths (Ada-KV),
# streaming, a KIVI store, eviction + store, accumulated scores; the evicting ones compress every
# 16 decoded tokens, inside every answer.
SPECS = [
    ("full", {}, 600, 24),
    ("snapkv", {"budget": 512, "decode_interval": 16}, 2400, 40),
    ("adakv", {"budget": 512, "decode_interval": 16}, 1800, 33),
    ("streaming", {"budget": 256, "decode_interval": 16}, 1200, 20),
    ("kivi4", {}, 900, 28),
    ("snapkv+kivi4", {"budget": 512, "decode_interval": 16}, 2100, 36),
    ("h2o", {"budget": 384, "decode_interval": 16}, 1500, 30),
]
QUESTIONS = ["What is the code of the blue door?", "Who keeps the lighthouse?"]


def _session(model, tok, name: str, options: dict, words: int, seed: int) -> kb.Session:
    rng = random.Random(seed)
    session = kb.Session(model, tok, kb.policy(name, **options), block_size=512, decode="graph")
    session.add_context(" ".join(rng.choice(WORDS) for _ in range(words)))
    return session


def _graph_keys(engine: kb.Engine, seen: set) -> None:
    """After each step, record every static batch's (batch, buffers, bucket, ragged) in ``seen``:
    the graphs a step may need, at most one capture each."""
    step = engine.step

    def watched() -> None:
        step()
        for batch in engine.slots.values():
            if batch.live:
                seen.add((id(batch), batch.allocations, batch.span, any(getattr(b, "ragged", False) for b in batch.buffers)))

    engine.step = watched


@pytest.mark.parametrize("decode", ["auto", "eager"])
def test_batched_answers_equal_each_session_alone_on_cuda(model_f32, decode):
    model, tok = model_f32, load_tokenizer()
    sessions = [_session(model, tok, name, options, words, i) for i, (name, options, words, _) in enumerate(SPECS)]
    direct = [s.fork() for s in sessions]
    alone = [[d.ask_detailed(q, n).token_ids for q in QUESTIONS] for d, (*_, n) in zip(direct, SPECS)]
    engine = kb.Engine(model, tok, prefill_tokens=1024, decode=decode)
    keys: set = set()
    _graph_keys(engine, keys)
    batched, batches = [[] for _ in SPECS], []
    for q in QUESTIONS:
        turns = []
        for (*_, n), session in zip(SPECS, sessions):
            turns.append(engine.submit(session, q, n))
            engine.step()  # the next one joins a batch already running
            batches.append(engine.last_batch)
        engine.run()
        for ids, turn in zip(batched, turns):
            ids.append(turn.result().token_ids)
    assert max(batches) >= 4, f"sessions decoded together: batch sizes {batches}"
    assert engine.decoded_tokens > 2 * engine.decode_steps
    captures = engine.slot_counters()["captures"]
    if decode == "auto":
        assert 0 < captures <= len(keys), f"{captures} captures for {len(keys)} (batch, buffers, bucket)"
    else:
        assert captures == 0 and not keys
    for (name, *_), ids, lone, session, d in zip(SPECS, batched, alone, sessions, direct):
        assert ids == lone, f"{name}: batched {ids} alone {lone}"
        assert session.messages == d.messages, name
        diff = compare_caches(session.cache, d.cache)
        if "kivi" in name:
            # The blocks fed together round differently from alone (other matmul shapes on
            # CUDA): a value at a 4-bit code's boundary may land one code away.
            share = differing_share(session.cache, d.cache)
            assert share < 1e-3, f"{name}: {share:.2e} of the cache differs (max {diff:.2e})"
        else:
            assert diff < 1e-3, f"{name}: max |cache diff| {diff:.2e}"


TIE = 0.125  # bf16: two candidates whose log-probabilities (alone) lie this close are a near tie


def test_graph_buckets_bf16_equal_alone_and_capture_once_per_bucket(model_bf16):
    """Eight snapkv sessions of one budget (bf16, the dtype served) join one step apart and leave
    at different lengths: the buffers grow to 8 slots, the bucket shrinks back as they leave
    (reusing the graphs captured for the buffers), every answer = alone up to bf16 near ties."""
    model, tok = model_bf16, load_tokenizer()
    lengths = [40, 64, 48, 64, 36, 56, 64, 44]
    sessions = [_session(model, tok, "snapkv", {"budget": 512, "decode_interval": 16}, 1500 + 100 * i, i)
                for i in range(len(lengths))]
    direct = [s.fork() for s in sessions]
    alone = [d.ask_detailed(QUESTIONS[0], n, keep_steps=True) for d, n in zip(direct, lengths)]
    engine = kb.Engine(model, tok, prefill_tokens=1024)
    keys: set = set()
    _graph_keys(engine, keys)
    turns = []
    for session, n in zip(sessions, lengths):
        turns.append(engine.submit(session, QUESTIONS[0], n))
        engine.step()
    spans = []
    while engine.busy:
        engine.step()
        spans += [b.span for b in engine.slots.values() if b.live]
    assert max(spans) == 8 and spans[-1] < 8, spans
    captures = engine.slot_counters()["captures"]
    assert captures == len(keys), f"{captures} captures for {len(keys)} (batch, buffers, bucket)"
    for i, (turn, lone) in enumerate(zip(turns, alone)):
        got, want = turn.result().token_ids, lone.token_ids
        for step, (w, h) in enumerate(zip(want, got)):
            if w == h:
                continue
            logp = lone.step_logprobs[step].float()
            margin = float(logp[w] - logp[h])
            assert margin <= TIE, f"session {i}: token {step} is {h}, alone {w} (log-prob margin {margin:.4f})"
            break  # a near tie: the answers part here
        else:
            assert len(got) == len(want), (i, got, want)
