"""Backend ``foreach``: the CLASSP step in plain tensor ops, on any device, without a kernel.

Its temporaries are bounded by a chunk (``classp_fused.chunks``), not by the params' size: a
tensor of more than a chunk is stepped in place, one view of at most a chunk at a time; smaller
tensors of one dtype (and, with a penalty, covered by it or not) are packed in order into flat
buffers of at most a chunk (importances and anchors too), stepped there and written back with
one op per list. Each chunk or buffer runs a fixed sequence of in-place ops on scratch tensors
allocated once per step, small enough to stay in cache: the ops a step dispatches grow with its
elements, not with its tensors (their views are made in C++, their segment ends cached).
With gradient means (the relative threshold) an element is also compared with its tensor's
bound ``tau * S``, and each tensor's new S sums its finite squares over its chunks, or over its
segment of a packed buffer.

The selection is an integer mask of the compute dtype's width (all ones where selected),
applied with bitwise ops: an unselected element's accumulator and param get ``- (+0)``, which
leaves every value bit-identical, so no ``where`` runs over the data.

A compressed accumulator (bfloat16, 8-bit codes; ``StepSpec.compressed``) is stepped by the
reference's update on pieces of its tensor: runs of whole 8-bit blocks of at most a chunk, each
with its blocks' scales and its elements' index offset, so the codes, scales and bfloat16 bits
are the reference's, bit for bit, and the temporaries stay bounded by a chunk.
"""
from __future__ import annotations

import functools
import math
import struct

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..chunks import chunk_elements, chunks
from ..compressed_state import COMPRESSED_ACC_DTYPES
from ..reference import classp_update_
from ..state_formats import BLOCK

COMPRESSED_STATE = True

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}  # per compute dtype


def is_available(device) -> bool:
    return True


def _bits_of(value: float, dtype: torch.dtype) -> int:
    """The bit pattern of ``value`` rounded to ``dtype`` (float32 or float64), as a signed
    integer of its width; computed in Python, so it also runs on fake tensors."""
    code = "<f" if dtype == torch.float32 else "<d"
    try:
        packed = struct.pack(code, value)
    except OverflowError:  # beyond float32's range: rounds to an infinity
        packed = struct.pack(code, math.copysign(math.inf, value))
    return int.from_bytes(packed, "little", signed=True)


class _Scratch:
    """Per step: scratch tensors for one chunk of up to ``size`` elements (three, four with the
    proximal form, in the compute dtype, and the finite squares with gradient means), its two
    integer masks and their running sums over a tensor's chunks, with the step's constants as
    0-dim tensors of the dtypes they meet (a Python number would be converted at every op)."""

    def __init__(self, size: int, spec, dtype: torch.dtype, device: torch.device, no_inf):
        bits = _BITS[dtype]
        proximal = spec.penalty is not None and spec.penalty.form == "proximal"
        self.buffers = torch.empty(4 if proximal else 3, size, dtype=dtype, device=device)
        self.masks = torch.empty(2, size, dtype=bits, device=device)
        self.tally = torch.empty(2, size, dtype=bits, device=device)
        self.squares = None if spec.grad_sq_means is None else \
            torch.empty(size, dtype=dtype, device=device)
        self.spec, self.dtype, self.bits, self.no_inf = spec, dtype, bits, no_inf
        self.sign = torch.tensor(torch.iinfo(bits).min, dtype=bits)  # the sign bit alone
        self.neg_inf = torch.tensor(_bits_of(-math.inf, dtype), dtype=bits)
        # -0.0 compares as 0: g * g > -0.0 is g * g > 0
        self.threshold = torch.tensor(_bits_of(spec.threshold + 0.0, dtype), dtype=bits)
        self.eps = torch.tensor(spec.eps, dtype=dtype)
        self.lr = torch.as_tensor(spec.lr, dtype=dtype)  # also eta without scaling
        self.grad_scale = None if spec.grad_scale is None else \
            spec.grad_scale.to(device=device, dtype=dtype).reshape(())
        self.factor = None if spec.penalty is None else \
            torch.tensor(2.0 * spec.penalty.scale, dtype=dtype)
        self._views: dict = {}

    def views(self, shape: torch.Size) -> "_Views":
        """The scratch shaped like a chunk of ``shape`` (made once per shape)."""
        if shape not in self._views:
            self._views[shape] = _Views(self, shape)
        return self._views[shape]


