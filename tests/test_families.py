"""The architecture matrix: every model family users run (`families.py`) x every kind of policy x
every path a session takes, with tiny random-weight models built by plain transformers.

For each (family, policy kind) one test walks the paths in sequence: add_context, ask (with
decode-time compression inside every answer), save/load, fork, a second ask (multi-turn), static
decode. With `full` every answer is exactly the greedy answer of plain `model.generate` (on an
untouched copy of the model, the same prompt ids); every other policy holds its budget on every
layer — sliding-window layers hold at most min(window, their budget share) — in entries and in
bytes, at every decoding step too, and answers. Per family, the batching engine serves two
sessions together, each answering as alone.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import traceback
from pathlib import Path

import pytest
import torch

import kvbudget as kb
from kvbudget.errors import KVBudgetError

from families import FAMILIES, UNSUPPORTED, layer_windows, one_thread, tokenizer  # noqa: F401 (a fixture)

BLOCK = 64  # prefill block
BUDGET = 48  # entries per layer (average over heads)
NEW = 7  # tokens per answer
INTERVAL = 4  # decode-time compression every INTERVAL new tokens: once inside each answer

# One kind of policy each: attention-free scorer, window scorer, accumulating scorer, ragged
# Ada-KV, KVzip, a store alone, a scorer + store, EpiCache; `full` is the reference.
POLICIES: dict[str, dict] = {
    "full": {},
    "knorm": {"budget": BUDGET},
    "snapkv": {"budget": BUDGET},
    "h2o": {"budget": BUDGET},
    "adakv": {"budget": BUDGET},
    "kvzip": {"budget": BUDGET},
    "kivi4": {"residual": 32},  # quantizes all but the last 32 tokens: short contexts use the store
    "snapkv+kivi4": {"budget": BUDGET},
    "epicache": {"budget": BUDGET, "episodes": 2},
}

CONTEXT = [
    {"role": "user", "content": "Hi Sam, I am planning the harbour festival for next spring and need help with the schedule."},
    {"role": "assistant", "content": "Happy to help. What are the fixed points so far, and how many days will it run?"},
    {"role": "user", "content": "Three days. The boat parade is on Saturday at ten, and the fish market opens every morning at seven."},
    {"role": "assistant", "content": "Good. Then the music stage could start after the market closes, around noon each day."},
    {"role": "user", "content": "The band from Lisbon can only play on Sunday evening. The lighthouse tour is on Friday."},
    {"role": "assistant", "content": "Noted: Lisbon band Sunday evening, lighthouse tour Friday, parade Saturday at ten."},
    {"role": "user", "content": "The code for the storage shed with the festival flags is 4721. Do not forget it."},
    {"role": "assistant", "content": "I will remember the shed code 4721. Anything else for the Friday program?"},
]
QUESTIONS = ["When is the boat parade?", "Who plays on Sunday evening?", "What is the code for the storage shed?"]


def _make_policy(kind: str) -> kb.Policy:
    return kb.policy(kind, decode_interval=INTERVAL, **POLICIES[kind])


@functools.lru_cache(maxsize=None)
def _pristine(family: str) -> torch.nn.Module:
    """The family's model, never handed to kvbudget: the reference for `full`, and the source of
    each test's own copy (the same weights)."""
    return FAMILIES[family].build()


def _model(family: str) -> torch.nn.Module:
    reason = FAMILIES[family].available()
    if reason is not None:
        pytest.skip(reason)
    return copy.deepcopy(_pristine(family))


# --- what a session must do -----------------------------------------------------------------------
def _prompt(session: kb.Session, question: str) -> list[int]:
    """The token ids a session feeds before answering ``question``: what it fed so far, then the
    chat template's rendering of the new turn, tokenized alone (the session feeds incrementally)."""
    tok = session.tok
    full = tok.apply_chat_template(session.messages + [{"role": "user", "content": question}], tokenize=False,
                                   add_generation_prompt=True)
    assert full.startswith(session.rendered)
    return session.input_ids + tok(full[len(session.rendered):], add_special_tokens=False).input_ids


@functools.lru_cache(maxsize=None)
def _greedy(family: str, prompt: tuple[int, ...], new: int, eos: frozenset[int]) -> list[int]:
    """Plain transformers' greedy answer to ``prompt`` on the family's untouched model, up to (not
    including) an end token."""
    ids = torch.tensor([prompt])
    out = _pristine(family).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
    answer = []
    for token in out[0, len(prompt):].tolist():
        if token in eos:
            break
        answer.append(token)
    return answer


