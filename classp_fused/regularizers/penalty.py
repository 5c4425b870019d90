"""The quadratic penalty sum Omega * (theta - m)^2 + residual, its gradient and its proximal
step, each on local tensors (FSDP2 shards). The updates make one pass with no temporary the
size of the params: on the CPU the C++ ops of the extension (csrc/classp_penalty_ops.cpp),
elsewhere, or without the extension, multi-tensor ops over bounded runs of chunk views."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _extension
from ..chunks import batches, chunk_elements
from .shards import local

# Whether the extension's CPU kernels of both passes are built.
CPU_KERNELS = _extension.has_kernel("CPU", "classp_fused::add_penalty_grad_")


def _cpu_kernels_take(tensors: list[Tensor]) -> bool:
    """Whether the C++ ops take a pass over ``tensors`` (local tensors): where they are built and
    there are tensors, all on the CPU; the chunked multi-tensor ops take it otherwise."""
    return CPU_KERNELS and bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def penalty_sum(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                residuals: list[Tensor | None], total: Tensor) -> Tensor:
    """``total`` plus sum Omega * (theta - m)^2 + residual, differentiable w.r.t. ``params``.

    For a sharded parameter the residual counts in proportion to this rank's share of the
    elements, so the ranks' values add up to the whole penalty.
    """
    for p, imp, anchor, residual in zip(params, importances, anchors, residuals):
        total = total + (imp * (local(p) - anchor).pow(2)).sum()
        if residual is not None and p.numel():
            share = local(p).numel() / p.numel()
            total = total + (residual * share).to(total.device, total.dtype)
    return total


@torch.no_grad()
def add_penalty_grad_(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                      factor: float, grad_scale: Tensor | float | None = None) -> None:
    """Add ``factor * Omega * (theta - m)`` to each param's .grad (created if missing), times
    ``grad_scale`` for scaled gradients: one pass over local tensors, on the CPU by the C++ op,
    elsewhere in runs of chunk views (``classp_fused.chunks``), a few multi-tensor ops per run,
    temporaries of a run's size."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    thetas = [local(p) for p in params]
    if isinstance(grad_scale, Tensor):
        grad_scale = grad_scale.to(thetas[0].device) if thetas else grad_scale
    elif grad_scale is not None:
        factor *= grad_scale
    grads = [local(p.grad) for p in params]
    if _cpu_kernels_take(thetas):
        torch.ops.classp_fused.add_penalty_grad_(
            thetas, importances, [], anchors, grads, factor,
            grad_scale if isinstance(grad_scale, Tensor) else None)
        return
    size = chunk_elements(thetas[0].device) if thetas else 0
    for theta, importance, anchor, grad in batches([thetas, importances, anchors, grads], size):
        diffs = torch._foreach_sub(theta, anchor)
        torch._foreach_mul_(diffs, importance)
        if isinstance(grad_scale, Tensor):
            torch._foreach_mul_(diffs, grad_scale)
        torch._foreach_add_(grad, diffs, alpha=factor)


@torch.no_grad()
def proximal_step_(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                   step_sizes: list[Tensor | float], factor: float) -> None:
    """theta <- (theta + c * m) / (1 + c) with c = factor * eta * Omega, on local tensors.

    ``step_sizes`` holds per param the step size eta the optimizer used (a float, or a local
    tensor broadcastable to the param, zero where it did not update). The update is written as
    theta + w * (m - theta), w = c / (1 + c) with c capped to a finite value, so w stays in
    [0, 1] for any lambda (exactly 1 where c overflows). One pass, as ``add_penalty_grad_``.
    """
    thetas = [local(p) for p in params]
    if _cpu_kernels_take(thetas):
        torch.ops.classp_fused.proximal_step_(
            thetas, importances, [], anchors,
            [s if isinstance(s, Tensor) else None for s in step_sizes],
            [0.0 if isinstance(s, Tensor) else float(s) for s in step_sizes], factor)
        return
    steps = [s.expand_as(t) if isinstance(s, Tensor) else float(s)
             for s, t in zip(step_sizes, thetas)]
    size = chunk_elements(thetas[0].device) if thetas else 0
    for theta, importance, anchor, step in batches([thetas, importances, anchors, steps], size):
        coeffs = torch._foreach_mul(importance, factor)
        scalar = [i for i, s in enumerate(step) if not isinstance(s, Tensor)]
        tensor = [i for i, s in enumerate(step) if isinstance(s, Tensor)]
        for indices in (scalar, tensor):
            if indices:
                torch._foreach_mul_([coeffs[i] for i in indices], [step[i] for i in indices])
        torch._foreach_clamp_max_(coeffs, [torch.finfo(c.dtype).max / 2 for c in coeffs])
        denominators = torch._foreach_add(coeffs, 1.0)
        torch._foreach_div_(coeffs, denominators)
        pulls = torch._foreach_sub(anchor, theta)
        torch._foreach_mul_(pulls, coeffs)
        torch._foreach_add_(theta, pulls)