class _Views:
    """A ``_Scratch`` shaped like one chunk: the buffers (and ``t`` and ``s`` as integers), the
    masks ``[mask, nonfinite]``, the tally and the finite squares (None without means)."""

    def __init__(self, scratch: _Scratch, shape: torch.Size):
        n = shape.numel()
        self.buffers = [b[:n].view(shape) for b in scratch.buffers]
        self.t_bits, self.s_bits = (b.view(scratch.bits) for b in self.buffers[1:3])
        self.masks = scratch.masks[:, :n].view(2, *shape)
        self.mask, self.nonfinite = self.masks.unbind()
        self.tally = scratch.tally[:, :n].view(2, *shape).unbind()
        self.squares = None if scratch.squares is None else scratch.squares[:n].view(shape)


def _chunk_step(scratch: _Scratch, param, grad, acc, importance=None, anchor=None,
                bound=None) -> _Views:
    """The reference's update, in place on ``param`` and ``acc`` (views of one shape, with
    ``importance`` and ``anchor`` when the penalty covers them, and the relative threshold's
    ``bound`` tau * S, 0-dim or per element, when given). Returns the scratch views, whose masks
    hold the chunk's selected elements (-1, all ones, or 0) and its non-finite gradient
    elements (1 or 0), and whose ``squares`` (with gradient means) the squared gradient where
    finite, else 0."""
    spec, dtype, bits = scratch.spec, scratch.dtype, scratch.bits
    views = scratch.views(param.shape)
    g, t, s = views.buffers[:3]
    t_bits, s_bits, mask = views.t_bits, views.s_bits, views.mask
    form = None if importance is None else spec.penalty.form
    if grad.dtype != dtype or spec.grad_scale is not None or form == "explicit":
        g.copy_(grad)  # grad.to(dtype)
        if spec.grad_scale is not None:
            g.div_(scratch.grad_scale)
        if form == "explicit":  # g + factor * (importance * (param - anchor))
            t.copy_(param)
            t.sub_(anchor).mul_(importance).mul_(scratch.factor)
            g.add_(t)
        grad = g
    torch.bitwise_or(grad.view(bits), scratch.sign, out=t_bits)  # t = -|g|
    torch.ge(t_bits, scratch.neg_inf, out=views.nonfinite)  # as integers: -inf or a NaN
    torch.mul(t, t, out=s)  # g * g
    torch.gt(s_bits, scratch.threshold, out=mask)  # g * g > threshold, as g * g >= 0
    torch.gt(mask, views.nonfinite, out=mask)  # and finite
    if views.squares is not None:  # t holds -|g| for power 1: the squares' buffer is free
        squares_bits = views.squares.view(bits)
        if bound is not None:
            torch.gt(s, bound, out=squares_bits)  # g * g > tau * S
            mask.bitwise_and_(squares_bits)
        torch.sub(views.nonfinite, 1, out=squares_bits)  # all ones where finite
        squares_bits.bitwise_and_(s_bits)
    if scratch.no_inf is not None:  # an overflowed AMP step changes and counts nothing
        mask.mul_(scratch.no_inf)
        views.nonfinite.mul_(scratch.no_inf)
    mask.neg_()  # all ones where selected
    power = spec.power
    if power == 2:
        torch.bitwise_or(s_bits, scratch.sign, out=t_bits)  # t = -(g * g)
    elif power != 1:  # t = -(|g| ** power)
        t_bits.bitwise_and_(~scratch.sign)
        t.pow_(power)
        t_bits.bitwise_or_(scratch.sign)
    t_bits.bitwise_and_(mask)
    acc.sub_(t)  # acc + increment where selected, acc - (+0) elsewhere
    if spec.apply_scaling:
        torch.add(acc, scratch.eps, out=s)  # eps + the new acc
        if power == 2:
            s.rsqrt_()  # the step size is lr * s
            torch.mul(grad, s, out=t)
        elif power == 1:
            torch.div(grad, s, out=t)
        else:  # the step size is lr * s
            s.log2_().div_(-power).exp2_()
            torch.mul(grad, s, out=t)
        t.mul_(scratch.lr)
    else:
        torch.mul(grad, scratch.lr, out=t)
    if form != "proximal":
        t_bits.bitwise_and_(mask)
        param.sub_(t)  # param - lr * step where selected, param - (+0) elsewhere
        return views
    torch.sub(param, t, out=g)  # the new param, without the pull
    c = views.buffers[3]
    if spec.apply_scaling:  # t = eta, the step size per element
        if power == 1:
            torch.div(scratch.lr, s, out=t)
        else:
            torch.mul(s, scratch.lr, out=t)
    c.copy_(importance)
    c.mul_(scratch.factor).mul_(t if spec.apply_scaling else scratch.lr)
    c.clamp_max_(torch.finfo(dtype).max / 2)
    torch.add(c, 1, out=s)
    c.div_(s)  # w = c / (1 + c)
    torch.sub(anchor, g, out=t)
    g.add_(t.mul_(c))  # new param + w * (anchor - new param)
    t.copy_(param)
    g.view(bits).bitwise_xor_(t_bits).bitwise_and_(mask).bitwise_xor_(t_bits)  # mask ? g : param
    param.copy_(g)
    return views


