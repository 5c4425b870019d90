"""The CLASSP step op contract: the backend registry, the ``auto`` choice and the op entry point.

Every backend implements ``step(params, grads, accs, spec) -> Tensor`` updating ``params`` and
``accs`` in place as ``spec`` (a :class:`~classp_fused.backends.step_spec.StepSpec`: the
hyperparameters, AMP scalars and options such as a fused penalty, see SPEC section 4a) says, and
returning an int64 tensor of shape ``(len(params), 2)``: per tensor, the number of elements
updated and the number of non-finite gradient elements skipped; and ``is_available(device)``.
A backend that steps fewer param dtypes than the four names them in ``KERNEL_DTYPES``, so that a
caller can refuse them before any kernel runs; one that steps compressed accumulators (bfloat16,
8-bit codes: ``StepSpec.compressed``) says so with ``COMPRESSED_STATE = True``. Inputs are
validated once, for all backends (:mod:`classp_fused.validation`); under ``torch.compile`` the
validation (Python-side checks, which would break the graph) is skipped.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Sequence

import torch
from torch import Tensor

from ..validation import COMPRESSED_ACC_DTYPES, PARAM_DTYPES, check_step_inputs
from .step_spec import CompressedState, Penalty, StepSpec, step_spec

BACKENDS = ("torch", "foreach", "cpp", "cuda", "triton")
_MODULES = {"torch": "reference_backend", "foreach": "foreach", "cpp": "cpp", "cuda": "cuda",
            "triton": "triton"}


_loaded: dict = {}


def _module(name: str):
    if name not in _loaded:
        _loaded[name] = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return _loaded[name]


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Names of the backends that can run a step on ``device``, fastest first after ``auto``."""
    device = torch.device(device)
    return [name for name in BACKENDS if _module(name).is_available(device)]


def param_dtypes(name: str) -> tuple:
    """The param dtypes backend ``name`` can step (the triton kernel has no float64)."""
    return getattr(_module(name), "KERNEL_DTYPES", PARAM_DTYPES)


def steps_compressed_state(name: str) -> bool:
    """Whether backend ``name`` steps compressed accumulators (its ``COMPRESSED_STATE``)."""
    return getattr(_module(name), "COMPRESSED_STATE", False)


_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}
_auto_choice: dict[str, str] = {}  # device type -> backend, filled by the first ``auto``
_named_ok: set[tuple[str, str]] = set()  # (backend, device type) pairs found available


def resolve_backend(name: str, device: str | torch.device) -> str:
    """Map ``auto`` to a concrete backend for ``device``; check that a named one can run there."""
    device = torch.device(device)
    if name == "auto" and device.type in _auto_choice:
        return _auto_choice[device.type]
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name != "auto":
        if (name, device.type) in _named_ok:
            return name
        if not _module(name).is_available(device):
            raise RuntimeError(f"backend {name!r} is not available on device {device.type!r}; "
                               f"available there: {available_backends(device)}")
        _named_ok.add((name, device.type))
        return name
    fused = [candidate for candidate in _AUTO_ORDER.get(device.type, ())
             if _module(candidate).is_available(device)]
    if not fused:
        warnings.warn(f"classp_fused: no fused kernel for device {device.type!r} "
                      f"(extension not built or not supported); using the 'foreach' backend",
                      RuntimeWarning, stacklevel=3)
    _auto_choice[device.type] = fused[0] if fused else "foreach"
    return _auto_choice[device.type]


def classp_step_(params: Sequence[Tensor], grads: Sequence[Tensor], accs: Sequence[Tensor], *,
                 lr, threshold: float = 0.0, eps: float = 1e-5, power: float = 1.0,
                 apply_scaling: bool = True, grad_scale: Tensor | None = None,
                 found_inf: Tensor | None = None, penalty: Penalty | None = None,
                 relative_threshold: float = 0.0, grad_sq_means: Sequence[Tensor] | None = None,
                 compressed: CompressedState | None = None, backend: str = "auto") -> Tensor:
    """One in-place CLASSP step over lists of tensors; returns ``(n, 2)`` int64 counts.

    Column 0 counts the elements updated, column 1 the non-finite gradient elements skipped
    (of the gradient the update sees: with an explicit ``penalty``, the penalized one).
    ``penalty`` (a :class:`~classp_fused.backends.step_spec.Penalty`, importances and anchors
    aligned with ``params``) takes a quadratic penalty inside the step (SPEC section 4a).
    ``relative_threshold`` tau > 0 also requires ``g*g > tau * S`` per element, S the tensor's
    entry in ``grad_sq_means`` (0-dim tensors of the accumulators' dtype), which the step then
    replaces with this step's mean of g*g over finite elements (see ``StepSpec``).
    ``compressed`` (a :class:`~classp_fused.backends.step_spec.CompressedState`) is needed
    where ``accs`` holds compressed accumulators (bfloat16, or uint8 8-bit codes;
    ``classp_fused.state_formats``); a named backend that does not step them
    (``steps_compressed_state``) refuses them, ``auto`` takes one that does.
    """
    params, grads, accs = list(params), list(grads), list(accs)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # the values as given, before step_spec converts them
        check_step_inputs(params, grads, accs, StepSpec(lr, threshold, eps, power, apply_scaling,
                                                        grad_scale, found_inf, penalty,
                                                        relative_threshold, grad_sq_means,
                                                        compressed))
    spec = step_spec(lr, threshold, eps, power, apply_scaling, grad_scale, found_inf, penalty,
                     relative_threshold, grad_sq_means, compressed)
    requested = backend
    if not compiling or backend == "auto":  # while compiling, a named backend is taken as given
        backend = resolve_backend(backend, params[0].device if params else "cpu")
    if (compressed is not None and not steps_compressed_state(backend)
            and any(a.dtype in COMPRESSED_ACC_DTYPES for a in accs)):
        if requested != "auto":
            able = [name for name in BACKENDS if steps_compressed_state(name)]
            raise TypeError(f"backend {backend!r} does not step compressed accumulators "
                            f"(bfloat16, uint8 codes); these do: {able}")
        backend = "foreach"
    return run_backend(backend, params, grads, accs, spec)


def run_backend(name: str, params: list, grads: list, accs: list, spec: StepSpec) -> Tensor:
    """Run backend ``name`` (resolved, not "auto") on inputs already validated, as ``spec``
    (made by :func:`~classp_fused.backends.step_spec.step_spec`) says."""
    return _module(name).step(params, grads, accs, spec)
