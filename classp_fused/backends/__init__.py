"""The CLASSP step op contract: backend registry, input validation and the ``auto`` choice.

Every backend implements ``step(params, grads, accs, lr, threshold, eps, power, apply_scaling,
grad_scale, found_inf) -> Tensor`` updating ``params`` and ``accs`` in place and returning an
int64 tensor of shape ``(len(params), 2)``: per tensor, the number of elements updated and the
number of non-finite gradient elements skipped. Inputs are validated here, once, for all;
under ``torch.compile`` the validation (Python-side checks, which would break the graph) is
skipped.
"""
from __future__ import annotations

import importlib
import math
import warnings
from typing import Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..reference import compute_dtype

BACKENDS = ("torch", "foreach", "cpp", "cuda", "triton")
_MODULES = {"torch": "reference_backend", "foreach": "foreach", "cpp": "cpp", "cuda": "cuda",
            "triton": "triton"}
PARAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_loaded: dict = {}


def _module(name: str):
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return _loaded[name]


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run a step on ``device``, fastest first after ``auto``."""
    device = torch.device(device)
    return [name for name in BACKENDS if _module(name).is_available(device)]


_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}
_auto_choice: dict[str, str] = {}  # device type -> backend, filled by the first ``auto``


def resolve_backend(name: str, device: str | torch.device) -> str:
    """Map ``auto`` to a concrete backend for ``device``; check that a named one can run there."""
    device = torch.device(device)
    if name == "auto" and device.type in _auto_choice:
        return _auto_choice[device.type]
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name != "auto":
        if not _module(name).is_available(device):
            raise RuntimeError(f"backend {name!r} is not available on device {device.type!r}; "
                               f"available there: {available_backends(device)}")
        return name
    fused = [candidate for candidate in _AUTO_ORDER.get(device.type, ())
             if _module(candidate).is_available(device)]
    if not fused:
        warnings.warn(f"classp_fused: no fused kernel for device {device.type!r} "
                      f"(extension not built or not supported); using the 'foreach' backend",
                      RuntimeWarning, stacklevel=3)
    _auto_choice[device.type] = fused[0] if fused else "foreach"
    return _auto_choice[device.type]


def check_hyperparameters(lr, threshold: float, eps: float, power: float) -> None:
    """Raise ValueError naming the first out-of-range hyperparameter.

    The value of a tensor ``lr`` is checked only when it holds data on the CPU (reading it from
    an accelerator would synchronize every step; a FakeTensor has no value).
    """
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr as a tensor must hold one element, got shape {tuple(lr.shape)}")
    if not isinstance(lr, Tensor) or (lr.device.type == "cpu" and not is_fake(lr)):
        try:
            lr_value = float(lr)
        except (TypeError, ValueError):
            raise ValueError(f"lr must be a non-negative number, got {lr!r}") from None
        if not lr_value >= 0.0:
            raise ValueError(f"lr must be a non-negative number, got {lr_value}")
    if not (isinstance(threshold, (int, float)) and threshold >= 0.0):
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0.0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")
    if not (isinstance(power, (int, float)) and power > 0.0 and math.isfinite(power)):
        raise ValueError(f"power must be a finite number > 0, got {power!r}")


def check_param(param: Tensor, where: str = "params") -> None:
    """Raise if ``param`` cannot be updated by CLASSP."""
    if not isinstance(param, Tensor):
        raise TypeError(f"{where} must hold tensors, got {type(param).__name__}")
    if param.is_sparse or param.layout != torch.strided:
        raise TypeError(f"{where}: sparse or non-strided parameters are not supported")
    if param.is_complex():
        raise TypeError(f"{where}: complex parameters are not supported "
                        f"(optimize torch.view_as_real(param) instead)")
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"{where} must be float16, bfloat16, float32 or float64, got {param.dtype}")
    if param.numel() > 1 and torch._debug_has_internal_overlap(param) == 1:
        raise ValueError(f"{where}: a parameter with internal overlap (e.g. from expand()) "
                         f"cannot be updated in place")


def check_step_inputs(params: Sequence[Tensor], grads: Sequence[Tensor], accs: Sequence[Tensor],
                      lr, threshold: float, eps: float, power: float,
                      grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Validate one step's inputs; raise TypeError/ValueError/RuntimeError naming the argument."""
    if not (len(params) == len(grads) == len(accs)):
        raise ValueError(f"params, grads and accs must have the same length, got "
                         f"{len(params)}, {len(grads)}, {len(accs)}")
    check_hyperparameters(lr, threshold, eps, power)
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (not isinstance(t, Tensor) or t.numel() != 1):
            raise ValueError(f"{name} must be a one-element tensor or None")
    for i, (p, g, a) in enumerate(zip(params, grads, accs)):
        check_param(p, f"params[{i}]")
        if p.device != params[0].device:
            raise RuntimeError(f"params[{i}] is on {p.device}, expected params[0]'s device "
                               f"{params[0].device} (one step runs on one device)")
        if not isinstance(g, Tensor):
            raise TypeError(f"grads[{i}] must be a tensor, got {type(g).__name__}")
        if g.is_sparse or g.layout != torch.strided:
            raise TypeError(f"grads[{i}] is sparse; CLASSP needs dense gradients")
        if g.is_complex():
            raise TypeError(f"grads[{i}] is complex; CLASSP needs real gradients")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] has dtype {g.dtype}, expected the param's {p.dtype}")
        if not isinstance(a, Tensor) or a.dtype != compute_dtype(p):
            raise TypeError(f"accs[{i}] must be a {compute_dtype(p)} tensor "
                            f"(accumulators stay fp32 for fp16/bf16/fp32 params)")
        for name, t in (("grads", g), ("accs", a)):
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected the param's "
                                 f"{tuple(p.shape)}")
            if t.device != p.device:
                raise RuntimeError(f"{name}[{i}] is on {t.device}, expected the param's device "
                                   f"{p.device}")


def classp_step_(params: Sequence[Tensor], grads: Sequence[Tensor], accs: Sequence[Tensor], *,
                 lr, threshold: float = 0.0, eps: float = 1e-5, power: float = 1.0,
                 apply_scaling: bool = True, grad_scale: Tensor | None = None,
                 found_inf: Tensor | None = None, backend: str = "auto") -> Tensor:
    """One in-place CLASSP step over lists of tensors; returns ``(n, 2)`` int64 counts.

    Column 0 counts the elements updated, column 1 the non-finite gradient elements skipped.
    """
    params, grads, accs = list(params), list(grads), list(accs)
    compiling = torch.compiler.is_compiling()
    if not compiling:
        check_step_inputs(params, grads, accs, lr, threshold, eps, power, grad_scale, found_inf)
    if not compiling or backend == "auto":  # while compiling, a named backend is taken as given
        backend = resolve_backend(backend, params[0].device if params else "cpu")
    return run_backend(backend, params, grads, accs, lr=lr, threshold=threshold, eps=eps,
                       power=power, apply_scaling=apply_scaling, grad_scale=grad_scale,
                       found_inf=found_inf)


def run_backend(name: str, params: list, grads: list, accs: list, *, lr, threshold, eps, power,
                apply_scaling, grad_scale, found_inf) -> Tensor:
    """Run backend ``name`` (resolved, not "auto") on inputs already validated."""
    return _module(name).step(params, grads, accs, lr, float(threshold), float(eps), float(power),
                              bool(apply_scaling), grad_scale, found_inf)
