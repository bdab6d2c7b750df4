"""Key re-rotation (`+rerotate`, `kv.rerotation`): a stored key rotated by delta equals the key
the model computes at the new position; a budgeted conversation re-rotates to contiguous
positions and goes past the model's positions, its kept keys those of a fresh computation of
the kept tokens at 0..n-1; per-head lengths (Ada-KV) keep every head's newest entry next to the
next query; session files keep the position counter; unsupported models and stores are
refused when the session or policy is made."""

import pytest
import torch
from transformers import (DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Phi3Config, Phi3ForCausalLM)

import kvbudget as kb
from kvbudget.errors import BudgetError, UnsupportedModelError
from kvbudget.kv.dense import DenseEntries
from kvbudget.kv.ragged import RaggedEntries
from kvbudget.kv.rerotation import contiguous_positions, rotary_frequencies, rotate
from kvbudget.runtime.models import load_tokenizer
from kvbudget.runtime.prefill import prefill
from kvbudget.runtime.sessionfile import write_file

from conftest import random_ids
from server_kit import tiny_model

TEXT = ("The harbour town of Vell keeps its lighthouse keeper's logbook in the library. In spring the fishing "
        "fleet returns with cod and herring, and the market opens at dawn. ")


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()


def _phi3_partial():
    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                      pad_token_id=0)).eval()


def _gemma(first: str):
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                           layer_types=[first, "full_attention"])
    return Gemma3ForCausalLM(cfg).eval()


