"""Models as users load them: plain transformers models (no kvbudget helper) in a Session and in
`model.generate`, models whose attention bypasses the hook, sliding-window layers under the
budget, families the cache cannot hold, EpiCache without a shipped profile, and fused ops
recognised by what they compute. Tiny random-weight models, built here with transformers."""

import copy
import logging
import warnings

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BartConfig,
    DeepseekV3Config,
    DynamicCache,
    Gemma2Config,
    JambaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    Qwen3Config,
)

import kvbudget as kb
from kvbudget.runtime import fusion
from kvbudget.errors import UnsupportedModelError
from kvbudget.runtime.modelcall import cache_argument, run
from kvbudget.runtime.decoder import StaticDecoder

from conftest import random_ids

V = 96
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def _plain(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _tokens(model, cache, ids: torch.Tensor, policy, steps: int = 10, block: int = 16) -> list[int]:
    """Block-wise prefill then greedy eager decoding, compressing every step."""
    logits, _ = kb.prefill(model, cache, policy, ids, block)
    out = []
    for _ in range(steps):
        token = int(logits[0].argmax())
        out.append(token)
        logits = run(model, cache, torch.tensor([[token]])).logits[:, -1]
        kb.compress(cache, policy)
    return out


def test_plain_model_in_a_session_and_in_generate(default_model):
    """A Llama built from a config with plain transformers: every kind of policy runs in a
    Session (the hook is attached by the cache), and `model.generate` with `kb.BudgetedCache(model)`
    gives the model's own tokens."""
    _, tok = default_model
    model = _plain(LlamaConfig(**{**SMALL, "vocab_size": len(tok)}))
    ids = random_ids(40, vocab=len(tok))
    ref = copy.deepcopy(model).generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"
    got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, cache=kb.BudgetedCache(model))
    assert torch.equal(got, ref)
    assert model.config._attn_implementation == "kvbudget_sdpa"
    for name in ("snapkv", "h2o", "adakv", "kvzip", "snapkv+kivi4"):
        session = kb.Session(_plain(LlamaConfig(**{**SMALL, "vocab_size": len(tok)})), tok, kb.policy(name, budget=24))
        session.add_context("the quick brown fox jumps over the lazy dog " * 12)
        assert session.ask("What jumps?", max_new_tokens=3) is not None
        # Entries per layer, on average over its heads (Ada-KV's heads share the layer's budget).
        assert all(layer.total_entries() <= 24 * layer.n_heads for layer in session.cache.layers), name


def test_attention_that_bypasses_the_hook_is_an_error(tiny_llama):
    """A model switched back to plain sdpa after its cache was made: the first forward raises,
    naming the cause, instead of attending evicted entries with the model's own mask."""
    model = copy.deepcopy(tiny_llama)
    policy = kb.policy("snapkv", budget=16)
    cache = policy.new_cache(model)
    model.set_attn_implementation("sdpa")
    with pytest.raises(UnsupportedModelError, match="did not go through kvbudget's attention hook"):
        kb.prefill(model, cache, policy, random_ids(40), 16)
    model.set_attn_implementation("kvbudget_sdpa")  # the failed forward left nothing behind
    kb.prefill(model, policy.new_cache(model), policy, random_ids(40), 16)


class _OwnCache(LlamaForCausalLM):
    """A model that ignores the cache it is handed (it keeps one of its own)."""

    def forward(self, *args, cache=None, **kwargs):
        return super().forward(*args, cache=DynamicCache(config=self.config), **kwargs)


def test_model_that_ignores_the_cache_is_an_error():
    torch.manual_seed(0)
    model = _OwnCache(LlamaConfig(**SMALL)).eval()
    policy = kb.policy("streaming", budget=16)
    with pytest.raises(UnsupportedModelError, match="did not store its keys and values"):
        kb.prefill(model, policy.new_cache(model), policy, random_ids(20), 16)


