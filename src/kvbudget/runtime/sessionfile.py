"""Session files: one conversation's compressed cache, saved and loaded back exactly.

A session file is one safetensors file. Its tensors are the cache, layer by layer (keys, values,
positions, the ragged length table, per-entry scorer state, observed queries, and a store's
encoded body); its header metadata (key ``kvbudget``) is JSON with everything else: the model's
identity, the policy as `make_policy` was called, the conversation (messages, rendered text,
token ids) and per-layer scalars. A SHA-256 over all tensor bytes (each tensor's own SHA-256,
hashed side by side: `_checksum`) catches corruption that the safetensors header alone would
not. Version-1 files, whose checksum hashes the bytes in one sequence, are read too.

Loading checks the file before building anything: a truncated file, a corrupt one, or one saved
with another model (a hash of its config and of a few embedding rows) raise `SessionFileError`.
Saving writes a temp file and renames it over the target (`fileio.atomic_open`), so a failure or
a kill mid-write leaves the previous file as it was. Tensors are copied to the CPU when saved
and to the model's device when loaded, on a GPU through a copy stream of the calling thread
(`transfer.copy_to_device`, `copy_to_host`): a server's I/O threads copy beside the model's work.

Files are read and written here rather than by `safetensors.torch.load` / ``save`` (the layout
is the safetensors one, tensors ordered as safetensors orders them, and safetensors reads the
files): those build every tensor's bytes as Python objects, copying the whole file while holding
the interpreter lock, and a server reads and writes session files on I/O threads while its model
thread decodes. Here the bulk bytes move only through calls that release the lock (file reads
into a tensor's memory, writes and hashing from tensor memory, tensor copies).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from ..compress import Policy
from ..errors import KVBudgetError, SessionFileError
from ..fileio import atomic_open
from ..kv.body import Body
from ..kv.cache import BudgetedCache
from ..kv.dense import DenseEntries
from ..kv.encoded import EncodedEntries
from ..kv.layer import BudgetedLayer
from ..kv.ragged import RaggedEntries
from ..methods import make_policy
from ..transfer import copy_to_device, copy_to_host
from .prefill import PrefillStats

FORMAT = "kvbudget-session"
VERSION = 2
READS = (1, 2)  # the versions read (they differ in the checksum only: `_checksum`)
META_KEY = "kvbudget"
# The safetensors names of the tensor types.
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
          "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
          "F64": torch.float64, "I64": torch.int64, "U64": torch.uint64}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Config keys that say how a model is run, not what it computes: left out of the config hash so
# that the same weights loaded with another attention implementation still match.
_RUNTIME_KEYS = {"transformers_version", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
                 "dtype", "torch_dtype", "name_or_path"}


# --- model identity ---------------------------------------------------------------------------
def _config_dict(value):
    if isinstance(value, dict):
        return {str(k): _config_dict(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if not str(k).startswith("_") and k not in _RUNTIME_KEYS}
    if isinstance(value, (list, tuple)):
        return [_config_dict(v) for v in value]
    return value


def model_identity(model) -> dict:
    """Name, config hash and weights fingerprint of ``model``: a session file only loads into
    the model it was saved with. The fingerprint hashes a few embedding rows (cheap) so that two
    models with the same config but different weights (random tiny models, fine-tunes) differ."""
    config = json.dumps(_config_dict(model.config.to_dict()), sort_keys=True, default=str)
    rows = model.get_input_embeddings().weight[:8].detach().float().cpu().contiguous()
    return {
        "model": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "weights_sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def check_model(meta: dict, model, path: Path) -> None:
    saved, here = meta["model"], model_identity(model)
    if saved["config_sha256"] != here["config_sha256"] or saved["weights_sha256"] != here["weights_sha256"]:
        raise SessionFileError(
            f"{path}: session was saved with model {saved['model']!r} (config {saved['config_sha256'][:12]}, "
            f"weights {saved['weights_sha256'][:12]}), not with this model {here['model']!r} "
            f"(config {here['config_sha256'][:12]}, weights {here['weights_sha256'][:12]})"
        )
    if saved["dtype"] != here["dtype"]:
        raise SessionFileError(f"{path}: session cache is {saved['dtype']}, the model runs in {here['dtype']}")


# --- tensors <-> layers -----------------------------------------------------------------------
def _bytes(t: Tensor):
    """The bytes of a contiguous CPU tensor, without a copy (a buffer the hash and the file
    write read with the interpreter lock released)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def held(t: Tensor) -> Tensor:
    """A tensor of a session's state as a file takes it: the tensor itself, on its device (the
    copy to the CPU is `write_file`'s, on whichever thread writes)."""
    return t.detach()


