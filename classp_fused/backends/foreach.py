"""Backend ``foreach``: the CLASSP step in plain tensor ops, on any device, without a kernel.

The non-empty tensors of each dtype (and, with a penalty, of those it covers and the others) are
concatenated into flat buffers (importances and anchors too), stepped there in a fixed number of
ops, and written back with one op per list:
the ops a step dispatches do not grow with the number of tensors (only views do), so many
small tensors cost little more than one large one. The per-tensor views are made in C++
(flatten / split), and the segment ends of a layout are built once and cached. With gradient
means (the relative threshold) each tensor's bound ``tau * S`` is repeated over its segment and
its new S is a segment sum, written back with one op.
"""
import functools

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_available(device) -> bool:
    return True


def _step_flat(param, grad, acc, spec, importance=None, anchor=None, bound=None):
    """The reference's update on flat tensors (with ``spec.penalty``'s form on the flat
    ``importance`` and ``anchor`` when given, and the relative threshold's per-element
    ``bound`` tau * S): new param, new acc, selected and non-finite masks, and the squared
    gradient where finite, else 0."""
    lr, threshold, eps, power = spec.lr, spec.threshold, spec.eps, spec.power
    g = grad.to(acc.dtype)
    if spec.grad_scale is not None:
        g = g / spec.grad_scale.to(device=g.device, dtype=acc.dtype)
    form = None if importance is None else spec.penalty.form
    if form is not None:
        factor = 2.0 * spec.penalty.scale
        importance, anchor = importance.to(acc.dtype), anchor.to(acc.dtype)
    if form == "explicit":
        g = g + factor * (importance * (param.to(acc.dtype) - anchor))
    finite = torch.isfinite(g)
    square = g * g
    mask = finite & (square > threshold)
    if bound is not None:
        mask &= square > bound
    nonfinite = ~finite
    if spec.found_inf is not None:  # an overflowed AMP step changes and counts nothing
        no_inf = spec.found_inf.to(g.device) == 0
        mask &= no_inf
        nonfinite &= no_inf
    g = torch.where(mask, g, 0)
    if power == 1:
        new_acc = acc + g.abs()
    elif power == 2:
        new_acc = acc + g * g
    else:
        new_acc = acc + g.abs().pow(power)
    if spec.apply_scaling:
        denom = torch.where(mask, eps + new_acc, 1)
        if power == 1:
            g = g / denom
        else:  # the step size is lr * root
            root = torch.rsqrt(denom) if power == 2 else torch.exp2(torch.log2(denom) / -power)
            g = g * root
    new_param = param.to(acc.dtype) - lr * g
    if form == "proximal":
        eta = torch.as_tensor(lr, dtype=acc.dtype, device=g.device)  # the step size per element
        if spec.apply_scaling:
            eta = eta / denom if power == 1 else eta * root
        c = (factor * importance * eta).clamp_max(torch.finfo(acc.dtype).max / 2)
        new_param = new_param + c / (1 + c) * (anchor - new_param)
    return (torch.where(mask, new_param.to(param.dtype), param), torch.where(mask, new_acc, acc),
            mask, nonfinite, torch.where(finite, square, 0))


def _flat(tensors):
    """One flat copy of the concatenated ``tensors`` (their views made in C++)."""
    if len(tensors) == 1:  # a copy by the same op as for many tensors
        return torch.cat([tensors[0].reshape(-1)])
    return _flatten_dense_tensors(tensors)


def _segment_ends(numels: tuple, device: torch.device) -> torch.Tensor:
    """The index of the last element of each segment of ``numels`` elements (each > 0)."""
    return torch.tensor(numels, device=device).cumsum(0) - 1


_cached_segment_ends = functools.lru_cache(maxsize=16)(_segment_ends)  # per layout, eager only


def _segment_lengths(numels: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(numels, device=device)


_cached_segment_lengths = functools.lru_cache(maxsize=16)(_segment_lengths)


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


def _step_group(params, grads, accs, spec, importances=None, anchors=None, means=None):
    """Step non-empty tensors of one device and dtype, all with ``spec``'s penalty
    (``importances`` and ``anchors``) or all without, and refresh their gradient ``means``
    when given; returns their ``(n, 2)`` counts."""
    numels = list(map(torch.Tensor.numel, params))
    penalty = () if importances is None else (_flat(importances), _flat(anchors))
    bound = lengths = None
    if means is not None:
        old = torch.stack(list(means))
        eager = type(old) is torch.Tensor and not torch.compiler.is_compiling()  # not fake
        lengths = (_cached_segment_lengths if eager else _segment_lengths)(tuple(numels),
                                                                          old.device)
        if spec.relative_threshold > 0:
            bound = (old * spec.relative_threshold).repeat_interleave(
                lengths, output_size=sum(numels))
    new_param, new_acc, mask, nonfinite, squares = _step_flat(
        _flat(params), _flat(grads), _flat(accs), spec, *penalty, bound=bound)
    for targets, flat in ((params, new_param), (accs, new_acc)):
        _write_back(targets, flat, numels)
    if means is not None:
        new = torch.segment_reduce(squares, "sum", lengths=lengths) / lengths
        if spec.found_inf is not None:
            new = torch.where(spec.found_inf.to(new.device).reshape(()) == 0, new, old)
        torch._foreach_copy_(list(means), list(new.unbind()))
    return _segment_counts(mask, nonfinite, numels)


def _take(tensors, indices) -> list:
    return [tensors[i] for i in indices]


def step(params, grads, accs, spec):
    """The step over tensors on one device (validated by the caller), grouped by dtype and by
    whether ``spec.penalty`` covers them."""
    device = params[0].device if params else torch.device("cpu")
    penalty, means = spec.penalty, spec.grad_sq_means
    groups: dict = {}  # (dtype, penalized) -> indices of non-empty tensors, in traceable Python
    for i, p in enumerate(params):
        if p.numel():
            penalized = penalty is not None and penalty.importances[i] is not None
            groups.setdefault((p.dtype, penalized), []).append(i)
    if len(groups) == 1 and len(params) == sum(map(len, groups.values())):  # one group, no empty
        if penalty is None or not next(iter(groups))[1]:
            return _step_group(params, grads, accs, spec, means=means)
        return _step_group(params, grads, accs, spec, list(penalty.importances),
                           list(penalty.anchors), means)
    results = []
    for (_, penalized), indices in groups.items():
        terms = (_take(penalty.importances, indices), _take(penalty.anchors, indices)) \
            if penalized else (None, None)
        results.append((indices, _step_group(_take(params, indices), _take(grads, indices),
                                             _take(accs, indices), spec, *terms,
                                             None if means is None else _take(means, indices))))
    rows = [torch.zeros(2, dtype=torch.int64, device=device)] * len(params)
    for indices, counts in results:
        for i, row in zip(indices, counts.unbind()):
            rows[i] = row
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64, device=device)
