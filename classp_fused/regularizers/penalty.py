"""The quadratic penalty sum Omega * (theta - theta*)^2 and its gradient, on local tensors."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .shards import local


def penalty_sum(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                total: Tensor) -> Tensor:
    """``total`` plus sum Omega * (theta - theta*)^2, differentiable w.r.t. ``params``."""
    for p, imp, anchor in zip(params, importances, anchors):
        total = total + (imp * (local(p) - anchor).pow(2)).sum()
    return total


@torch.no_grad()
def add_penalty_grad_(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                      factor: float, grad_scale: Optional[Union[Tensor, float]] = None) -> None:
    """Add ``factor * Omega * (theta - theta*)`` to each param's .grad (created if missing),
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