def _budgeted_to_file(prefix: str, layer: BudgetedLayer, tensors: dict[str, Tensor]) -> dict:
    observed = layer.observed
    meta = {"kind": "budgeted", "initialized": bool(layer.is_initialized), "seen": layer.seen,
            "peak_entries": layer.peak_entries, "scaling": observed.scaling, "residual": layer.residual}
    if not layer.is_initialized:
        return meta
    entries = layer.entries
    named = {"keys": entries.keys, "values": entries.values, "positions": entries.positions,
             "head_lens": getattr(entries, "head_lens", None),
             "queries": observed.queries, "query_positions": observed.positions, "lse": observed.lse}
    named.update({f"state.{k}": v for k, v in entries.state.items()})
    meta["state"] = sorted(entries.state)
    body = getattr(entries, "body", None)
    if body is not None:
        if not isinstance(body, Body):
            raise KVBudgetError(
                f"saving a session whose store is '{layer.store.name}' is not supported yet "
                "(its layers share merged data across layer pairs)"
            )
        named.update({f"body.tokens.{k}": v for k, v in body.tokens.items()})
        named.update({f"body.chunks.{k}": v for k, v in body.chunks.items()})
        named["body.chunk_id"] = body.chunk_id
        meta["body"] = {"tokens": sorted(body.tokens), "chunks": sorted(body.chunks)}
    for name, t in named.items():
        if t is not None:
            tensors[f"{prefix}.{name}"] = held(t)
    return meta


def _budgeted_from_file(prefix: str, layer: BudgetedLayer, meta: dict, tensors: dict[str, Tensor]) -> None:
    layer.seen, layer.peak_entries, layer.residual = meta["seen"], meta["peak_entries"], meta["residual"]
    layer.observed.scaling = meta["scaling"]
    if not meta["initialized"]:
        return

    def get(name: str) -> Tensor | None:
        return tensors.get(f"{prefix}.{name}")

    keys, values, positions = get("keys"), get("values"), get("positions")
    state = {k: get(f"state.{k}") for k in meta["state"]}
    layer.dtype, layer.device = keys.dtype, keys.device
    observed = layer.observed
    observed.queries, observed.positions, observed.lse = get("queries"), get("query_positions"), get("lse")
    head_lens = get("head_lens")
    if layer.store is not None:
        body = None
        if "body" in meta:
            body = Body(
                tokens={k: get(f"body.tokens.{k}") for k in meta["body"]["tokens"]},
                chunk_id=get("body.chunk_id"),
                chunks={k: get(f"body.chunks.{k}") for k in meta["body"]["chunks"]},
            )
        layer.entries = EncodedEntries(layer.store, body, keys, values, positions, state)
    elif head_lens is not None:
        layer.entries = RaggedEntries(keys, values, positions, state, head_lens, tuple(head_lens.tolist()))
    else:
        layer.entries = DenseEntries(keys, values, positions, state)
    layer.is_initialized = True


@functools.cache
def _hashers() -> ThreadPoolExecutor:
    """Threads hashing tensors side by side (hashlib releases the interpreter lock on large
    buffers), shared by every thread that reads or writes a session file."""
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="kvbudget-hash")


os.register_at_fork(after_in_child=_hashers.cache_clear)  # a forked process has none of its parent's threads


def _checksum(tensors: dict[str, Tensor], version: int) -> str:
    """The file's checksum: a SHA-256 over every tensor's name, type and shape, and its bytes.
    In version 2 a tensor's bytes enter as their own SHA-256, the tensors hashed side by side, so
    that checking a file of a few hundred MiB, at every load and every save, is not one core's
    sequential work; in version 1 they enter as they are, in one sequential hash."""
    host = {name: tensors[name].detach().cpu().contiguous() for name in sorted(tensors)}
    parts = (_hashers().map(lambda t: hashlib.sha256(_bytes(t)).digest(), host.values()) if version >= 2
             else (_bytes(t) for t in host.values()))
    h = hashlib.sha256()
    for (name, t), part in zip(host.items(), parts):
        h.update(f"{name}:{t.dtype!s}:{list(t.shape)};".encode())
        h.update(part)
    return h.hexdigest()