def _flat(tensors):
    """One flat copy of the concatenated ``tensors`` (their views made in C++)."""
    if len(tensors) == 1:  # a copy by the same op as for many tensors
        return torch.cat([tensors[0].reshape(-1)])
    return _flatten_dense_tensors(tensors)


def _segment_ends(numels: tuple, device: torch.device) -> torch.Tensor:
    """The index of the last element of each segment of ``numels`` elements (each > 0)."""
    return torch.tensor(numels, device=device).cumsum(0) - 1


_cached_segment_ends = functools.lru_cache(maxsize=256)(_segment_ends)  # per layout, eager only


def _segment_counts(masks, numels):
    """Per segment of ``numels`` elements (each > 0), the sums of the two rows of ``masks``, as
    int64 (one row at a time: each under the parallel grain, one row's running sums alive)."""
    eager = type(masks) is torch.Tensor and not torch.compiler.is_compiling()  # no fake tensors
    ends = (_cached_segment_ends if eager else _segment_ends)(tuple(numels), masks.device)
    totals = torch.stack([row.cumsum(0, dtype=torch.int32).index_select(0, ends)
                          for row in masks], 1).to(torch.int64)
    return torch.diff(totals, dim=0, prepend=torch.zeros_like(totals[:1]))


def _segment_lengths(numels: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(numels, device=device)


_cached_segment_lengths = functools.lru_cache(maxsize=256)(_segment_lengths)  # eager only


def _write_back(targets, flat, numels):
    """Copy the consecutive segments of ``flat`` into ``targets``, in one op."""
    if all(map(torch.Tensor.is_contiguous, targets)):
        torch.split_with_sizes_copy(flat, numels,
                                    out=[t if t.dim() == 1 else t.view(-1) for t in targets])
    else:
        torch._foreach_copy_(targets, _unflatten_dense_tensors(flat, targets))


def _bins(numels: list, size) -> list:
    """Consecutive runs of indices whose ``numels`` add up to at most ``size`` each."""
    bins, total = [], 0
    for i, n in enumerate(numels):
        if not bins or total + n > size:
            bins.append([])
            total = 0
        bins[-1].append(i)
        total += n
    return bins


def _step_group(params, grads, accs, spec, no_inf, importances=None, anchors=None,
                means=None):
    """Step non-empty tensors of one device and dtype, all with ``spec``'s penalty
    (``importances`` and ``anchors``) or all without, and refresh their gradient ``means``
    when given; returns their ``(n, 2)`` counts."""
    size = chunk_elements(params[0].device)
    numels = list(map(torch.Tensor.numel, params))
    lists = [params, grads, accs] + ([] if importances is None else [importances, anchors])
    large = [i for i, n in enumerate(numels) if n > size]
    small = [i for i, n in enumerate(numels) if n <= size]
    bins = [[small[j] for j in run] for run in _bins([numels[i] for i in small], size)]
    largest = max([numels[i] for i in large] + [sum(numels[i] for i in run) for run in bins])
    scratch = _Scratch(min(size, largest), spec, accs[0].dtype, params[0].device, no_inf)
    rows = [None] * len(params)  # per tensor, its [-selected, non-finite] counts
    sums = [None] * len(params)  # with means: per tensor, its sum of finite squares
    bounds = None if means is None or spec.relative_threshold <= 0 else \
        torch.stack(list(means)) * spec.relative_threshold  # tau * S, before S changes
    eager = type(params[0]) is torch.Tensor and not torch.compiler.is_compiling()  # not fake
    for indices in bins:
        param, grad, acc, *penalty = [_flat([ts[i] for i in indices]) for ts in lists]
        bin_numels = [numels[i] for i in indices]
        lengths = None if means is None else \
            (_cached_segment_lengths if eager else _segment_lengths)(tuple(bin_numels),
                                                                      param.device)
        bound = None if bounds is None else bounds[indices].repeat_interleave(
            lengths, output_size=param.numel())
        views = _chunk_step(scratch, param, grad, acc, *penalty, bound=bound)
        if means is not None:
            for i, total in zip(indices, torch.segment_reduce(views.squares, "sum",
                                                              lengths=lengths).unbind()):
                sums[i] = total
        _write_back([params[i] for i in indices], param, bin_numels)
        _write_back([accs[i] for i in indices], acc, bin_numels)
        for i, row in zip(indices, _segment_counts(views.masks, bin_numels).unbind()):
            rows[i] = row
    for i in large:
        for row in scratch.tally:  # one op per row: each under the parallel grain
            row.zero_()
        bound = None if bounds is None else bounds[i]
        total = None if means is None else torch.zeros((), dtype=accs[0].dtype,
                                                        device=params[0].device)
        for chunk in zip(*chunks([ts[i] for ts in lists], size)):
            views = _chunk_step(scratch, *chunk, bound=bound)
            views.tally[0].add_(views.mask)
            views.tally[1].add_(views.nonfinite)
            if total is not None:
                total.add_(views.squares.sum())
        rows[i] = torch.stack([row.sum() for row in scratch.tally])
        sums[i] = total
    if means is not None:
        new = torch.stack(sums) / (_cached_segment_lengths if eager else _segment_lengths)(
            tuple(numels), params[0].device)
        if no_inf is not None:
            new = torch.where(no_inf, new, torch.stack(list(means)))
        torch._foreach_copy_(list(means), list(new.unbind()))
    counts = torch.stack(rows)
    counts[:, 0].neg_()
    return counts


def _flat_range(t, start: int, stop: int) -> list:
    """Views of ``t`` (non-empty) that hold, in row-major order, its elements ``start`` to
    ``stop`` (exclusive) of its logical row-major order, whatever its strides."""
    if start >= stop:
        return []
    if t.dim() <= 1:
        return [t.reshape(-1)[start:stop]]
    inner = t[0].numel()
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return _flat_range(t[first], start - first * inner, stop - first * inner)
    views, rows = [], first
    if start % inner:
        views += _flat_range(t[first], start % inner, inner)
        rows += 1
    end = stop // inner
    if end > rows:
        views.append(t[rows:end])
    return views + _flat_range(t[end], 0, stop % inner) if stop % inner else views


def _piece(t, start: int, stop: int):
    """``t``'s elements ``start`` to ``stop`` as one flat tensor: a view of a contiguous ``t``,
    else a copy, and the views it was gathered from (None for a view)."""
    if t.is_contiguous():
        return t.view(-1)[start:stop], None
    views = _flat_range(t, start, stop)
    return torch.cat([v.reshape(-1) for v in views]), views


def _step_compressed(param, grad, acc, spec, scale, key, offset: int, importance=None,
                     anchor=None, importance_scale=None, mean=None, no_inf=None):
    """Step one non-empty tensor whose accumulator or importance is compressed (its 8-bit block
    ``scale``, rounding ``key`` and element index ``offset``; ``importance``, ``anchor`` and the
    8-bit importance's ``importance_scale`` when the penalty covers it; its gradient ``mean``
    when given) by the reference's update on runs of whole blocks of at most a chunk; returns
    its ``[updated, nonfinite]`` counts."""
    n, size = param.numel(), chunk_elements(param.device)
    piece = n if n <= size else max(BLOCK, int(size) // BLOCK * BLOCK)
    hyper = dict(lr=spec.lr, threshold=spec.threshold, eps=spec.eps, power=spec.power,
                 apply_scaling=spec.apply_scaling, grad_scale=spec.grad_scale,
                 found_inf=spec.found_inf, relative_threshold=spec.relative_threshold)
    if importance is not None:
        hyper.update(penalty_form=spec.penalty.form, penalty_scale=spec.penalty.scale)
    counts, total = [], None
    for start in range(0, n, piece):
        stop = min(start + piece, n)
        p, views = _piece(param, start, stop)
        a, acc_views = _piece(acc, start, stop)  # compressed accumulators are contiguous
        penalty = {} if importance is None else dict(
            importance=_piece(importance, start, stop)[0], anchor=_piece(anchor, start, stop)[0],
            importance_scale=_blocks(importance_scale, start, stop))
        # one piece updates the mean as the reference does; pieces leave theirs in a copy
        piece_mean = mean if mean is None or piece == n else mean.clone()
        counts.append(classp_update_(
            p, _piece(grad, start, stop)[0], a, **hyper, **penalty,
            grad_sq_mean=piece_mean, rounding_key=key, index_offset=offset + start,
            acc_scale=_blocks(scale, start, stop)))
        for flat, parts in ((p, views), (a, acc_views)):
            if parts is not None:
                torch._foreach_copy_(parts, [part.view(v.shape) for part, v in
                                             zip(flat.split([v.numel() for v in parts]), parts)])
        if piece_mean is not mean:  # the piece's mean times its elements: its sum
            part = piece_mean * (stop - start)
            total = part if total is None else total + part
    if total is not None:
        new = total / n
        mean.copy_(new if no_inf is None else torch.where(no_inf, new, mean))
    return torch.stack(counts).sum(0)


def _blocks(scales, start: int, stop: int):
    """The block scales of elements ``start:stop`` (whole blocks), or None without scales."""
    return None if scales is None else scales[start // BLOCK:-(-stop // BLOCK)]


def _take(tensors, indices) -> list:
    return [tensors[i] for i in indices]


def step(params, grads, accs, spec):
    """The step over tensors on one device (validated by the caller), grouped by dtype and by
    the dtype of the importance of ``spec.penalty`` that covers them (None where none does);
    tensors with a compressed accumulator or an 8-bit importance step one by one."""
    device = params[0].device if params else torch.device("cpu")
    penalty, means, compressed = spec.penalty, spec.grad_sq_means, spec.compressed
    no_inf = None if spec.found_inf is None else (spec.found_inf.to(device) == 0).reshape(())
    groups: dict = {}  # (dtype, importance dtype) -> indices of non-empty tensors
    rounded = []  # indices of non-empty tensors with compressed accumulators or importances
    for i, p in enumerate(params):
        if p.numel():
            importance = None if penalty is None else penalty.importances[i]
            if ((compressed is not None and accs[i].dtype in COMPRESSED_ACC_DTYPES)
                    or (importance is not None and importance.dtype == torch.uint8)):
                rounded.append(i)
                continue
            groups.setdefault((p.dtype, None if importance is None else importance.dtype),
                              []).append(i)
    if len(groups) == 1 and len(params) == sum(map(len, groups.values())):  # one group, no empty
        if penalty is None or next(iter(groups))[1] is None:
            return _step_group(params, grads, accs, spec, no_inf, means=means)
        return _step_group(params, grads, accs, spec, no_inf, list(penalty.importances),
                           list(penalty.anchors), means)
    results = []
    for (_, importance_dtype), indices in groups.items():
        terms = (_take(penalty.importances, indices), _take(penalty.anchors, indices)) \
            if importance_dtype is not None else (None, None)
        results.append((indices, _step_group(_take(params, indices), _take(grads, indices),
                                             _take(accs, indices), spec, no_inf, *terms,
                                             None if means is None else _take(means, indices))))
    rows = [torch.zeros(2, dtype=torch.int64, device=device)] * len(params)
    for indices, counts in results:
        for i, row in zip(indices, counts.unbind()):
            rows[i] = row
    keys = None if compressed is None else compressed.keys.unbind()
    importance_scales = [None] * len(params) if penalty is None or \
        penalty.importance_scales is None else penalty.importance_scales
    for i in rounded:
        terms = () if penalty is None else (penalty.importances[i], penalty.anchors[i],
                                            importance_scales[i])
        acc_compressed = compressed is not None and accs[i].dtype in COMPRESSED_ACC_DTYPES
        rows[i] = _step_compressed(params[i], grads[i], accs[i], spec,
                                   compressed.scales[i] if acc_compressed else None,
                                   keys[i] if acc_compressed else None,
                                   compressed.offsets[i] if acc_compressed else 0, *terms,
                                   mean=None if means is None else means[i], no_inf=no_inf)
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.int64, device=device)
