"""CLASSP in plain PyTorch: the executable specification every backend is checked against.

Per element, with gradient ``g`` (divided by ``grad_scale`` when given), accumulator ``A``:

    mask = isfinite(g) and g*g > threshold
    where mask:   A += |g|**power
                  param -= lr * g / (eps + A)**(1/power)     (or lr * g without scaling)
    elsewhere:    param and A stay bit-identical

With a relative threshold tau > 0 and the tensor's gradient mean S (SPEC section 4a: unitless
sparsity) the mask also needs ``g*g > tau * S``, and the step replaces S with this step's
``sum(g*g over finite elements) / numel`` (read by the next step; S = 0 at first, so the first
step is gated by ``threshold`` alone).

With a penalty ``scale * sum W * (param - m)**2`` (importance W, anchor m; SPEC section 4a):
explicit, ``g += 2*scale*W*(param - m)`` before the mask (W decoded from its importance
format, ``state_formats.importance_values``); proximal, where mask, after the update
``param += w*(m - param)``, ``w = c/(1 + c)``, ``c = min(2*scale*W*eta, max/2)``, eta the step
size ``lr/(eps + A)**(1/power)`` with the updated A (``lr`` without scaling).

A compressed accumulator (bfloat16, or 8-bit codes with per-block scales;
``classp_fused.state_formats``) is decoded to float32, updated and stepped with as above, and the
updated elements' new values rounded back stochastically (an 8-bit block with an updated element
is encoded again whole).

Arithmetic is float32 (float64 for float64 params); the parameter is rounded once on write.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import state_formats
from .backends.step_spec import CompressedState, Penalty


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype of the accumulator and of the arithmetic for ``param``."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def penalized_grad(param: Tensor, grad: Tensor, *, grad_scale: Tensor | None = None,
                   importance: Tensor | None = None, anchor: Tensor | None = None,
                   scale: float = 0.0) -> Tensor:
    """The gradient the update sees, in the compute dtype: ``grad / grad_scale``, plus the
    explicit penalty's gradient ``2*scale*W*(param - m)`` when an importance W is given."""
    dtype = compute_dtype(param)
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=dtype).reshape(())
    if importance is not None:
        g = g + 2.0 * scale * (importance.to(dtype) * (param.to(dtype) - anchor.to(dtype)))
    return g


def classp_update_(param: Tensor, grad: Tensor, acc: Tensor, *, lr, threshold: float, eps: float,
                   power: float, apply_scaling: bool, grad_scale: Tensor | None = None,
                   found_inf: Tensor | None = None, penalty_form: Optional[str] = None,
                   penalty_scale: float = 0.0, importance: Tensor | None = None,
                   anchor: Tensor | None = None, importance_scale: Tensor | None = None,
                   relative_threshold: float = 0.0,
                   grad_sq_mean: Tensor | None = None, acc_scale: Tensor | None = None,
                   rounding_key: Tensor | None = None, index_offset: int = 0) -> Tensor:
    """One CLASSP step on one tensor, in place. Returns ``[updated, nonfinite]`` element counts.

    ``penalty_form`` ("explicit" or "proximal") with ``importance`` and ``anchor`` (tensors of
    the param's shape; a uint8 importance with its block scales ``importance_scale``) takes the
    penalty ``penalty_scale * sum W * (param - m)**2`` in the step.
    ``grad_sq_mean`` (a 0-dim tensor of the compute dtype, needed when ``relative_threshold``
    > 0) is the mean S the relative threshold reads; it is replaced by this step's mean,
    except on an empty tensor or a step skipped by ``found_inf``.
    A bfloat16 ``acc``, or a uint8 one (8-bit codes) with its block scales ``acc_scale``, is a
    compressed accumulator, rounded with the bits of ``rounding_key`` (a 0-dim int64 tensor) at
    element indices from ``index_offset``.
    """
    dtype = compute_dtype(param)
    stored_acc = acc
    if acc.dtype == torch.uint8:
        acc = state_formats.decode(acc.reshape(-1), acc_scale).reshape(acc.shape)
    elif acc.dtype != dtype:
        acc = acc.to(dtype)
    explicit = penalty_form == "explicit" and importance is not None
    proximal = penalty_form == "proximal" and importance is not None
    if importance is not None:
        importance = state_formats.importance_values(importance, importance_scale, dtype)
    g = penalized_grad(param, grad, grad_scale=grad_scale,
                       importance=importance if explicit else None, anchor=anchor,
                       scale=penalty_scale)
    finite = torch.isfinite(g)
    nonfinite = ~finite
    square = g * g
    mask = finite & (square > threshold)
    if relative_threshold > 0:
        mask &= square > relative_threshold * grad_sq_mean
    if grad_sq_mean is not None and g.numel():
        new_mean = torch.where(finite, square, 0).sum() / g.numel()
    if found_inf is not None:  # an overflowed AMP step changes and counts nothing
        applied = found_inf.to(g.device).reshape(()) == 0
        mask &= applied
        nonfinite &= applied
        if grad_sq_mean is not None and g.numel():
            new_mean = torch.where(applied, new_mean, grad_sq_mean)
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
        else:  # the step size is lr * root; as the spec computes it, no 1/denom or denom**(1/p)
            root = torch.rsqrt(denom) if power == 2 else torch.exp2(torch.log2(denom) / -power)
            step = g * root
    else:
        step = g
    new_param = param.to(dtype) - lr * step
    if proximal:
        eta = torch.as_tensor(lr, dtype=dtype, device=g.device)  # the step size of each element
        if apply_scaling:
            eta = eta / denom if power == 1 else eta * root
        c = (2.0 * penalty_scale * importance.to(dtype)) * eta
        c = c.clamp_max(torch.finfo(dtype).max / 2)
        new_param = new_param + c / (1 + c) * (anchor.to(dtype) - new_param)

    param.copy_(torch.where(mask, new_param.to(param.dtype), param))
    if stored_acc.dtype == dtype:
        stored_acc.copy_(torch.where(mask, new_acc, acc))
    else:
        _store_compressed(stored_acc, acc_scale, torch.where(mask, new_acc, acc), mask,
                          rounding_key, index_offset)
    if grad_sq_mean is not None and g.numel():
        grad_sq_mean.copy_(new_mean)
    return torch.stack([mask.sum(), nonfinite.sum()])


