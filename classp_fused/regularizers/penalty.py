"""The quadratic penalty sum Omega * (theta - m)^2 + residual, its gradient and its proximal
step, each on local tensors (FSDP2 shards). The updates make one pass with no temporary the
size of the params: on the CPU the C++ ops of the extension (csrc/classp_penalty_ops.cpp),
elsewhere, or without the extension, multi-tensor ops over bounded runs of chunk views.

An importance may be stored compressed (``state_formats.importance_dtype``): bfloat16, or uint8
8-bit codes with their float32 block scales (``importance_scales``: per tensor, None unless its
importance is uint8). Every pass reads Omega as its decoded value in float32 (float64 for
float64 params): the C++ ops decode as they go, the
chunked ops decode one run of whole 256-element blocks at a time.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _extension
from ..chunks import batches, chunk_elements
from ..state_formats import BLOCK, importance_values
from .shards import local

# Whether the extension's CPU kernels of both passes are built.
CPU_KERNELS = _extension.has_kernel("CPU", "classp_fused::add_penalty_grad_")

Scales = Sequence[Tensor | None] | None


def _cpu_kernels_take(tensors: list[Tensor]) -> bool:
    """Whether the C++ ops take a pass over ``tensors`` (local params): where they are built and
    there are tensors, all on the CPU; the chunked multi-tensor ops take it otherwise."""
    return CPU_KERNELS and bool(tensors) and all(t.device.type == "cpu" for t in tensors)


def _runs(thetas: list[Tensor], importances: list[Tensor], importance_scales: Scales,
          anchors: list[Tensor], others: list):
    """The chunked passes' runs: ``(thetas, importance values, anchors, others)`` per run of
    chunk views (``chunks.batches``), the importances decoded where stored compressed (to
    float32, float64 for float64 params), else as stored."""
    decoders = _decoders(importances, importance_scales)
    size = _chunk_size(thetas[0].device, decoders) if thetas else 0
    for theta, importance, anchor, other, decoder in batches(
            [thetas, importances, anchors, others, decoders], size):
        if any(d is not None or w.dtype != t.dtype
               for d, w, t in zip(decoder, importance, theta)):
            importance = [_piece_values(w, d, torch.promote_types(t.dtype, torch.float32))
                          for w, d, t in zip(importance, decoder, theta)]
        yield theta, importance, anchor, other


def _codes_scales(importances: list[Tensor], importance_scales: Scales) -> list[Tensor]:
    """The block scales of the uint8 importances, in order (the C++ ops' argument)."""
    if importance_scales is None:
        return []
    return [s for w, s in zip(importances, importance_scales) if w.dtype == torch.uint8]


def _decoders(importances: list[Tensor], importance_scales: Scales) -> list:
    """Per importance, what decodes its pieces in the chunked passes: None for one stored in
    a float dtype (read with a cast), else (its contiguous codes, their block scales)."""
    if importance_scales is None:
        return [None] * len(importances)
    return [(w, s) if w.dtype == torch.uint8 else None
            for w, s in zip(importances, importance_scales)]


def _piece_values(piece: Tensor, decoder, dtype: torch.dtype) -> Tensor:
    """The importance values of ``piece`` (a chunk view of a stored importance) in ``dtype``:
    for 8-bit codes (``decoder`` = whole codes and scales) decoded from the whole blocks
    around it, so temporaries stay a chunk's size."""
    if decoder is None:
        return piece.to(dtype)
    codes, scales = decoder
    start = piece.storage_offset() - codes.storage_offset()  # a run of the contiguous codes
    first, stop = start // BLOCK, start + piece.numel()
    blocks = codes.view(-1)[first * BLOCK:min(-(-stop // BLOCK) * BLOCK, codes.numel())]
    values = importance_values(blocks, scales[first:-(-stop // BLOCK)], dtype)
    return values[start - first * BLOCK:stop - first * BLOCK].view(piece.shape)


def _chunk_size(device: torch.device, decoders: list) -> int | float:
    """The chunk size of the chunked passes: whole 256-element blocks when an importance is
    8-bit codes, so that a chunk decodes no more than its own blocks."""
    size = chunk_elements(device)
    if any(d is not None for d in decoders) and size > BLOCK:
        size = size // BLOCK * BLOCK
    return size


def penalty_sum(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                residuals: list[Tensor | None], total: Tensor,
                importance_scales: Scales = None) -> Tensor:
    """``total`` plus sum Omega * (theta - m)^2 + residual, differentiable w.r.t. ``params``.

    An importance stored in the param's dtype is read as it is, a compressed one decoded to
    float32 (one param at a time). For a sharded parameter the residual counts in proportion
    to this rank's share of the elements, so the ranks' values add up to the whole penalty.
    """
    scales = [None] * len(params) if importance_scales is None else importance_scales
    for p, imp, scale, anchor, residual in zip(params, importances, scales, anchors, residuals):
        if imp.dtype != p.dtype:
            imp = importance_values(imp, scale, torch.promote_types(p.dtype, torch.float32))
        total = total + (imp * (local(p) - anchor).pow(2)).sum()
        if residual is not None and p.numel():
            share = local(p).numel() / p.numel()
            total = total + (residual * share).to(total.device, total.dtype)
    return total


@torch.no_grad()
def add_penalty_grad_(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                      factor: float, grad_scale: Tensor | float | None = None, *,
                      importance_scales: Scales = None) -> None:
    """Add ``factor * Omega * (theta - m)`` to each param's .grad (created if missing), times
    ``grad_scale`` for scaled gradients: one pass over local tensors, on the CPU by the C++ op,
    elsewhere in runs of chunk views (``classp_fused.chunks``), a few multi-tensor ops per run,
    temporaries of a run's size. ``importance_scales``: the block scales of uint8
    importances (see the module)."""
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
            thetas, importances, _codes_scales(importances, importance_scales), anchors, grads,
            factor, grad_scale if isinstance(grad_scale, Tensor) else None)
        return
    for theta, importance, anchor, grad in _runs(thetas, importances, importance_scales,
                                                 anchors, grads):
        diffs = torch._foreach_sub(theta, anchor)
        torch._foreach_mul_(diffs, importance)
        if isinstance(grad_scale, Tensor):
            torch._foreach_mul_(diffs, grad_scale)
        torch._foreach_add_(grad, diffs, alpha=factor)


@torch.no_grad()
def proximal_step_(params: list[Tensor], importances: list[Tensor], anchors: list[Tensor],
                   step_sizes: list[Tensor | float], factor: float, *,
                   importance_scales: Scales = None) -> None:
    """theta <- (theta + c * m) / (1 + c) with c = factor * eta * Omega, on local tensors.

    ``step_sizes`` holds per param the step size eta the optimizer used (a float, or a local
    tensor broadcastable to the param, zero where it did not update). The update is written as
    theta + w * (m - theta), w = c / (1 + c) with c capped to a finite value, so w stays in
    [0, 1] for any lambda (exactly 1 where c overflows). One pass, as ``add_penalty_grad_``.
    """
    thetas = [local(p) for p in params]
    if _cpu_kernels_take(thetas):
        torch.ops.classp_fused.proximal_step_(
            thetas, importances, _codes_scales(importances, importance_scales), anchors,
            [s if isinstance(s, Tensor) else None for s in step_sizes],
            [0.0 if isinstance(s, Tensor) else float(s) for s in step_sizes], factor)
        return
    steps = [s.expand_as(t) if isinstance(s, Tensor) else float(s)
             for s, t in zip(step_sizes, thetas)]
    for theta, importance, anchor, step in _runs(thetas, importances, importance_scales,
                                                 anchors, steps):
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
