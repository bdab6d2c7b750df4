"""Answering a prompt held in a budgeted cache: greedy decoding, and teacher-forced scoring of
given answers. `answer` does a session's part of a turn between feeding the question and feeding
the answer back, and records it in a `Turn`.

`greedy_decode` is the decode loop: one token at a time, eagerly or on static buffers
(`runtime.decoder`, one CUDA graph per step on CUDA), and every ``policy.decode_interval`` new
tokens the cache is compressed, so a long answer stays inside the budget (decode-time
compression). The decoded entries are scratch: `answer` decodes inside ``cache.scratch()``. The
decode modes:

* "auto": static buffers + one CUDA graph per step on CUDA where the cache allows it, eager elsewhere;
* "eager": the model's own forward, step by step;
* "static": static buffers without a graph (CPU too);
* "graph": static buffers + CUDA graph (CUDA only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..compress import Policy, compress
from ..errors import KVBudgetError
from ..kv.cache import BudgetedCache
from .decoder import StaticDecoder, supports
from .modelcall import run
from .static import UnsupportedStatic

DECODE_MODES = ("auto", "eager", "static", "graph")


@dataclass
class Turn:
    """One question answered by a session."""

    question: str
    text: str  # the generated answer
    token_ids: list[int]
    answer_logprob: float | None = None  # teacher-forced mean log-prob of the gold answer
    # Log-softmax [T, vocab] at the positions predicting a given reference answer's T tokens,
    # teacher-forced (fidelity against the full cache: eval/fidelity.py).
    reference_logprobs: Tensor | None = None
    # With ``keep_steps``: log-softmax [steps, vocab] of each greedy decoding step (the last one
    # predicts the end of the answer when it stopped by itself); its argmax is the answer.
    step_logprobs: Tensor | None = None
    prefill_s: float = 0.0  # question prefill
    decode_s: float = 0.0
    kv_bytes: int = 0  # held right before decoding (context + question)
    peak_bytes: int = 0  # most bytes the cache has held so far


def eos_ids(model, tok) -> set[int]:
    """The token ids that end an answer: the model's generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    ids.discard(None)
    return ids


def answer(
    model, tok, cache: BudgetedCache, policy: Policy, question: str, logits: Tensor, max_new_tokens: int,
    eos: set[int], mode: str = "auto", on_token: Callable[[int], None] | None = None, gold: str | None = None,
    reference: list[int] | None = None, keep_steps: bool = False,
) -> Turn:
    """Answer ``question``, fed into ``cache`` (its last ``logits`` given), with up to
    ``max_new_tokens`` greedy tokens; the cache afterwards holds what it held before.

    With ``gold``, ``turn.answer_logprob`` scores that answer teacher-forced; with ``reference``
    (token ids, e.g. the full cache's answer), ``turn.reference_logprobs`` holds the next-token
    log-distributions over it, teacher-forced; with ``keep_steps``, ``turn.step_logprobs`` holds
    those of the greedy decoding. ``on_token``: as in `greedy_decode`."""
    turn = Turn(question, "", [], kv_bytes=cache.nbytes())
    if gold is not None:
        turn.answer_logprob = answer_logprob(model, tok, cache, logits, gold)
    if reference is not None:
        ids = torch.tensor([reference], dtype=torch.long, device=model.device)
        turn.reference_logprobs = teacher_forced(model, cache, logits, ids)[0]
    start = time.perf_counter()
    steps: list[Tensor] = []
    with cache.scratch():
        turn.token_ids = greedy_decode(model, cache, policy, logits, max_new_tokens, eos, mode, on_token,
                                       steps if keep_steps else None)
    if keep_steps:
        turn.step_logprobs = torch.cat(steps) if steps else None
    turn.decode_s = time.perf_counter() - start
    turn.text = tok.decode(turn.token_ids, skip_special_tokens=True).strip()
    return turn


def greedy(logits: Tensor) -> int:
    """The most likely next token of ``logits`` [1, vocab]."""
    return int(logits[0].argmax())


class Decoding:
    """One answer being decoded, whatever runs the forwards (`greedy_decode` alone, the batching
    engine with other sessions): `next_token` chooses the token to feed from the last logits,
    `fed` takes the logits the forward gave, and `compress_due` says when the cache is compressed
    (every ``policy.decode_interval`` new tokens, decode-time compression). ``choose`` picks a
    token from logits [1, vocab] (`greedy` by default; `runtime.sampling` samples). A caller that
    decodes many answers at once hands `fed` each row's most likely token too (``top``: one
    argmax and one host read for the whole batch instead of one per answer); greedy takes it."""

    def __init__(self, policy: Policy, logits: Tensor, max_new_tokens: int, eos: set[int],
                 on_token: Callable[[int], None] | None = None, steps: list[Tensor] | None = None,
                 choose: Callable[[Tensor], int] = greedy) -> None:
        self.logits = logits
        self.top: int | None = None  # the most likely token of ``logits``, where the caller knows it
        self.max_new_tokens = max_new_tokens
        self.eos = eos
        self.on_token = on_token
        self.steps = steps
        self.choose = choose
        self.interval = policy.decode_interval
        self.ids: list[int] = []
        self.done = max_new_tokens <= 0
        self.stopped = False  # ended by a token of ``eos`` (not by the length)

    def next_token(self) -> int | None:
        """The token to feed next (already called back with ``on_token``), or None when the
        answer is over: a token of ``eos`` (not kept) or ``max_new_tokens`` tokens (the last is
        kept, never fed)."""
        if self.done:
            return None
        if self.steps is not None:
            self.steps.append(self.logits.float().log_softmax(-1))
        token = self.top if self.top is not None and self.choose is greedy else self.choose(self.logits)
        if token in self.eos:
            self.done = self.stopped = True
            return None
        self.ids.append(token)
        if self.on_token is not None:
            self.on_token(token)  # may end the answer (`finish`: a stop sequence)
        if self.done or len(self.ids) >= self.max_new_tokens:
            self.done = True
            return None
        return token

    def finish(self) -> None:
        """End the answer after the token just chosen (it is kept, never fed)."""
        self.done = True

    def fed(self, logits: Tensor, top: int | None = None) -> None:
        """The next-token logits [1, vocab] after the token `next_token` gave was fed, and their
        most likely token if the caller has it (``top``)."""
        self.logits, self.top = logits, top

    def compress_due(self) -> bool:
        """Whether the cache is compressed now (after the token just fed)."""
        return bool(self.interval) and len(self.ids) % self.interval == 0


