"""CLASSP in plain PyTorch: the executable specification every backend is checked against.

Per element, with gradient ``g`` (divided by ``grad_scale`` when given), accumulator ``A``:

    mask = isfinite(g) and g*g > threshold
    where mask:   A += |g|**power
                  param -= lr * g / (eps + A)**(1/power)     (or lr * g without scaling)
    elsewhere:    param and A stay bit-identical

Arithmetic is float32 (float64 for float64 params); the parameter is rounded once on write.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype of the accumulator and of the arithmetic for ``param``."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def classp_update_(param: Tensor, grad: Tensor, acc: Tensor, *, lr, threshold: float, eps: float,
                   power: float, apply_scaling: bool, grad_scale: Tensor | None = None,
                   found_inf: Tensor | None = None) -> Tensor:
    """One CLASSP step on one tensor, in place. Returns ``[updated, nonfinite]`` element counts."""
    dtype = compute_dtype(param)
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=dtype)
    finite = torch.isfinite(g)
    nonfinite = ~finite
    mask = finite & (g * g > threshold)
    if found_inf is not None:  # an overflowed AMP step changes and counts nothing
        mask &= found_inf.to(g.device) == 0
        nonfinite &= found_inf.to(g.device) == 0
    g = torch.where(mask, g, 0)

    if power == 1:
        new_acc = acc + g.abs()
    elif power == 2:
        new_acc = acc + g * g
    else:
        new_acc = acc + g.abs().pow(power)

    if apply_scaling:
        denom = torch.where(mask, eps + new_acc, 1)
        if power == 1:
            step = g / denom
        elif power == 2:
            step = g * torch.rsqrt(denom)
        else:
            # as the spec computes it: neither 1/denom nor denom**(1/power) may overflow
            step = g * torch.exp2(torch.log2(denom) / -power)
    else:
        step = g
    new_param = param.to(dtype) - lr * step

    param.copy_(torch.where(mask, new_param.to(param.dtype), param))
    acc.copy_(torch.where(mask, new_acc, acc))
    return torch.stack([mask.sum(), nonfinite.sum()])


def classp_legacy_update_(param: Tensor, grad: Tensor, acc: Tensor, *, lr, threshold: float,
                          eps: float, power: float, apply_scaling: bool,
                          grad_scale: Tensor | None = None,
                          found_inf: Tensor | None = None) -> Tensor:
    """The published reference code's rule: a per-TENSOR gate and an L1 accumulator.

    The gate compares ``bool((g*g).any())`` with ``threshold``: any threshold in [0, 1) lets every
    tensor with a non-zero gradient through, and a threshold >= 1 blocks everything. The
    accumulator sums ``|g|`` whatever the power; the scale is ``lr / (A + eps)**(1/power)``.
    Non-finite gradient elements are still never applied.
    """
    dtype = compute_dtype(param)
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=dtype)
    finite = torch.isfinite(g)
    g = torch.where(finite, g, 0)
    gate = float(bool((g * g).any())) > threshold
    if found_inf is not None and bool(found_inf.item()):
        return torch.zeros(2, dtype=torch.int64, device=param.device)
    if not gate:
        return torch.stack([torch.zeros((), dtype=torch.int64, device=param.device),
                            (~finite).sum()])
    acc.add_(g.abs())
    scale = lr / (acc + eps).pow(1.0 / power) if apply_scaling else lr
    param.copy_((param.to(dtype) - scale * g).to(param.dtype))
    return torch.stack([finite.sum(), (~finite).sum()])


def _multi_tensor(update_):
    def step(params, grads, accs, *, lr, threshold, eps, power, apply_scaling,
             grad_scale=None, found_inf=None) -> Tensor:
        counts = [update_(p, g, a, lr=lr, threshold=threshold, eps=eps, power=power,
                          apply_scaling=apply_scaling, grad_scale=grad_scale, found_inf=found_inf)
                  for p, g, a in zip(params, grads, accs)]
        if not counts:
            return torch.zeros(0, 2, dtype=torch.int64)
        return torch.stack([c.to(counts[0].device) for c in counts])
    step.__doc__ = f"Multi-tensor form of ``{update_.__name__}``: one ``[updated, nonfinite]`` row per tensor."
    return step


classp_step_ = _multi_tensor(classp_update_)
classp_legacy_step_ = _multi_tensor(classp_legacy_update_)
