"""The architecture matrix: one tiny random-weight model per decoder-only family, built the way users
build them (a transformers config handed to `AutoModelForCausalLM.from_config` or to the family's
`...ForCausalLM`), never through kvbudget's helpers and with no hook attached.

Every model is seeded, float32, 4 layers of hidden size 64 with head_dim 16, GQA where the family
has it, and 4 experts (2 per token) in MoE families. Where a family has sliding windows they are
16-96 tokens, so that a context of ~200 tokens crosses them, on both sides of the matrix's budget
(48): a window of 16 or 32 is smaller than the budget (the window binds: Phi-3, Gemma 3, GPT-OSS,
Starcoder2, Ministral), one of 64 or 96 larger (the budget binds: Mistral with every layer
sliding, Gemma 2, OLMo 3, Cohere 2, EXAONE 4). The vocabulary is the default model's
tokenizer's (SmolLM2's, 49152 ids, with a chat template: `kvbudget.runtime.models.load_tokenizer()`), and
the special token ids are that tokenizer's, as in a real checkpoint.

`UNSUPPORTED` builds, where cheap, one model of each kind of family the budgeted cache cannot serve:
multi-head latent attention with its own cache layout, state-space and linear-attention models and
hybrids, encoder-decoders.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import pytest
import torch
import transformers

from kvbudget.runtime.models import GGUF_TOKENIZERS_FIXED_IN, load_tokenizer, resolve_model_path

VOCAB = 49152  # SmolLM2's tokenizer
BOS, EOS, PAD = 1, 2, 2
SEED = 0

# The shape every family shares (names as most configs spell them).
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
HEAD_DIM = dict(head_dim=16)


@dataclass(frozen=True)
class Family:
    """One model family of the matrix and how to build its tiny model."""

    name: str
    config: str  # the transformers config class
    kwargs: dict = field(default_factory=dict)
    model: str | None = None  # the ...ForCausalLM class; None: AutoModelForCausalLM.from_config

    def available(self) -> str | None:
        """None when the installed transformers has the family, else why not."""
        if not hasattr(transformers, self.config) or (self.model and not hasattr(transformers, self.model)):
            return f"{self.name}: transformers {transformers.__version__} has no {self.model or self.config}"
        return None

    def build(self, seed: int = SEED) -> torch.nn.Module:
        """The tiny model, seeded (the same weights for the same seed), float32, in eval mode."""
        cfg = getattr(transformers, self.config)(**self.kwargs)
        torch.manual_seed(seed)
        if self.model is None:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        else:
            model = getattr(transformers, self.model)(cfg)
        return model.eval()


def _with(*parts: dict, **extra) -> dict:
    out: dict = {}
    for part in parts:
        out.update(part)
    out.update(extra)
    return out


def _alternating(n: int, first: str = "sliding_attention", second: str = "full_attention") -> list[str]:
    return [first if i % 2 == 0 else second for i in range(n)]


def _every_fourth_full(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)]


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", _with(BASE, HEAD_DIM, rope_parameters=LLAMA3_ROPE)),
    Family("mistral", "MistralConfig", _with(BASE, HEAD_DIM, sliding_window=96)),
    Family("mixtral", "MixtralConfig", _with(BASE, HEAD_DIM, num_local_experts=4, num_experts_per_tok=2)),
    Family("qwen2", "Qwen2Config", _with(BASE)),
    Family("qwen2_moe", "Qwen2MoeConfig", _with(BASE, MOE, shared_expert_intermediate_size=64)),
    Family("qwen3", "Qwen3Config", _with(BASE, HEAD_DIM)),
    Family("qwen3_moe", "Qwen3MoeConfig", _with(BASE, HEAD_DIM, MOE)),
    Family("phi3", "Phi3Config", _with(BASE, sliding_window=32)),
    Family("gemma2", "Gemma2Config", _with(
        BASE, HEAD_DIM, sliding_window=64, layer_types=_alternating(4), attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, query_pre_attn_scalar=16)),
    Family("gemma3", "Gemma3TextConfig", _with(
        BASE, HEAD_DIM, sliding_window=16, layer_types=_alternating(4)), model="Gemma3ForCausalLM"),
    Family("olmo2", "Olmo2Config", _with(BASE)),
    Family("olmo3", "Olmo3Config", _with(BASE, sliding_window=96, layer_types=_every_fourth_full(4))),
    Family("granite", "GraniteConfig", _with(
        BASE, embedding_multiplier=12.0, attention_multiplier=0.25, residual_multiplier=0.22, logits_scaling=8.0)),
    Family("smollm3", "SmolLM3Config", _with(BASE, no_rope_layers=[1, 1, 1, 0])),
    Family("gpt_oss", "GptOssConfig", _with(
        BASE, HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, sliding_window=16, layer_types=_alternating(4))),
    Family("cohere", "CohereConfig", _with(BASE)),
    Family("cohere2", "Cohere2Config", _with(BASE, sliding_window=64, layer_types=_every_fourth_full(4))),
    # Families the issue leaves open whose attention goes through transformers' interface.
    Family("starcoder2", "Starcoder2Config", _with(BASE, sliding_window=32)),
    Family("stablelm", "StableLmConfig", _with(BASE, partial_rotary_factor=0.5)),
    Family("phi", "PhiConfig", _with(BASE, partial_rotary_factor=0.5)),
    Family("exaone4", "Exaone4Config", _with(BASE, HEAD_DIM, sliding_window=64, layer_types=_every_fourth_full(4))),
    Family("ministral", "MinistralConfig", _with(BASE, HEAD_DIM, sliding_window=16, layer_types=_alternating(4))),
    Family("helium", "HeliumConfig", _with(BASE, HEAD_DIM)),
    Family("glm4", "Glm4Config", _with(BASE, HEAD_DIM)),
    Family("seed_oss", "SeedOssConfig", _with(BASE, HEAD_DIM)),
]}


# --- families the cache cannot serve --------------------------------------------------------------
@dataclass(frozen=True)
class Unsupported:
    """A family kvbudget refuses at `Session` creation, and a word its error must give as the why."""

    family: Family
    why: str  # regex, case-insensitive


UNSUPPORTED: dict[str, Unsupported] = {u.family.name: u for u in [
    Unsupported(Family("deepseek_v3", "DeepseekV3Config", _with(
        BASE, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
        first_k_dense_replace=1)), r"latent|MLA"),
    Unsupported(Family("mamba", "MambaConfig", dict(
        vocab_size=VOCAB, hidden_size=64, state_size=8, num_hidden_layers=2, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD)), r"state.space|SSM|recurrent|linear|mamba"),
    Unsupported(Family("jamba", "JambaConfig", _with(
        BASE, num_experts=2, num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8, use_mamba_kernels=False)),
        r"state.space|SSM|recurrent|linear|mamba|hybrid"),
    Unsupported(Family("falcon_h1", "FalconH1Config", _with(
        BASE, HEAD_DIM, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1,
        mamba_chunk_size=16)), r"state.space|SSM|recurrent|linear|mamba|hybrid"),
    Unsupported(Family("qwen3_next", "Qwen3NextConfig", _with(
        BASE, HEAD_DIM, MOE, shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, layer_types=_alternating(4, "linear_attention"))),
        r"state.space|SSM|recurrent|linear|hybrid"),
    Unsupported(Family("lfm2", "Lfm2Config", _with(
        BASE, layer_types=["conv", "full_attention", "conv", "full_attention"])),
        r"state.space|SSM|recurrent|linear|conv|hybrid"),
    Unsupported(Family("t5", "T5Config", dict(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=PAD,
        eos_token_id=EOS, pad_token_id=PAD), model="T5ForConditionalGeneration"), r"encoder"),
    Unsupported(Family("bart", "BartConfig", dict(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, decoder_start_token_id=EOS), model="BartForConditionalGeneration"), r"encoder"),
]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread: their matmuls are small, and two threads on a busy
    2-core machine wait on each other (a [32, 64] x [64, 64] matmul took 53 us on one thread and
    31 ms on two while other jobs ran)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The default model's tokenizer (SmolLM2's: chat template, ids below `VOCAB`)."""
    tok = load_tokenizer()
    assert len(tok) == VOCAB and (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS), (
        f"the default model's tokenizer has {len(tok)} tokens, BOS {tok.bos_token_id}, EOS {tok.eos_token_id} "
        f"(converted by transformers < {GGUF_TOKENIZERS_FIXED_IN}? delete {resolve_model_path()} and convert again)")
    return tok


def layer_windows(model) -> list[int | None]:
    """Each layer's sliding window as the model's config states it (None: full attention)."""
    cfg = model.config.get_text_config(decoder=True)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [window] * cfg.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]
