"""The quadratic penalty sum Omega * (theta - m)^2 + residual, its gradient and its proximal
step, each on local tensors (FSDP2 shards) in one multi-tensor pass where it updates."""
from __future__ import annotations

import torch
from torch import Tensor

from .shards import local


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
    """Add ``factor * Omega * (theta - m)`` to each param's .grad (created if missing),
    in one multi-tensor pass on local tensors; times ``grad_scale`` for scaled gradients."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    diffs = torch._foreach_sub([local(p) for p in params], anchors)
    torch._foreach_mul_(diffs, importances)
    if isinstance(grad_scale, Tensor):
        torch._foreach_mul_(diffs, grad_scale.to(diffs[0].device) if diffs else grad_scale)
    elif grad_scale is not None:
        factor *= grad_scale
    torch._foreach_add_([local(p.grad) for p in params], diffs, alpha=factor)


@torch.no_grad()
def proximal_step_(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                   step_sizes: list[Tensor | float], factor: float) -> None:
    """theta <- (theta + c * m) / (1 + c) with c = factor * eta * Omega, on local tensors.

    ``step_sizes`` holds per param the step size eta the optimizer used (a float, or a local
    tensor broadcastable to the param, zero where it did not update). The update is written as
    theta + w * (m - theta), w = c / (1 + c) with c capped to a finite value, so w stays in
    [0, 1] for any lambda (exactly 1 where c overflows).
    """
    if not params:
        return
    thetas = [local(p) for p in params]
    coeffs = torch._foreach_mul(importances, factor)
    scalar = [i for i, s in enumerate(step_sizes) if not isinstance(s, Tensor)]
    tensor = [i for i, s in enumerate(step_sizes) if isinstance(s, Tensor)]
    for indices, steps in ((scalar, [float(step_sizes[i]) for i in scalar]),
                           (tensor, [step_sizes[i] for i in tensor])):
        if indices:
            torch._foreach_mul_([coeffs[i] for i in indices], steps)
    torch._foreach_clamp_max_(coeffs, [torch.finfo(c.dtype).max / 2 for c in coeffs])
    denominators = torch._foreach_add(coeffs, 1.0)
    torch._foreach_div_(coeffs, denominators)
    pulls = torch._foreach_sub(anchors, thetas)
    torch._foreach_mul_(pulls, coeffs)
    torch._foreach_add_(thetas, pulls)