def _ask(session: kb.Session, question: str, reference: str | None) -> kb.Turn:
    """Ask; the session must feed exactly the prompt the chat template gives and answer — with
    ``reference`` (a family name), exactly plain transformers' greedy answer; without, inside the
    budget at every decoding step (decode-time compression runs inside each answer)."""
    prompt = _prompt(session, question)
    steps = []

    def each_step(token: int) -> None:
        steps.append(token)
        if reference is None:
            _check_budget(session, f"decode step {len(steps)}", extra=BLOCK + INTERVAL)

    turn = session.ask_detailed(question, max_new_tokens=NEW, on_token=each_step)
    assert session.input_ids[: len(prompt)] == prompt
    assert turn.token_ids, f"no answer to {question!r}"
    assert steps == turn.token_ids
    if reference is not None:
        assert turn.token_ids == _greedy(reference, tuple(prompt), NEW, frozenset(session.eos)), question
    return turn


def _held(layer) -> list[int]:
    """Entries held per KV head by one cache layer (any layer type)."""
    if hasattr(layer, "lengths"):
        return layer.lengths().tolist() if layer.is_initialized else [0]
    if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
        return [0]
    return [layer.keys.shape[-2]] * layer.keys.shape[1]


def _caches(session: kb.Session) -> list:
    episodes = getattr(session, "episodes", None)
    return [ep.cache for ep in episodes] if episodes else [session.cache]


def _shares(policy: kb.Policy, cache, n_layers: int) -> list[int | None]:
    """Each layer's budget share in entries per head (None: the policy keeps every token)."""
    if not policy.evicts:
        return [None] * n_layers
    return policy.layer_budgets(cache.tokens, n_layers, cache.sensitivity)


