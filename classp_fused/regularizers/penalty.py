"""The quadratic penalty sum Omega * (theta - theta*)^2 and its gradient, on local tensors."""
from __future__ import annotations

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
                      factor: float) -> None:
    """Add ``factor * Omega * (theta - theta*)`` to each param's .grad (created if missing),
    in one multi-tensor pass on local tensors."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    diffs = torch._foreach_sub([local(p) for p in params], anchors)
    torch._foreach_mul_(diffs, importances)
    torch._foreach_add_([local(p.grad) for p in params], diffs, alpha=factor)
