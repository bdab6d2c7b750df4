"""The second real model: Gemma 3 270M (18 layers: 15 sliding-window layers of 512, 3 global)."""

import pytest
import torch

import kvbudget as kb


@pytest.fixture(scope="module")
def gemma():
    return kb.load_model("gemma3-270m")


def _context(n_words: int = 600) -> str:
    words = ("the harbour master counted boats while gulls circled over the grey water and "
             "fishermen mended nets beside the old stone pier").split()
    return " ".join(words[i % len(words)] for i in range(n_words)) + ". The code for the blue door is 4721."


def test_gemma_layout(gemma):
    model, _ = gemma
    cfg = model.config
    assert cfg.num_hidden_layers == 18 and cfg.num_key_value_heads == 1 and cfg.sliding_window == 512
    cache = kb.policy("snapkv", budget=64).new_cache(model)
    windows = [layer.window for layer in cache.layers]
    assert [i for i, w in enumerate(windows) if w is None] == [5, 11, 17]  # the global layers
    assert {w for w in windows if w is not None} == {512}


def test_gemma_full_equals_generate_past_the_sliding_window(gemma):
    model, tok = gemma
    session = kb.Session(model, tok, kb.policy("full"), block_size=128)
    session.add_context(_context())
    question = "What is the code for the blue door?"
    _, text = session._suffix(session.messages + [{"role": "user", "content": question}], True)
    prompt = torch.tensor([session.input_ids + session._encode(text)[0].tolist()])
    assert prompt.shape[1] > 640  # past the 512-token window of the sliding layers
    turn = session.ask_detailed(question, max_new_tokens=10)
    ref = model.generate(prompt, max_new_tokens=10, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert turn.token_ids == ref[: len(turn.token_ids)]
    assert len(turn.token_ids) == 10 or ref[len(turn.token_ids)] in session.eos


def test_gemma_budget_binds_every_layer(gemma):
    """The budget binds the sliding layers too (96 < the 511 their window would hold)."""
    model, tok = gemma
    session = kb.Session(model, tok, kb.policy("snapkv", budget=96), block_size=128)
    session.add_context(_context())
    assert all(layer.max_entries == 96 for layer in session.cache.layers)
    assert session.cache.peak_entries() <= 96 + 128
    assert session.ask("What is the code for the blue door?", max_new_tokens=8)