def cache_to_file(prefix: str, cache: BudgetedCache, tensors: dict[str, Tensor]) -> dict:
    """Add ``cache``'s tensors (named ``prefix + "layers.<i>..."``) and return its metadata."""
    if cache._scratch:
        raise KVBudgetError("cannot save a session in the middle of a turn")
    layers = []
    for i, layer in enumerate(cache.layers):
        name = f"{prefix}layers.{i}"
        if isinstance(layer, BudgetedLayer):
            layers.append(_budgeted_to_file(name, layer, tensors))
        else:
            raise KVBudgetError(f"cannot save cache layer {i} of type {type(layer).__name__}")
    if cache.unscored:
        tensors[f"{prefix}unscored"] = held(torch.cat(cache.unscored, dim=1))
    return {"peak_bytes": cache.peak_bytes, "kv_bytes": cache.nbytes(), "rolled": cache.rolled, "layers": layers}


def cache_from_file(prefix: str, cache: BudgetedCache, meta: dict, tensors: dict[str, Tensor], path: Path) -> None:
    """Fill the empty ``cache`` (built by the same policy on the same model) from the file."""
    layers = meta["layers"]
    if len(layers) != len(cache.layers):
        raise SessionFileError(f"{path}: {len(layers)} cache layers saved, the model has {len(cache.layers)}")
    for i, (layer, layer_meta) in enumerate(zip(cache.layers, layers)):
        name = f"{prefix}layers.{i}"
        if layer_meta["kind"] == "budgeted" and isinstance(layer, BudgetedLayer):
            _budgeted_from_file(name, layer, layer_meta, tensors)
        else:
            raise SessionFileError(f"{path}: layer {i} was saved as {layer_meta['kind']}, the model's is {type(layer).__name__}")
    cache.peak_bytes = meta["peak_bytes"]
    cache.rolled = meta.get("rolled", 0)  # positions given back by key re-rotation (none in older files)
    cache.unscored = [tensors[f"{prefix}unscored"]] if f"{prefix}unscored" in tensors else []


def write_file(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> int:
    """Write a session file of ``tensors`` (on any device: copied to the CPU here) and ``meta``
    (completed with the format, version and checksum) to ``path`` atomically (temp file +
    rename); returns the bytes written. The previous file at ``path``, if any, stays intact
    until the new one is complete."""
    # Copies of its own on the host: what is hashed is what is written, whatever the session does meanwhile.
    tensors = copy_to_host(tensors)
    meta = {"format": FORMAT, "version": VERSION, **meta, "checksum": _checksum(tensors, VERSION)}
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))  # aligned, as safetensors
    header: dict = {}
    at = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise KVBudgetError(f"cannot save a tensor of type {t.dtype} in a session file ({name})")
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + t.nbytes]}
        at += t.nbytes
    header["__metadata__"] = {META_KEY: json.dumps(meta)}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the tensor data starts 8-byte aligned
    with atomic_open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name in order:
            f.write(_bytes(tensors[name]))
    return 8 + len(head) + at


# --- a session's state --------------------------------------------------------------------------
# ``session`` below is a `runtime.session.Session`: its caches are described by its
# ``caches_to_file`` and loaded by its ``caches_from_file`` (an episodic session holds several).
def session_to_file(session) -> tuple[dict[str, Tensor], dict]:
    """The tensors and the JSON metadata that describe ``session`` completely."""
    policy = session.policy
    if policy.spec is None:
        raise KVBudgetError("cannot save a session whose policy was not built by kb.policy() (its settings are unknown)")
    tensors: dict[str, Tensor] = {}
    meta = {
        "model": model_identity(session.model),
        "policy": {**policy.spec, "resolved_name": policy.name, "tokens": session.tokens,
                   "target_bytes": session.target_bytes, "rerotate": policy.rerotate},
        "next_position": session.next_position,
        "block_size": session.block_size,
        "messages": copy.deepcopy(session.messages),
        "rendered": session.rendered,
        "input_ids": list(session.input_ids),
        "stats": asdict(session.stats),
        "kv_bytes": session.stored_bytes,
        **session.caches_to_file(tensors),
    }
    return tensors, meta