def test_cache_goes_under_the_argument_name_of_the_installed_transformers(default_model, recwarn, caplog):
    """No deprecation warning from kvbudget's calls: neither a FutureWarning nor transformers'
    logged one."""
    model, tok = default_model
    assert cache_argument(model) in ("cache", "past_key_values")
    caplog.set_level(logging.WARNING, logger="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        session = kb.Session(model, tok, kb.policy("snapkv", budget=64), block_size=64)
        session.add_context("A short note: the code for the blue door is 4721. " * 4)
        session.ask("What is the code for the blue door?", max_new_tokens=4)
    assert not [w for w in recwarn if issubclass(w.category, (FutureWarning, DeprecationWarning))
                and "past_key_values" in str(w.message)]
    assert "deprecated" not in caplog.text


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_sliding_window_layers_hold_the_budget_and_stay_exact(family):
    """Mistral (every layer sliding) and Gemma 2 (alternating, softcapping): `full` gives the
    model's own tokens through block-wise prefill, eager and static decoding; under a budget each
    sliding layer holds at most min(budget, window - 1) entries per head; bytes follow."""
    if family == "mistral":
        config = MistralConfig(**SMALL, sliding_window=16)
    else:
        config = Gemma2Config(**SMALL, sliding_window=16)
    model = _plain(config)
    ids = random_ids(70)
    ref = copy.deepcopy(model).generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)[0, 70:].tolist()
    full = kb.policy("full")
    assert _tokens(model, full.new_cache(model), ids, full) == ref
    cache = full.new_cache(model)
    logits, _ = kb.prefill(model, cache, full, ids, 16)
    assert [layer.max_entries for layer in cache.layers if layer.window] == [15] * sum(
        1 for layer in cache.layers if layer.window)
    decoder = StaticDecoder.from_cache(model, cache, capacity=11, graph=False)
    tokens, token = [], int(logits[0].argmax())
    for _ in range(10):
        tokens.append(token)
        token = int(decoder.step(torch.tensor([token]))[0].argmax())
    assert tokens == ref
    for budget in (40, 8):
        policy = kb.policy("snapkv", budget=budget)
        cache = policy.new_cache(model)
        kb.prefill(model, cache, policy, ids, 16)
        for layer in cache.layers:
            assert layer.max_entries == (budget if layer.window is None else min(budget, 15))
        entry = policy.entry_bytes(cache)
        assert cache.nbytes() <= sum(layer.max_entries for layer in cache.layers) * entry


def test_trim_keeps_the_newest_entries_of_each_head(tiny_gemma):
    """A ragged sliding layer (Ada-KV) keeps the newest window - 1 entries of each head."""
    policy = kb.policy("adakv", budget=12)
    cache = policy.new_cache(tiny_gemma)
    kb.prefill(tiny_gemma, cache, policy, random_ids(60), 16)
    layer = cache.layers[0]
    assert layer.window == 16
    layer.window = 6  # a smaller window than the budget: the trim binds
    before = layer.view()
    layer.trim_window()
    after = layer.view()
    for h in range(before.positions.shape[1]):
        held = before.positions[0, h][before.positions[0, h] >= 0]
        kept = after.positions[0, h][after.positions[0, h] >= 0]
        assert kept.tolist() == held[-5:].tolist()


@pytest.mark.parametrize("config,why", [
    (BartConfig(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32), "encoder-decoder"),
    (DeepseekV3Config(vocab_size=V, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=16,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=2,
                      num_experts_per_tok=1, first_k_dense_replace=1), "multi-head latent attention"),
    (JambaConfig(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, num_experts=2, attn_layer_period=2,
                 attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1), "recurrent state"),
])
def test_families_the_cache_cannot_hold_are_refused_at_session_creation(config, why):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config) if not config.is_encoder_decoder else None
    with pytest.raises(UnsupportedModelError, match=why) as err:
        if model is None:  # an encoder-decoder: refused from its config already
            kb.BudgetedCache(config)
        else:
            kb.Session(model, None, kb.policy("snapkv", budget=64))
    assert config.model_type in str(err.value)


def test_epicache_profiles_a_model_without_a_shipped_profile(default_model, tmp_path, monkeypatch, capsys):
    """EpiCache on a model kvbudget ships no profile for: profiled once on the package's sample
    (announced on stderr), kept under $KVBUDGET_CACHE/profiles, reused by the next session."""
    monkeypatch.setenv("KVBUDGET_CACHE", str(tmp_path))
    _, tok = default_model
    model = _plain(Qwen3Config(**{**SMALL, "vocab_size": len(tok)}))
    session = kb.Session(model, tok, kb.policy("epicache", budget=32, episodes=2))
    assert "profiling the layer sensitivity" in capsys.readouterr().err
    saved = list((tmp_path / "profiles").glob("*.json"))
    assert len(saved) == 1
    session.add_context([{"role": "user", "content": "I moved to Lisbon in May."},
                         {"role": "assistant", "content": "Lisbon is lovely in spring."}] * 6)
    assert session.ask("Where did I move?", max_new_tokens=3) is not None
    kb.Session(model, tok, kb.policy("epicache", budget=32, episodes=2))
    assert "profiling" not in capsys.readouterr().err


def test_fused_ops_are_recognised_by_what_they_compute(caplog):
    """Llama's and Qwen 3's norms and gated MLPs are fused; Gemma 2's (1 + weight) norm and GELU
    MLP are not, and that is said once per class."""
    pytest.importorskip("triton")
    caplog.set_level(logging.INFO, logger="kvbudget")
    counts = {}
    for name, config in {"llama": LlamaConfig(**SMALL), "qwen3": Qwen3Config(**SMALL),
                         "gemma2": Gemma2Config(**SMALL)}.items():
        model = _plain(config)
        counts[name] = fusion.fuse(model)
        fusion.unfuse(model)
    assert counts["llama"] == {"rms_norm": 5, "mlp": 2, "rope": 1}
    assert counts["qwen3"]["rms_norm"] == 9 and counts["qwen3"]["mlp"] == 2  # with its q/k head norms
    assert counts["gemma2"]["rms_norm"] == 0 and counts["gemma2"]["mlp"] == 0
    assert caplog.text.count("Gemma2MLP") == 1
