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
by what they compute, once per class: a module that has an RMSNorm's attributes (``weight``,
``variance_epsilon``) or a gated MLP's (``gate_proj``, ``up_proj``, ``down_proj``, a SiLU
``act_fn``) is run on a small random input (with random weights, through
`torch.func.functional_call`: the module is not touched) and fused only if it gives the formula's
result; RoPE's function is probed the same way. Gemma's ``(1 + weight)`` norm, a GELU MLP or a
partial rotary embedding are left to the model's own code, and `fuse` says so once per class.

Used by `kvbudget.static.StaticDecoder` on CUDA (``KVBUDGET_FUSED_OPS=auto``, the default;
``off`` leaves the model untouched). The numbers are in docs/benchmarks.md, "Decode speed at batch 1".
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types

import torch
from torch import Tensor, nn

FUSED_OPS = ("auto", "off")
# Tests set this to run the kernels on CPU tensors under Triton's interpreter.
FORCE_KERNELS = False

log = logging.getLogger("kvbudget")


def mode() -> str:
    """``KVBUDGET_FUSED_OPS`` (read at each call): "auto" fuses on CUDA, "off" never."""
    value = os.environ.get("KVBUDGET_FUSED_OPS", "auto").strip().lower() or "auto"
    if value not in FUSED_OPS:
        raise ValueError(f"KVBUDGET_FUSED_OPS must be one of {', '.join(FUSED_OPS)}, got '{value}'")
    return value


@functools.cache
def _kernels():
    # Cached: the patched forwards call this on every layer of every forward pass.
    from .. import kernels

    if not kernels.HAVE_TRITON:
        return None
    from ..kernels import fused

    return fused


def _use_kernel(x: Tensor) -> bool:
    return (x.is_cuda or FORCE_KERNELS) and not torch.compiler.is_compiling()


def kernels_for(x: Tensor):
    """The `kernels.fused` module if its kernels should run on ``x`` (a CUDA tensor, Triton
    available, ``KVBUDGET_FUSED_OPS`` not "off"), else None."""
    if not _use_kernel(x) or mode() == "off":
        return None
    return _kernels()


# --- recognising the ops by what they compute ----------------------------------------------------
def _probe_input(n: int, generator: torch.Generator) -> Tensor:
    return torch.randn(2, 3, n, generator=generator, dtype=torch.float32)


def _rms_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@torch.no_grad()
def _is_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` computes ``weight * (x * rsqrt(mean(x^2) + eps))`` (Llama's RMSNorm):
    run once on a random input with a random weight, on the CPU in float32."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not isinstance(weight, Tensor) or weight.dim() != 1 or not isinstance(eps, float):
        return False
    gen = torch.Generator().manual_seed(0)
    x, w = _probe_input(weight.shape[0], gen), torch.randn(weight.shape[0], generator=gen) + 2.0
    probe = type(module).__new__(type(module))
    probe.__dict__.update({**module.__dict__, "_parameters": {"weight": nn.Parameter(w)}, "_buffers": {}})
    try:
        out = type(module).forward(probe, x)
    except Exception:  # noqa: BLE001 - a module that cannot run the probe is not this op
        return False
    return isinstance(out, Tensor) and torch.allclose(out, _rms_reference(x, w, eps), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def _is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` computes ``down(silu(gate(x)) * up(x))``: run once on a random input
    through small random linear layers standing in for its own (a probe copy: the module is not
    touched)."""
    if type(getattr(module, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return False
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    gen = torch.Generator().manual_seed(0)
    hidden, inner = 8, 12
    layers = {}
    for name, (n_in, n_out) in {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}.items():
        lin = nn.Linear(n_in, n_out, bias=False)
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen))
        layers[name] = lin
    probe = type(module).__new__(type(module))
    probe.__dict__.update({**module.__dict__, "_modules": {**module._modules, **layers}})
    x = _probe_input(hidden, gen)
    try:
        out = type(module).forward(probe, x)
    except Exception:  # noqa: BLE001 - a module that cannot run the probe is not this op
        return False
    ref = layers["down_proj"](nn.functional.silu(layers["gate_proj"](x)) * layers["up_proj"](x))
    return isinstance(out, Tensor) and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def _is_rope(fn) -> bool:
    """Whether ``fn(q, k, cos, sin)`` is ``(q * cos + rotate_half(q) * sin, ...)`` for k too."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 1, 3, 8, generator=gen)
    cos, sin = torch.randn(1, 3, 8, generator=gen), torch.randn(1, 3, 8, generator=gen)

    def rotated(x: Tensor) -> Tensor:
        half = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
        return x * cos[:, None] + half * sin[:, None]

    try:
        out = fn(q, k, cos, sin)
    except Exception:  # noqa: BLE001 - a function that cannot run the probe is not this op
        return False
    return (isinstance(out, tuple) and len(out) == 2
            and all(isinstance(t, Tensor) and t.shape == r.shape and torch.allclose(t, r, atol=1e-6)
                    for t, r in zip(out, (rotated(q), rotated(k)))))


_KNOWN: dict[tuple[type, str], bool] = {}  # (class, kind) -> whether it computes the op
_SAID: set[str] = set()


def _check(module: nn.Module, kind: str, probe) -> bool:
    """``probe(module)``, once per class of module."""
    key = (type(module), kind)
    if key not in _KNOWN:
        _KNOWN[key] = probe(module)
    return _KNOWN[key]


def _say_once(what: str) -> None:
    if what not in _SAID:
        _SAID.add(what)
        log.info("kvbudget: %s runs the model's own code (not fused)", what)


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
KINDS = ("rms_norm", "mlp", "rope")


def _looks_like(module: nn.Module, kind: str) -> bool:
    """Whether ``module`` has the attributes of the op (then it is probed)."""
    if kind == "rms_norm":
        return hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), Tensor)
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


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
    forwards = {"rms_norm": (_is_rms_norm, _rms_forward), "mlp": (_is_gated_mlp, _mlp_forward)}
    for module in model.modules():
        cls = type(module)
        if getattr(module, "kvbudget_fused", False):
            continue
        for kind, (probe, forward) in forwards.items():
            if kind not in kinds or not _looks_like(module, kind):
                continue
            if _check(module, kind, probe):
                module.forward = types.MethodType(forward, module)
                module.kvbudget_fused = True
                counts[kind] += 1
            else:
                _say_once(f"{cls.__name__} (not the {kind} kvbudget fuses)")
            break
        if "rope" in kinds and "Attention" in cls.__name__:
            counts["rope"] += _patch_rope(sys.modules.get(cls.__module__))
    model.kvbudget_fused_ops = counts
    return counts


def _patch_rope(modeling) -> int:
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None or hasattr(fn, "kvbudget_original"):
        return 0
    if not _is_rope(fn):
        _say_once(f"{modeling.__name__}.apply_rotary_pos_emb (not the RoPE kvbudget fuses)")
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