def policy_from_file(meta: dict, path: Path) -> Policy:
    """The policy a session file was saved with, built again by `make_policy`."""
    spec = meta["policy"]
    # The block size is the session's: an older file may carry it among the policy's arguments.
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "block_size"}
    try:
        return make_policy(spec["name"], budget=spec["budget"], **kwargs)
    except KVBudgetError as exc:
        raise SessionFileError(f"{path}: cannot rebuild its policy: {exc}") from None


def restore_session(session, meta: dict, tensors: dict[str, Tensor], path: Path) -> None:
    """Give ``session`` (new, of the policy `policy_from_file` built) the saved budget, caches and
    conversation."""
    session.tokens = meta["policy"]["tokens"]  # a ratio budget was resolved against that context
    session.target_bytes = meta["policy"].get("target_bytes")  # None in a file without it: the tokens stand
    session.caches_from_file(meta, tensors, path)
    session.messages = meta["messages"]
    session.rendered = meta["rendered"]
    session.input_ids = meta["input_ids"]
    session.stats = PrefillStats(**meta["stats"])


# --- load ---------------------------------------------------------------------------------------
def _parse_header(head: bytes, size: int, path: Path) -> tuple[int, dict, dict]:
    """(header length, safetensors header, kvbudget metadata) from the first bytes of a file of
    ``size`` bytes; every way the file can be short or malformed is a `SessionFileError`."""
    if size < 8:
        raise SessionFileError(f"{path}: not a session file (only {size} bytes)")
    n = int.from_bytes(head[:8], "little")
    if n <= 0 or 8 + n > size:
        raise SessionFileError(f"{path}: truncated or not a session file (header of {n} bytes, file of {size})")
    try:
        header = json.loads(head[8 : 8 + n])
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError):
        raise SessionFileError(f"{path}: not a kvbudget session file (no readable kvbudget metadata)") from None
    if meta.get("format") != FORMAT:
        raise SessionFileError(f"{path}: not a kvbudget session file (format {meta.get('format')!r})")
    if meta.get("version") not in READS:
        raise SessionFileError(f"{path}: session file version {meta.get('version')} (this kvbudget reads "
                               f"{', '.join(map(str, READS))})")
    data_size = size - 8 - n
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise SessionFileError(f"{path}: corrupt session file (malformed tensor table)") from None
    if end > data_size:
        raise SessionFileError(f"{path}: truncated session file ({data_size} bytes of tensor data, {end} expected)")
    return n, header, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of a session file, read from its header only (no tensors)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            first = f.read(8)
            n = int.from_bytes(first, "little") if len(first) == 8 else 0
            head = first + f.read(min(n, max(size - 8, 0)))
    except FileNotFoundError:
        raise SessionFileError(f"{path}: no such session file") from None
    return _parse_header(head, size, path)[2]


def read_session_file(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """The tensors (on ``device``) and metadata of a session file, checked whole."""
    path = Path(path)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            # Pinned for a GPU: the copies to it then run beside the model's work (`copy_to_device`).
            data = torch.empty(size, dtype=torch.uint8, pin_memory=torch.device(device).type == "cuda")
            view, got = memoryview(data.numpy()), 0
            while got < size and (n := f.readinto(view[got:])):
                got += n
    except FileNotFoundError:
        raise SessionFileError(f"{path}: no such session file") from None
    n = int.from_bytes(bytes(view[:8]), "little") if got >= 8 else 0
    n, header, meta = _parse_header(bytes(view[: 8 + min(n, got)]), got, path)
    tensors = {}
    try:
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = (8 + n + int(x) for x in info["data_offsets"])
                tensors[name] = data[begin:end].view(DTYPES[info["dtype"]]).reshape(info["shape"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise SessionFileError(f"{path}: corrupt session file (tensor {name!r}: {exc!r})") from None
    if _checksum(tensors, meta["version"]) != meta.get("checksum"):
        raise SessionFileError(f"{path}: corrupt session file (tensor data does not match its checksum)")
    return copy_to_device(tensors, device), meta  # (copies: the file's buffer goes)
