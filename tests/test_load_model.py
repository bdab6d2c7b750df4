"""`kb.load_model(path)`: a local checkpoint directory (what `save_pretrained` writes) or a local
GGUF file of a family, converted once to safetensors under ``$KVBUDGET_CACHE`` and read from there
afterwards; anything else is a clear `ModelNotFoundError` naming the path."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import gguf
import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

import kvbudget as kb
from kvbudget.errors import ModelNotFoundError
from kvbudget.runtime.models import GGUF_TOKENIZERS_FIXED_IN

from families import FAMILIES, one_thread, tokenizer  # noqa: F401 (a fixture)

TEXT = "Hello, world! The code for the blue door is 4721.\n  Indented: x = f(a, b)"


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


# --- checkpoint directories ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma2", "gpt_oss", "mistral", "phi3"])
def test_a_saved_checkpoint_loads_ready_for_a_session(family, tmp_path):
    model, tok = FAMILIES[family].build(), tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = kb.load_model(str(tmp_path))
    assert type(loaded) is type(model) and loaded.kvbudget_name == tmp_path.name
    ids = loaded_tok(TEXT).input_ids
    assert ids == tok(TEXT).input_ids and loaded_tok.chat_template == tok.chat_template
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
    session = kb.Session(loaded, loaded_tok, kb.policy("knorm", budget=32), block_size=32)
    session.add_context(TEXT * 6)
    assert session.cache.nbytes() > 0 and session.ask_detailed("Which code?", max_new_tokens=3).token_ids


# --- GGUF files ----------------------------------------------------------------------------------
SMALL_VOCAB = 1024  # the first ids of SmolLM2's tokenizer: its special tokens, the bytes, early merges


def _small_tokenizer_spec() -> dict:
    """SmolLM2's tokenizer cut to its first `SMALL_VOCAB` ids (and the merges among them): a valid
    byte-level BPE whose GGUF metadata parses in milliseconds (the full 49k-token vocabulary takes
    transformers' GGUF reader about a minute on two cores)."""
    spec = json.loads(tokenizer().backend_tokenizer.to_str())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < SMALL_VOCAB}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < SMALL_VOCAB]
    return spec


def _small_tokenizer() -> PreTrainedTokenizerFast:
    tok = tokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(_small_tokenizer_spec())), bos_token=tok.bos_token,
        eos_token=tok.eos_token, pad_token=tok.pad_token, unk_token=tok.unk_token, chat_template=tok.chat_template)


def write_gguf(model, path, arch: str) -> None:
    """Write ``model`` (float32 tensors) and the small tokenizer as a GGUF file, with the metadata
    transformers' GGUF loader reads (`transformers.integrations.ggml.GGUF_CONFIG_MAPPING` and the
    ``tokenizer.ggml.*`` fields), tensors named and laid out as llama.cpp's converter writes them."""
    cfg = model.config
    spec, tok = _small_tokenizer_spec(), tokenizer()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    special = {a["id"] for a in spec["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # no output.weight: the loader ties the embeddings
        data = tensor.detach().float().numpy()
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, f"no GGUF name for {name}"
        if arch == "llama" and (".attn_q." in target or ".attn_k." in target):
            # llama.cpp interleaves each head's rotary halves; transformers' loader undoes it.
            heads = cfg.num_attention_heads if ".attn_q." in target else cfg.num_key_value_heads
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
        writer.add_tensor(target, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _small_model(family: str):
    fam = FAMILIES[family]
    kwargs = dict(fam.kwargs, vocab_size=SMALL_VOCAB)
    if family == "llama":  # GGUF carries llama3 scaling as a tensor of frequencies: plain RoPE here
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return dataclasses.replace(fam, kwargs=kwargs).build()


needs_gguf_tokenizers = pytest.mark.skipif(
    Version(transformers.__version__) < Version(GGUF_TOKENIZERS_FIXED_IN),
    reason=f"transformers {transformers.__version__} converts GGUF tokenizers with wrong special tokens "
           f"(fixed in {GGUF_TOKENIZERS_FIXED_IN})")


@needs_gguf_tokenizers
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_gguf_file_loads_and_converts_once(family, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBUDGET_CACHE", str(tmp_path / "cache"))
    model, small = _small_model(family), _small_tokenizer()
    path = tmp_path / f"tiny-{family}.gguf"
    write_gguf(model, path, family)

    loaded, tok = kb.load_model(str(path))
    assert type(loaded) is type(model) and loaded.kvbudget_name == f"tiny-{family}"
    ids = tok(TEXT).input_ids
    assert ids == small(TEXT).input_ids and tok.decode(ids) == TEXT
    assert tok.chat_template == small.chat_template and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
    (copy,) = (tmp_path / "cache" / "models" / "gguf").iterdir()
    assert (copy / "config.json").exists() and list(copy.glob("*.safetensors"))

    # Later loads read the converted copy: the GGUF file is not parsed again (its bytes are zeroed
    # here behind its magic, with the same size and modification time: parsing it would fail).
    stat = path.stat()
    path.write_bytes(b"GGUF" + bytes(stat.st_size - 4))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again, again_tok = kb.load_model(str(path))
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=1e-5)
    assert again_tok(TEXT).input_ids == ids
    assert [p.name for p in (tmp_path / "cache" / "models" / "gguf").iterdir()] == [copy.name]


@needs_gguf_tokenizers
def test_a_rewritten_gguf_file_converts_again(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBUDGET_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    write_gguf(_small_model("qwen2"), path, "qwen2")
    kb.load_model(str(path))
    other = _small_model("qwen2")
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    stat = path.stat()
    path.unlink()
    write_gguf(other, path, "qwen2")  # the same size: only the modification time tells them apart
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert path.stat().st_size == stat.st_size
    loaded, tok = kb.load_model(str(path))
    ids = tok(TEXT).input_ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(other, ids), rtol=0, atol=1e-5)
    assert len(list((tmp_path / "cache" / "models" / "gguf").iterdir())) == 2


# --- errors --------------------------------------------------------------------------------------
def test_a_path_that_is_no_model_is_a_clear_error(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    empty = tmp_path / "empty"
    empty.mkdir()
    for path in (text, empty, tmp_path / "missing.gguf", tmp_path / "missing"):
        with pytest.raises(ModelNotFoundError, match=re.escape(str(path))):
            kb.load_model(str(path))
    (empty / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="model.gguf"):  # points at the file to pass
        kb.load_model(str(empty))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(ModelNotFoundError, match="broken.gguf"):
        kb.load_model(str(tmp_path / "broken.gguf"))