def _first_layer_keys(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer 0's keys of ``ids`` ([1, n]) computed by the model at ``positions`` ([n]): a function
    of each token and its position alone."""
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, position_ids=positions[None], cache=cache, use_cache=True)
    return cache.layers[0].keys


@pytest.mark.parametrize("build", [_llama, _phi3_partial, lambda: _gemma("sliding_attention"),
                                   lambda: _gemma("full_attention")],
                         ids=["llama", "phi3-partial-rotary", "gemma3-local", "gemma3-global"])
def test_rotating_a_key_by_delta_equals_computing_it_at_the_new_position(build):
    model = build()
    kb.policy("streaming", budget=8)  # registers the methods
    cache = kb.BudgetedCache(model)
    inv_freq = rotary_frequencies(model, cache.layers)[0]
    ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(1))
    old = torch.tensor([0, 3, 17, 40, 41, 42, 900, 1500, 1501, 2047, 3000, 4000])
    new = torch.arange(12)
    at_old, at_new = _first_layer_keys(model, ids, old), _first_layer_keys(model, ids, new)
    assert not torch.allclose(at_old, at_new, atol=1e-3)  # positions do change the keys
    moved = rotate(at_old, (new - old).expand(*at_old.shape[:2], 12), inv_freq)
    torch.testing.assert_close(moved, at_new, rtol=1e-4, atol=1e-4)


def test_gemma3_local_and_global_layers_rotate_with_their_own_frequencies():
    model = _gemma("sliding_attention")
    freqs = rotary_frequencies(model, kb.BudgetedCache(model).layers)
    assert not torch.equal(freqs[0], freqs[1])  # rope_local_base_freq 10k vs rope_theta 1M
    rotary = model.model.rotary_emb
    assert torch.equal(freqs[0], rotary.sliding_attention_inv_freq) and torch.equal(freqs[1], rotary.full_attention_inv_freq)


def test_contiguous_positions_keep_order_newest_next_to_the_query_and_sinks_first():
    positions = torch.tensor([[[0, 1, 2, 3, 50, 60, 61], [0, 1, 2, 9, 40, 61, -1], [5, 8, 61, -1, -1, -1, -1]]])
    valid = positions >= 0
    out = contiguous_positions(positions, valid, 7)
    assert out[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]  # the fullest head: 0..L-1
    assert out[0, 1, :6].tolist() == [0, 1, 2, 4, 5, 6]  # its run 0..2 stays, the rest ends at L-1
    assert out[0, 2, :3].tolist() == [4, 5, 6]  # no run from 0: all of it ends at L-1


@pytest.fixture(scope="module")
def small():
    """A random 2-layer Llama over the default tokenizer with only 64 positions."""
    tok = load_tokenizer()
    model = tiny_model(tok, positions=64)
    return model, tok


def _talk(session, turns: int) -> list[str]:
    answers = []
    for i in range(turns):
        session.add_context(TEXT + f"Turn {i}.")
        answers.append(session.ask("Where is the logbook kept?", max_new_tokens=6))
    return answers


def test_streaming_rerotate_outlasts_the_positions_and_keeps_fresh_keys_of_the_kept_tokens(small):
    model, tok = small
    session = kb.Session(model, tok, kb.policy("streaming+rerotate", budget=32, decode_interval=4), block_size=16,
                         decode="eager")
    _talk(session, 3)
    cache = session.cache
    assert session.tokens_seen == len(session.input_ids) > 3 * 64
    assert session.next_position == 32 and cache.rolled == session.tokens_seen - 32
    for layer in cache.layers:
        assert isinstance(layer.entries, DenseEntries) and layer.seen == 32
        assert torch.equal(layer.entries.positions[0], torch.arange(32, dtype=torch.int32).expand(2, 32))
    # StreamingLLM keeps the 4 sinks and the newest tokens: layer 0's keys are those the model
    # computes for exactly those tokens at 0..31 (deeper layers saw the evicted context).
    kept = torch.tensor([session.input_ids[:4] + session.input_ids[-28:]])
    fresh = _first_layer_keys(model, kept, torch.arange(32))
    torch.testing.assert_close(cache.layers[0].entries.keys, fresh, rtol=1e-4, atol=1e-4)


def test_sliding_window_layers_rerotate_with_the_global_ones(tiny_gemma):
    """Gemma 3: sliding layers (window 16) keep their newest 15 entries, the global ones 32; all
    share the next position (32), the sliding layer's entries end right before it."""
    policy = kb.policy("streaming+rerotate", budget=32)
    cache = policy.new_cache(tiny_gemma)
    ids = random_ids(300)
    logits, _ = prefill(tiny_gemma, cache, policy, ids, block_size=40)
    assert cache.get_seq_length() == 32 and cache.tokens_fed == 300
    sliding, full = cache.layers[0], cache.layers[1]
    assert sliding.window == 16 and full.window is None
    assert sliding.entries.positions[0, 0].tolist() == list(range(17, 32))
    assert full.entries.positions[0, 0].tolist() == list(range(32))
    fresh = _first_layer_keys(tiny_gemma, ids[:, -15:], torch.arange(17, 32))
    torch.testing.assert_close(sliding.entries.keys, fresh, rtol=1e-4, atol=1e-4)
    # The next token goes at 32 and sees the sliding layer's entries within its window.
    out = tiny_gemma(ids[:, -1:], cache=cache, use_cache=True)
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 33


def test_head_adaptive_lengths_rerotate_each_head_to_end_next_to_the_query(small):
    model, tok = small
    # One compression (context under one block): the kept sets are the same with and without
    # re-rotation, so the re-rotated cache must be the plain one moved by its position change.
    plain = kb.Session(model, tok, kb.policy("adakv", budget=24), block_size=128, decode="eager")
    moved = kb.Session(model, tok, kb.policy("adakv+rerotate", budget=24), block_size=128, decode="eager")
    for s in (plain, moved):
        s.add_context(TEXT)
    layers = list(zip(plain.cache.layers, moved.cache.layers))
    assert any(isinstance(b.entries, RaggedEntries) for _, b in layers), "heads kept different counts"
    end = max(b.max_entries for _, b in layers)
    assert moved.next_position == end < plain.next_position
    for (a, b), inv_freq in zip(layers, moved.cache.rotary):
        va, vb = a.view(), b.view()
        valid = va.valid if va.valid is not None else torch.ones_like(va.positions, dtype=torch.bool)
        assert torch.equal(vb.positions[valid], contiguous_positions(va.positions, va.valid, end)[valid])
        newest = vb.positions[0].gather(1, (valid[0].sum(-1, keepdim=True) - 1))
        assert (newest == end - 1).all()  # every head's newest entry next to the next query
        delta = (vb.positions - va.positions)
        torch.testing.assert_close(vb.keys[valid], rotate(va.keys, delta, inv_freq)[valid], rtol=1e-5, atol=1e-5)
        assert torch.equal(vb.values[valid], va.values[valid])
    # ... and the conversation goes on, past the model's positions.
    _talk(moved, 3)
    assert moved.tokens_seen > 64 >= moved.next_position


def test_session_file_keeps_the_position_counter_and_continues_identically(small, tmp_path):
    model, tok = small
    session = kb.Session(model, tok, kb.policy("snapkv+rerotate", budget=32, decode_interval=4), block_size=16,
                         decode="eager")
    _talk(session, 1)
    assert session.cache.rolled > 0
    session.save(tmp_path / "s.kvb")
    loaded = kb.Session.load(tmp_path / "s.kvb", model, tok)
    assert loaded.policy.rerotate and loaded.cache.rotary is not None
    assert (loaded.next_position, loaded.tokens_seen) == (session.next_position, session.tokens_seen)
    assert _talk(loaded, 1) == _talk(session, 1)
    assert (loaded.next_position, loaded.tokens_seen) == (session.next_position, session.tokens_seen)
    for a, b in zip(session.cache.layers, loaded.cache.layers):
        assert torch.equal(a.entries.positions, b.entries.positions)
        torch.testing.assert_close(a.entries.keys, b.entries.keys)
    # A file written without the position counter (no re-rotation then) loads: one position per token.
    plain = kb.Session(model, tok, kb.policy("snapkv", budget=32), block_size=16, decode="eager")
    plain.add_context(TEXT)
    tensors, meta = plain.payload()
    del meta["cache"]["rolled"], meta["next_position"], meta["policy"]["rerotate"]
    write_file(tmp_path / "old.kvb", tensors, meta)
    old = kb.Session.load(tmp_path / "old.kvb", model, tok)
    assert old.cache.rolled == 0 and old.next_position == old.tokens_seen == plain.tokens_seen


def test_unsupported_models_and_stores_are_refused_at_setup(small):
    model, tok = small
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(UnsupportedModelError, match="gpt2: key re-rotation supports the rotate_half RoPE"):
        kb.Session(gpt2, tok, kb.policy("streaming+rerotate", budget=32))
    kb.Session(gpt2, tok, kb.policy("streaming", budget=32))  # without re-rotation it runs
    with pytest.raises(BudgetError, match="store 'kivi' encodes them"):
        kb.policy("snapkv+kivi4+rerotate", budget=32)
    with pytest.raises(BudgetError, match="'full' evicts nothing"):
        kb.policy("full+rerotate")
    assert kb.policy("snapkv", budget=32, rerotate=True).name == "snapkv+rerotate"
    assert kb.policy("pyramidkv+rerotate", budget=32).allocator == "pyramid"


@pytest.mark.slow  # minutes of CPU prefill; CI runs the 64-position model's test above
def test_default_model_streaming_rerotate_answers_past_its_8192_positions(default_model):
    """SmolLM2-135M (8192 positions) under `streaming+rerotate` at budget 256: three long turns,
    prefilled in blocks of 1024, more than 9000 tokens in all; positions stay within budget +
    block, and the answer is about the question (keys at wrong positions give unrelated tokens;
    the 135M model does not recall the code itself)."""
    model, tok = default_model
    session = kb.Session(model, tok, kb.policy("streaming+rerotate", budget=256), block_size=1024, decode="eager")
    filler = TEXT * (3100 // len(tok(TEXT).input_ids))
    for _ in range(2):
        session.add_context(filler)
        session.ask("Where is the logbook kept?", max_new_tokens=4)
        assert session.next_position <= 256 + 1024
    session.add_context(filler + "The code of the blue door is 4817.")
    answer = session.ask("What is the code of the blue door?", max_new_tokens=14)
    assert session.tokens_seen > 9000 > model.config.max_position_embeddings > session.next_position
    assert answer.startswith("The code of the blue door")