def greedy_decode(
    model, cache: BudgetedCache, policy: Policy, logits: Tensor, max_new_tokens: int, eos: set[int],
    mode: str = "auto", on_token: Callable[[int], None] | None = None, steps: list[Tensor] | None = None,
) -> list[int]:
    """Up to ``max_new_tokens`` greedy tokens after the prompt whose last ``logits`` [1, vocab]
    are given, fed into ``cache`` (stopping at a token of ``eos``, which is not returned);
    ``cache`` is compressed by ``policy`` every ``policy.decode_interval`` new tokens.
    ``on_token`` is called with each token as soon as it is chosen; with ``steps``, each step's
    log-softmax [1, vocab] is appended to it."""
    decoding = Decoding(policy, logits, max_new_tokens, eos, on_token, steps)
    static = static_decoder(model, cache, policy, mode, max_new_tokens)
    while (token := decoding.next_token()) is not None:
        inp = torch.tensor([[token]], device=model.device)
        if static is not None:
            decoding.fed(static.step(inp[0]))
        else:
            decoding.fed(run(model, cache, inp).logits[:, -1])
            cache.track_peak()
        if decoding.compress_due():
            if static is not None:
                static.write_back(cache)
            compress(cache, policy)
            if static is not None:
                try:
                    static.reload(cache)
                except UnsupportedStatic:  # e.g. a dense layer turned ragged: go on eagerly
                    static.release(cache)
                    static = None
    if static is not None:
        static.write_back(cache)
        static.release(cache)  # the layers get their own copies back, buffers freed
    return decoding.ids


def static_decoder(model, cache: BudgetedCache, policy: Policy, mode: str, max_new_tokens: int) -> StaticDecoder | None:
    """The static-buffer decoder for an answer of up to ``max_new_tokens`` in decode ``mode``, or
    None to decode eagerly. "auto" falls back to eager where static decoding is not possible;
    "static" and "graph" raise `KVBudgetError` (or `UnsupportedStatic`) saying why."""
    cuda = torch.device(model.device).type == "cuda"
    if mode == "eager" or (mode == "auto" and not cuda) or max_new_tokens < 2:
        return None
    if mode == "graph" and not cuda:
        raise KVBudgetError("decode='graph' needs a CUDA device (use 'static' or 'eager' on CPU)")
    reason = supports(cache)
    if reason is not None:
        if mode == "auto":
            return None
        raise KVBudgetError(f"decode='{mode}' is not possible here: {reason}")
    try:
        return StaticDecoder.from_cache(model, cache, capacity=max_new_tokens, graph=mode != "static",
                                        query_slots=query_slots(policy, max_new_tokens))
    except UnsupportedStatic:
        if mode == "auto":
            return None
        raise


def query_slots(policy: Policy, max_new_tokens: int) -> int:
    """Queries a static decoder keeps per layer between two compressions of an answer of up to
    ``max_new_tokens``: the decode interval where the policy compresses inside the answer with a
    scorer that reads queries, else none."""
    interval = policy.decode_interval
    compresses = policy.evicts and interval and interval < max_new_tokens - 1
    return interval if compresses and policy.queries != 0 else 0


def teacher_forced(model, cache: BudgetedCache, logits: Tensor, ids: Tensor) -> Tensor:
    """Log-softmax [1, T, vocab] predicting ``ids`` ([1, T]) after the prompt held in ``cache``,
    whose last ``logits`` are given; the fed tokens are forgotten afterwards."""
    with cache.scratch():
        all_logits = logits[:, None]
        if ids.shape[1] > 1:
            out = run(model, cache, ids[:, :-1])
            all_logits = torch.cat([all_logits, out.logits], dim=1)
    return all_logits.float().log_softmax(-1)


def answer_logprob(model, tok, cache: BudgetedCache, logits: Tensor, answer: str) -> float:
    """Mean log-probability of ``answer``'s tokens, teacher-forced after the prompt held in
    ``cache`` (whose last ``logits`` are given)."""
    ids = tok(answer, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise KVBudgetError("gold answer is empty")
    logp = teacher_forced(model, cache, logits, ids).gather(-1, ids[..., None])
    return float(logp.mean())
