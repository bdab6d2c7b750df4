"""Install kvbudget's fused element-wise kernels (`kernels.fused`) on a transformers model.

`fuse(model)` changes, on this model instance only:

* every Llama-style RMSNorm (``weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``): its forward
  becomes one kernel;
* every Llama-style gated MLP (``down(silu(gate(x)) * up(x))``): the activation and the product
  become one kernel (concatenating gate and up into one matmul was measured too: no faster on the
  H100, so the weights are left as they are);
* RoPE: the model file's ``apply_rotary_pos_emb`` is replaced by a function that runs one kernel
  for q and k. The function is a module global in transformers, so this is the one change that
  reaches every model of that architecture in the process; it falls back to the original for
  anything the kernel does not cover (CPU tensors, mixed dtypes, other layouts), so the others
  compute exactly what they did.

Each patched forward runs the kernel only for CUDA tensors (Triton is a GPU compiler) and
otherwise calls the class's own forward, so a fused model still runs on CPU. Modules are matched
by what their forward computes (its source), not by class name: Gemma's ``(1 + weight)`` norm,
Qwen3's head norms and a GELU MLP are left alone unless they compute the same thing.

Used by `kvbudget.static.StaticDecoder` on CUDA (``KVBUDGET_FUSED_OPS=auto``, the default;
``off`` leaves the model untouched). The numbers are in docs/benchmarks.md, "GPU performance".
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import types

import torch
from torch import Tensor, nn

FUSED_OPS = ("auto", "off")
# Tests set this to run the kernels on CPU tensors under Triton's interpreter.
FORCE_KERNELS = False

_RMS_SIGNATURE = ("torch.rsqrt(variance + self.variance_epsilon)", "self.weight * hidden_states.to(input_dtype)")
_MLP_SIGNATURE = ("self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",)
_ROPE_SIGNATURE = ("q_embed = (q * cos) + (rotate_half(q) * sin)", "k_embed = (k * cos) + (rotate_half(k) * sin)")


def mode() -> str:
    """``KVBUDGET_FUSED_OPS`` (read at each call): "auto" fuses on CUDA, "off" never."""
    value = os.environ.get("KVBUDGET_FUSED_OPS", "auto").strip().lower() or "auto"
    if value not in FUSED_OPS:
        raise ValueError(f"KVBUDGET_FUSED_OPS must be one of {', '.join(FUSED_OPS)}, got '{value}'")
    return value


@functools.cache
def _kernels():
    # Cached: the patched forwards call this on every layer of every forward pass.
    from . import kernels

    if not kernels.HAVE_TRITON:
        return None
    from .kernels import fused

    return fused


def _use_kernel(x: Tensor) -> bool:
    return (x.is_cuda or FORCE_KERNELS) and not torch.compiler.is_compiling()


def kernels_for(x: Tensor):
    """The `kernels.fused` module if its kernels should run on ``x`` (a CUDA tensor, Triton
    available, ``KVBUDGET_FUSED_OPS`` not "off"), else None."""
    if not _use_kernel(x) or mode() == "off":
        return None
    return _kernels()


@functools.cache
def _computes(fn, signature: tuple[str, ...]) -> bool:
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    return all(line in source for line in signature)


# --- the patched forwards -----------------------------------------------------------------------
def _rms_forward(self, hidden_states: Tensor) -> Tensor:
    if _use_kernel(hidden_states):
        return _kernels().rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _mlp_forward(self, x: Tensor) -> Tensor:
    if not _use_kernel(x):
        return type(self).forward(self, x)
    return self.down_proj(_kernels().silu_mul(self.gate_proj(x), self.up_proj(x)))


def _rope_function(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        fused = _kernels()
        if _use_kernel(q) and fused.rope_supported(q, k, cos, sin, unsqueeze_dim):
            return fused.apply_rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.kvbudget_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


# --- installing -----------------------------------------------------------------------------
def _fusable_mlp(mlp: nn.Module) -> bool:
    return type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation") and all(
        hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))


KINDS = ("rms_norm", "mlp", "rope")


def fuse(model: nn.Module, kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Install the fused kernels on ``model`` (idempotent); returns how many modules of each kind
    were fused (all zero when Triton is unavailable). ``kinds``: a subset of `KINDS`, to measure
    them one at a time. See the module docstring."""
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fused kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    counts = {"rms_norm": 0, "mlp": 0, "rope": 0}
    if _kernels() is None:
        return counts
    if getattr(model, "kvbudget_fused_ops", None) is not None:  # StaticDecoder calls this per answer
        return model.kvbudget_fused_ops
    for module in model.modules():
        cls = type(module)
        if getattr(module, "kvbudget_fused", False):
            continue
        if "rms_norm" in kinds and hasattr(module, "variance_epsilon") and _computes(cls.forward, _RMS_SIGNATURE):
            module.forward = types.MethodType(_rms_forward, module)
            module.kvbudget_fused = True
            counts["rms_norm"] += 1
        elif "mlp" in kinds and _computes(cls.forward, _MLP_SIGNATURE) and _fusable_mlp(module):
            module.forward = types.MethodType(_mlp_forward, module)
            module.kvbudget_fused = True
            counts["mlp"] += 1
        elif "rope" in kinds and "Attention" in cls.__name__:
            counts["rope"] += _patch_rope(sys.modules.get(cls.__module__))
    model.kvbudget_fused_ops = counts
    return counts


def _wrapped_function(fn):
    """The function a `kernels` hub wrapper holds (transformers >= 5.2x turns functions such as
    ``apply_rotary_pos_emb`` into a `Func` module whose forward closes over the function), so
    that its source can be checked; ``fn`` itself otherwise."""
    if isinstance(fn, nn.Module):
        try:
            return inspect.getclosurevars(type(fn).forward).nonlocals.get("func", fn)
        except TypeError:
            return fn
    return fn


def _patch_rope(modeling) -> int:
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None or hasattr(fn, "kvbudget_original") or not _computes(_wrapped_function(fn), _ROPE_SIGNATURE):
        return 0
    modeling.apply_rotary_pos_emb = _rope_function(fn)
    return 1


def unfuse(model: nn.Module) -> None:
    """Undo `fuse`: the modules' own forwards and transformers' RoPE function again."""
    for module in model.modules():
        if getattr(module, "kvbudget_fused", False):
            del module.forward
            module.kvbudget_fused = False
        elif "Attention" in type(module).__name__:
            modeling = sys.modules.get(type(module).__module__)
            fn = getattr(modeling, "apply_rotary_pos_emb", None)
            if hasattr(fn, "kvbudget_original"):
                modeling.apply_rotary_pos_emb = fn.kvbudget_original
    if hasattr(model, "kvbudget_fused_ops"):
        del model.kvbudget_fused_ops


def maybe_fuse(model: nn.Module, device: torch.device) -> dict[str, int] | None:
    """`fuse` when ``device`` is CUDA and ``KVBUDGET_FUSED_OPS`` is "auto"; None otherwise."""
    if device.type != "cuda" or mode() == "off":
        return None
    return fuse(model)