def _store_compressed(acc: Tensor, acc_scale: Tensor | None, value: Tensor, mask: Tensor,
                      key: Tensor, offset: int) -> None:
    """Round ``value`` (float32: the new A where ``mask``, the decoded old A elsewhere) into the
    compressed ``acc``: its ``mask`` elements (bfloat16), or every block holding one (8-bit)."""
    if not bool(mask.any()):
        return
    index = torch.arange(offset, offset + value.numel(), dtype=torch.int64, device=value.device)
    bits = state_formats.element_bits(key.to(value.device), index)
    if acc.dtype == torch.bfloat16:
        flat = acc.view(-1)
        flat.copy_(torch.where(mask.reshape(-1), state_formats.round_bf16(value.reshape(-1), bits),
                               flat))
        return
    flat_mask = mask.reshape(-1)
    x = torch.where(flat_mask, value.reshape(-1).clamp_max(state_formats.SATURATION),
                    value.reshape(-1))
    codes, scales = state_formats.encode_blocks(x, bits)
    padded = torch.zeros(acc_scale.numel() * state_formats.BLOCK, dtype=torch.bool,
                         device=mask.device)
    padded[:flat_mask.numel()] = flat_mask
    touched = padded.view(-1, state_formats.BLOCK).any(dim=1)
    flat = acc.view(-1)
    flat.copy_(torch.where(touched.repeat_interleave(state_formats.BLOCK)[:flat.numel()], codes,
                           flat))
    acc_scale.copy_(torch.where(touched, scales, acc_scale))


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
        g = g / grad_scale.to(device=g.device, dtype=dtype).reshape(())
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


def classp_step_(params, grads, accs, *, lr, threshold, eps, power, apply_scaling,
                 grad_scale=None, found_inf=None, penalty: Optional[Penalty] = None,
                 relative_threshold: float = 0.0, grad_sq_means=None,
                 compressed: Optional[CompressedState] = None) -> Tensor:
    """Multi-tensor form of ``classp_update_``: one ``[updated, nonfinite]`` row per tensor.

    ``penalty`` (a :class:`~classp_fused.backends.step_spec.Penalty`) gives the importances
    and anchors aligned with ``params``; ``grad_sq_means`` the relative threshold's means;
    ``compressed`` the scales, rounding keys and index offsets of compressed accumulators."""
    hyper = dict(lr=lr, threshold=threshold, eps=eps, power=power, apply_scaling=apply_scaling,
                 grad_scale=grad_scale, found_inf=found_inf,
                 relative_threshold=relative_threshold)
    none = [None] * len(params)
    means = none if grad_sq_means is None else grad_sq_means
    importances, anchors = (none, none) if penalty is None else (penalty.importances,
                                                                  penalty.anchors)
    importance_scales = none if penalty is None or penalty.importance_scales is None else \
        penalty.importance_scales
    if penalty is not None:
        hyper.update(penalty_form=penalty.form, penalty_scale=penalty.scale)
    scales, keys, offsets = none, none, [0] * len(params)
    if compressed is not None:
        scales, keys, offsets = compressed.scales, compressed.keys.unbind(), compressed.offsets
    counts = [classp_update_(p, g, a, **hyper, importance=w, anchor=m, importance_scale=w_scale,
                             grad_sq_mean=s, acc_scale=scale, rounding_key=key,
                             index_offset=offset)
              for p, g, a, w, m, w_scale, s, scale, key, offset in zip(
                  params, grads, accs, importances, anchors, importance_scales, means, scales,
                  keys, offsets)]
    return _stacked(counts)


def classp_legacy_step_(params, grads, accs, *, lr, threshold, eps, power, apply_scaling,
                        grad_scale=None, found_inf=None) -> Tensor:
    """Multi-tensor form of ``classp_legacy_update_``: one ``[updated, nonfinite]`` row per
    tensor."""
    return _stacked([classp_legacy_update_(p, g, a, lr=lr, threshold=threshold, eps=eps,
                                           power=power, apply_scaling=apply_scaling,
                                           grad_scale=grad_scale, found_inf=found_inf)
                     for p, g, a in zip(params, grads, accs)])


def _stacked(counts: list) -> Tensor:
    if not counts:
        return torch.zeros(0, 2, dtype=torch.int64)
    return torch.stack([c.to(counts[0].device) for c in counts])
