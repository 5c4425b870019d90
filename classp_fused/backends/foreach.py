"""Backend ``foreach``: the CLASSP step in plain tensor ops, on any device, without a kernel.

The non-empty tensors of each (device, dtype) group are concatenated into flat buffers, stepped
there in a fixed number of ops, and written back with one op per list:
the ops a step dispatches do not grow with the number of tensors (only views do), so many
small tensors cost little more than one large one. The per-tensor views are made in C++
(flatten / split), and the segment ends of a layout are built once and cached.
"""
import functools

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_available(device) -> bool:
    return True


def _step_flat(param, grad, acc, lr, threshold, eps, power, apply_scaling, grad_scale,
               found_inf):
    """The reference's update on flat tensors: new param, new acc, selected and non-finite masks."""
    g = grad.to(acc.dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(device=g.device, dtype=acc.dtype)
    finite = torch.isfinite(g)
    mask = finite & (g * g > threshold)
    nonfinite = ~finite
    if found_inf is not None:  # an overflowed AMP step changes and counts nothing
        no_inf = found_inf.to(g.device) == 0
        mask &= no_inf
        nonfinite &= no_inf
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
            g = g / denom
        elif power == 2:
            g = g * torch.rsqrt(denom)
        else:
            g = g * torch.exp2(torch.log2(denom) / -power)
    new_param = (param.to(acc.dtype) - lr * g).to(param.dtype)
    return (torch.where(mask, new_param, param), torch.where(mask, new_acc, acc), mask,
            nonfinite)


def _flat(tensors):
    """One flat copy of the concatenated ``tensors`` (their views made in C++)."""
    if len(tensors) == 1:  # a copy by the same op as for many tensors
        return torch.cat([tensors[0].reshape(-1)])
    return _flatten_dense_tensors(tensors)


def _segment_ends(numels: tuple, device: torch.device) -> torch.Tensor:
    """The index of the last element of each segment of ``numels`` elements (each > 0)."""
    return torch.tensor(numels, device=device).cumsum(0) - 1


_cached_segment_ends = functools.lru_cache(maxsize=16)(_segment_ends)  # per layout, eager only


def _segment_counts(mask, nonfinite, numels):
    """Per segment of ``numels`` elements (each > 0), its ``[selected, non-finite]`` counts."""
    eager = type(mask) is torch.Tensor and not torch.compiler.is_compiling()  # no fake tensors
    ends_of = _cached_segment_ends if eager else _segment_ends
    ends = torch.stack([mask, nonfinite]).cumsum(1).index_select(
        1, ends_of(tuple(numels), mask.device)).T
    return torch.diff(ends, dim=0, prepend=torch.zeros_like(ends[:1]))


def _write_back(targets, flat, numels):
    """Copy the consecutive segments of ``flat`` into ``targets``, in one op."""
    if all(map(torch.Tensor.is_contiguous, targets)):
        torch.split_with_sizes_copy(flat, numels,
                                    out=[t if t.dim() == 1 else t.view(-1) for t in targets])
    else:
        torch._foreach_copy_(targets, _unflatten_dense_tensors(flat, targets))


def _step_group(params, grads, accs, lr, threshold, eps, power, apply_scaling, grad_scale,
                found_inf):
    """Step non-empty tensors of one device and dtype; returns their ``(n, 2)`` counts."""
    numels = list(map(torch.Tensor.numel, params))
    new_param, new_acc, mask, nonfinite = _step_flat(
        _flat(params), _flat(grads), _flat(accs), lr, threshold, eps, power, apply_scaling,
        grad_scale, found_inf)
    for targets, flat in ((params, new_param), (accs, new_acc)):
        _write_back(targets, flat, numels)
    return _segment_counts(mask, nonfinite, numels)


def step(params, grads, accs, lr, threshold, eps, power, apply_scaling, grad_scale, found_inf):
    """The step over tensors on one device (validated by the caller), grouped by dtype."""
    device = params[0].device if params else torch.device("cpu")
    groups: dict = {}  # dtype -> indices of non-empty tensors, in traceable Python
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault(p.dtype, []).append(i)
    hyper = (lr, threshold, eps, power, apply_scaling, grad_scale, found_inf)
    if len(groups) == 1 and len(params) == sum(map(len, groups.values())):  # one dtype, no empty
        return _step_group(params, grads, accs, *hyper)
    results = [(indices, _step_group([params[i] for i in indices], [grads[i] for i in indices],
                                     [accs[i] for i in indices], *hyper))
               for indices in groups.values()]
    rows = [torch.zeros(2, dtype=torch.int64, device=device)] * len(params)
    for indices, counts in results:
        for i, row in zip(indices, counts.unbind()):
            rows[i] = row
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64, device=device)