def _check_budget(session: kb.Session, where: str, extra: int = 0) -> None:
    """Every layer of every cache of ``session`` holds at most min(window, its budget share)
    (+ ``extra``: tokens fed since the last compression) entries per head — shared over the heads
    of a layer for head-adaptive policies — and the cache's bytes are within what those entries
    take at full precision (+ scorer state and ragged length tables)."""
    policy = session.policy
    cfg = session.model.config.get_text_config(decoder=True)
    windows = layer_windows(session.model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for cache in _caches(session):
        layers = cache.layers
        assert len(layers) == cfg.num_hidden_layers, f"{where}: {len(layers)} cache layers for {cfg.num_hidden_layers}"
        shares = _shares(policy, cache, len(layers))
        seen = cache.get_seq_length()
        elem = cache.dtype.itemsize
        per_head = 2 * head_dim * elem + 4 + 4 * len(policy.scorer.state_names)  # K, V, position, state
        bound = 0
        for i, layer in enumerate(layers):
            lens = _held(layer)
            heads = len(lens)
            caps = [c for c in (windows[i], shares[i]) if c is not None]
            if not caps:  # a store alone on a full-attention layer: every token, mostly encoded
                store = policy.store
                assert max(lens) <= seen, f"{where}: layer {i} holds {max(lens)} entries, {seen} seen"
                tail = store.residual + store.chunk
                bound += heads * (seen * (store.entry_bytes(head_dim, cache.dtype) + 4) + tail * per_head)
                continue
            cap = min(caps) + extra
            kind = "sliding" if windows[i] is not None else "full"
            if policy.head_adaptive:
                assert sum(lens) <= cap * heads, (
                    f"{where}: budget not held on {kind} layer {i}: {sum(lens)} entries over {heads} heads > {cap} x {heads}")
            else:
                assert max(lens) <= cap, f"{where}: budget not held on {kind} layer {i}: {max(lens)} entries > {cap}"
            bound += cap * heads * per_head + 8 * heads
            peak = getattr(layer, "peak_entries", None)
            if peak is not None and not policy.head_adaptive and shares[i] is not None:
                # Block-wise prefill: at most the budget + one block (+ an answer decoded on top).
                assert peak <= min(caps) + BLOCK + NEW + extra, f"{where}: layer {i} peaked at {peak} entries"
        held = cache.nbytes()
        assert held <= bound, f"{where}: cache holds {held} bytes, over the budget's {bound}"
        if policy.store is not None and extra == 0:
            for i, layer in enumerate(cache.layers):
                if layer.window is not None and layer.window - 1 < policy.store.chunk:
                    continue  # a window shorter than a chunk of the store: never a whole chunk to encode
                body = getattr(layer.entries, "body", None)
                assert body is not None and len(body) > 0, f"{where}: layer {i} holds nothing encoded by the store"


# --- the matrix -----------------------------------------------------------------------------------
MATRIX = [pytest.param(f, k, id=f"{f}-{k}") for f in FAMILIES for k in POLICIES]


def _where(exc: BaseException) -> str:
    """The innermost frame of kvbudget's code (or of this test) that ``exc`` passed through."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}kvbudget{os.sep}" in f.filename and "site-packages" not in f.filename
              or f.filename == __file__]
    return f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


@pytest.mark.parametrize("family,kind", MATRIX)
def test_family_policy(family, kind, tmp_path):
    """Two independent parts: one session through add_context, ask, save/load, fork and a second
    ask (multi-turn) on the session, its fork and its loaded copy (the same answer from all
    three); one with static decode. Every answer compresses at decode time. Each part stops at
    its first failure; the test fails listing every part that failed."""
    model = _model(family)
    tok = tokenizer()
    full = kind == "full"
    reference = family if full else None
    first: list[int] = []

    def check(session: kb.Session, where: str) -> None:
        if not full:
            _check_budget(session, where)

    def conversation() -> None:
        session = kb.Session(model, tok, _make_policy(kind), block_size=BLOCK)
        session.add_context(CONTEXT)
        check(session, "add_context")
        first.extend(_ask(session, QUESTIONS[0], reference).token_ids)
        check(session, "ask")
        path = tmp_path / "conv.kvb"
        session.save(path)
        loaded = kb.Session.load(path, model, tok)
        assert loaded.input_ids == session.input_ids and loaded.messages == session.messages
        check(loaded, "load")
        fork = session.fork()
        fed, held = len(session.input_ids), session.cache.nbytes()
        forked = _ask(fork, QUESTIONS[1], reference)
        assert (len(session.input_ids), session.cache.nbytes()) == (fed, held), "fork: the original changed"
        second = _ask(session, QUESTIONS[1], reference)
        check(session, "multi-turn")
        assert forked.token_ids == second.token_ids, "fork: the copy answered differently"
        assert _ask(loaded, QUESTIONS[1], reference).token_ids == second.token_ids, "save/load: answers differ"

    def static_decode() -> None:
        session = kb.Session(model, tok, _make_policy(kind), block_size=BLOCK, decode="static")
        session.add_context(CONTEXT)
        turn = _ask(session, QUESTIONS[0], reference)
        if first:
            assert turn.token_ids == first, "static decode: not the answer of eager decoding"
        check(session, "static decode")

    failures = []
    for part in (conversation, static_decode):
        try:
            part()
        except Exception as exc:  # both parts run; the test lists what failed in each
            failures.append(f"{part.__name__}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                            f"{_where(exc)}")
    if failures:
        pytest.fail("\n".join(failures), pytrace=False)


@pytest.mark.parametrize("family", [pytest.param(f, id=f) for f in FAMILIES])
def test_family_in_the_batching_engine(family):
    """Two sessions of different lengths (uniform and per-head budgets) served together by
    `kb.Engine`: their questions' and answers' blocks go through shared forwards (right-padded)
    and their tokens through shared decode steps; each answers as alone."""
    model = _model(family)
    tok = tokenizer()
    for kind in ("snapkv", "adakv"):
        sessions = []
        for n in (6, 3):
            session = kb.Session(model, tok, _make_policy(kind), block_size=BLOCK, decode="eager")
            session.add_context(CONTEXT[:n])
            sessions.append(session)
        questions = [QUESTIONS[0], QUESTIONS[2]]
        alone = [s.fork().ask_detailed(q, NEW).token_ids for s, q in zip(sessions, questions)]
        engine = kb.Engine(model, tok, prefill_tokens=1024, decode="eager")
        turns = [engine.submit(s, q, NEW) for s, q in zip(sessions, questions)]
        engine.run()
        assert [t.result().token_ids for t in turns] == alone, kind
        assert engine.decoded_tokens > engine.decode_steps, "decoded together"


# --- families the cache cannot serve --------------------------------------------------------------
def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_family_is_refused_when_the_session_is_created(name):
    unsupported = UNSUPPORTED[name]
    reason = unsupported.family.available()
    if reason is not None:
        pytest.skip(reason)
    model = unsupported.family.build()
    with pytest.raises(KVBudgetError) as err:
        kb.Session(model, tokenizer(), kb.policy("snapkv", budget=64))
    message = str(err.value)
    assert _squash(model.config.model_type) in _squash(message), f"the error does not name the family: {message}"
    assert re.search(unsupported.why, message, re.I), f"the error does not say why: {message}"


# --- no deprecation warnings from our calls -------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_no_deprecation_warning_from_a_session(family, recwarn, caplog):
    model = _model(family)
    tok = tokenizer()
    hf = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()  # transformers logs each such warning once per process
    caplog.set_level(logging.WARNING, logger="transformers")
    hf.addHandler(caplog.handler)  # transformers' logger may not propagate to the root
    try:
        session = kb.Session(model, tok, kb.policy("snapkv", budget=BUDGET), block_size=BLOCK)
        session.add_context(CONTEXT)
        session.ask(QUESTIONS[0], max_new_tokens=4)
    finally:
        hf.removeHandler(caplog.handler)
    warned = [f"{w.category.__name__}: {w.message}" for w in recwarn
              if issubclass(w.category, (FutureWarning, DeprecationWarning)) or "deprecat" in str(w.message).lower()]
    assert not warned, warned
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("transformers")
              and r.levelno >= logging.WARNING and "deprecat" in r.getMessage().lower()]
    assert not logged, logged
